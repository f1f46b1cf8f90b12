"""Shared fixtures: apps with custom settings, a test client, and signing helpers."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from webhook_server.settings import DEPLOYMENT_NAMES, NOT_YET_NAMES, SETTINGS

PARTICLE_SECRET = "particle-secret-0123456789"
WEBHOOK_SECRET = "It's a Secret to Everybody"
CORE_ID = "0123456789abcdef01234567"

# Every setting the server reads: cleared for each test so a developer's shell or .env
# cannot change what the tests see.
SETTING_NAMES = (*(setting.name for setting in SETTINGS), *DEPLOYMENT_NAMES, *NOT_YET_NAMES)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name in SETTING_NAMES or any(name == f"{s}_FILE" for s in SETTING_NAMES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def base_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DATA_DIR": str(tmp_path / "data"),
        "RATE_LIMIT": "1000/second",
    }
    settings.update(overrides)
    return settings


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., Flask]:
    """Build an app with the test defaults plus overrides (a value of None unsets a setting)."""
    from webhook_server import create_app

    def factory(**overrides: Any) -> Flask:
        app = create_app(base_settings(tmp_path, **overrides))
        app.testing = True
        return app

    return factory


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def particle_event(**fields: Any) -> dict[str, Any]:
    event = {
        "event": "motion",
        "data": "front door",
        "coreid": CORE_ID,
        "published_at": "2026-11-23T18:02:11.000Z",
    }
    event.update(fields)
    return {k: v for k, v in event.items() if v is not ...}


def bearer(secret: str = PARTICLE_SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def hub_signature(body: bytes, secret: str = WEBHOOK_SECRET, algorithm: str = "sha256") -> str:
    return f"{algorithm}=" + hmac.new(secret.encode(), body, algorithm).hexdigest()


def signed_headers(body: bytes, secret: str = WEBHOOK_SECRET, **extra: str) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": hub_signature(body, secret),
    }
    headers.update(extra)
    return headers


@pytest.fixture
def sha256() -> Callable[[bytes], str]:
    return lambda data: hashlib.sha256(data).hexdigest()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    path.mkdir(exist_ok=True)
    yield path


@pytest.fixture(autouse=True)
def _flush_app_logs() -> Iterator[None]:
    """Write the app's waiting log lines (logs.BatchingStreamHandler) while this test's output
    is still being captured, not later into pytest's own output."""
    yield
    import logging

    for handler in logging.getLogger().handlers:
        if getattr(handler, "_webhook_server", False):
            handler.flush()
