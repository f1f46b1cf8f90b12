"""The application factory: the only place an app is made."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin

from . import errors, health, logs, metrics, openapi, ratelimit, security, store, webhooks
from .config import settings_from_environment


class NoSession(SessionInterface):
    """Every request gets Flask's null session; no cookie is read or written."""

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        return None

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the web app from `.env`, the environment, then `config` (setting names as keys).

    Raises `ConfigError` when the configuration is incomplete or invalid.
    """
    settings = settings_from_environment(config)
    app = Flask(__name__)
    app.config.update(
        SETTINGS=settings,
        SECRET_KEY=settings.flask_secret_key or secrets.token_urlsafe(32),
        # Bodies are read by the webhook view with its own bound; see webhooks.read_body.
        MAX_CONTENT_LENGTH=None,
        MAX_FORM_MEMORY_SIZE=None,
    )
    # Nothing is kept in a cookie yet: skip opening and saving a session on every request.
    app.session_interface = NoSession()
    app.json.sort_keys = False  # type: ignore[attr-defined]
    errors.init_app(app)
    logs.init_app(app, settings.log_level)
    security.init_app(app, settings.trusted_proxies)
    store.init_app(app, settings.database_path)
    metrics.init_app(app)
    ratelimit.init_app(app, ratelimit.storage_uri(settings.database_path, settings.redis_url), settings.rate_limit)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    return app
