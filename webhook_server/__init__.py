"""webhook-server: a self-hosted webhook alert receiver."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from webhook_server.app import create_app

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> Any:
    """`create_app` on first use (PEP 562): the supervisor and the delivery worker import
    submodules of this package and must not pay for Flask and the web half to do so."""
    if name == "create_app":
        from webhook_server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
