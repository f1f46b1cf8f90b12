"""Shared fixtures: apps with custom settings, a test client, signing helpers and the response
assertions (`assert_accepted`, `assert_error`, `assert_unauthorized`) every test module uses."""

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

from tests.services import PostgresProcess
from webhook_server.settings import DEPLOYMENT_NAMES, NOT_YET_NAMES, SETTINGS
from webhook_server.store.base import EventStore
from webhook_server.store.postgres import PostgresStore
from webhook_server.store.sqlite import Store

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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresProcess]:
    """One PostgreSQL server per test process (xdist worker); each test gets a database of its own."""
    server = PostgresProcess().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def each_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test once on SQLite and once on a fresh PostgreSQL database. For the second,
    DATABASE_URL is set, which `base_settings` and `new_store` pick up; every PostgresStore the
    test opened is closed after it, and its database dropped."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    server: PostgresProcess = request.getfixturevalue("postgres")
    url = server.new_database()
    monkeypatch.setenv("DATABASE_URL", url)
    opened: list[PostgresStore] = []
    original = PostgresStore.__init__

    def tracked(self: PostgresStore, *args: Any, **kwargs: Any) -> None:
        opened.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PostgresStore, "__init__", tracked)
    yield "postgresql"
    for store in opened:
        store.close()
    server.drop(url)


def new_store(path: Path) -> EventStore:
    """The store a test works on: SQLite at `path`, or PostgreSQL under `each_store`."""
    url = os.environ.get("DATABASE_URL")
    return PostgresStore(url) if url else Store(path)


def base_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DATA_DIR": str(tmp_path / "data"),
        "RATE_LIMIT": "1000/second",
    }
    if os.environ.get("DATABASE_URL"):  # under `each_store`
        settings["DATABASE_URL"] = os.environ["DATABASE_URL"]
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


UNAUTHORIZED_BODY = {"error": "unauthorized", "message": "Missing or invalid credentials."}


def _response_parts(response: Any) -> tuple[int, str, Any, str]:
    """Status, media type, JSON body and text of a Flask test response or a `requests` response."""
    if hasattr(response, "get_json"):  # werkzeug.test.TestResponse
        text = response.get_data(as_text=True)
        mimetype = response.mimetype
        body = response.get_json(silent=True)
    else:  # requests.Response
        text = response.text
        mimetype = response.headers.get("Content-Type", "").partition(";")[0].strip()
        try:
            body = response.json()
        except ValueError:
            body = None
    return int(response.status_code), str(mimetype), body, str(text)


def assert_accepted(response: Any) -> str:
    """A 202 with exactly {"status": "accepted", "id": "<digits>"}; returns the id."""
    status, mimetype, body, text = _response_parts(response)
    assert status == 202, text
    assert mimetype == "application/json", mimetype
    assert isinstance(body, dict) and set(body) == {"status", "id"}, body
    assert body["status"] == "accepted", body
    assert isinstance(body["id"], str) and body["id"].isdigit() and int(body["id"]) > 0, body
    return body["id"]


def assert_error(response: Any, status: int, error: str | None = None) -> dict[str, Any]:
    """The one error shape: JSON {"error", "message"} (+ "fields" for 422), and nothing else.
    `error`, when given, is the exact machine-readable code. Returns the body."""
    actual, mimetype, body, text = _response_parts(response)
    assert actual == status, text
    assert mimetype == "application/json", mimetype
    assert isinstance(body, dict), text
    expected = {"error", "message"} | ({"fields"} if status == 422 else set())
    assert set(body) == expected, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    if error is not None:
        assert body["error"] == error, body
    if status == 422:
        assert isinstance(body["fields"], list) and body["fields"], body
        assert all(isinstance(f, str) and (f == "" or f.startswith("/")) for f in body["fields"]), body
    return dict(body)


def assert_unauthorized(response: Any) -> bytes:
    """401 with the one body whatever part failed, and a `WWW-Authenticate` challenge; returns the raw body."""
    assert assert_error(response, 401, "unauthorized") == UNAUTHORIZED_BODY
    assert response.headers.get("WWW-Authenticate")
    raw = response.get_data() if hasattr(response, "get_data") else response.content
    return bytes(raw)


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
