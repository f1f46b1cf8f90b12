"""The application factory: the only place an app is made."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin

from webhook_server import errors
from webhook_server.ingest import audit, ratelimit, views
from webhook_server.live import service as live
from webhook_server.live import sse, websocket
from webhook_server.ops import access, health, metrics_endpoint, openapi, security
from webhook_server.settings import settings_from_environment
from webhook_server.store import extension as store
from webhook_server.store.sqlite import make_private_dir


class NoSession(SessionInterface):
    """Every request gets Flask's null session; no cookie is read or written."""

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        return None

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def shared_secret_key(data_dir: Path) -> str:
    """The key kept in DATA_DIR when FLASK_SECRET_KEY is unset: the same for every worker and
    restart (a key per process would make one worker's cookies invalid in the next)."""
    path = data_dir / "flask-secret-key"
    make_private_dir(data_dir)
    with suppress(FileExistsError):  # the first process to get here writes it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(32))
    for _ in range(100):  # another process may have created it a moment ago and not written yet
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty; delete it and start again")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the web app from `.env`, the environment, then `config` (setting names as keys).

    Raises `ConfigError` when the configuration is incomplete or invalid.
    """
    settings = settings_from_environment(config)
    app = Flask(__name__)
    app.config.update(
        SETTINGS=settings,
        SECRET_KEY=settings.flask_secret_key or shared_secret_key(settings.data_dir),
        # Bodies are read by the webhook view with its own bound; see ingest.body.read_body.
        MAX_CONTENT_LENGTH=None,
        MAX_FORM_MEMORY_SIZE=None,
    )
    # Nothing is kept in a cookie yet: skip opening and saving a session on every request.
    app.session_interface = NoSession()
    app.json.sort_keys = False  # type: ignore[attr-defined]
    errors.init_app(app)
    access.init_app(app, settings.log_level)
    security.init_app(app, settings.trusted_proxies)
    events = store.init_app(app, settings.database_url, settings.database_path, settings.web_threads)
    live.init_app(app, settings, events)
    metrics_endpoint.init_app(app)
    ratelimit.init_app(app, events, settings.redis_url, settings.rate_limit)
    audit.init_app(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(sse.bp)
    app.register_blueprint(websocket.bp)
    return app
