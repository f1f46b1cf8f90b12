"""webhook-server: a self-hosted webhook alert receiver."""

from __future__ import annotations

__version__ = "0.1.0"

from .app import create_app

__all__ = ["__version__", "create_app"]
