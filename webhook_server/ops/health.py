"""`GET /health`: liveness for load balancers, and more detail when system info is enabled."""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response, current_app, jsonify

from webhook_server import __version__
from webhook_server.settings import Settings
from webhook_server.store.extension import get_store
from webhook_server.store.records import utc_now_iso

bp = Blueprint("health", __name__)
STARTED = time.monotonic()


@bp.get("/health")
def health() -> tuple[Response, int]:
    settings: Settings = current_app.config["SETTINGS"]
    store = get_store()
    healthy = store.ping()
    body: dict[str, object] = {"status": "healthy" if healthy else "unhealthy", "timestamp": utc_now_iso()}
    if not settings.disable_system_info:
        body.update(
            version=__version__,
            pid=os.getpid(),
            uptime_seconds=round(time.monotonic() - STARTED, 1),
            sources=sorted(settings.sources),
            notifications="email" if settings.smtp else "log",
            rate_limit_storage="redis" if settings.redis_url else "sqlite",
        )
        if healthy:
            body.update(store.counts())
    return jsonify(body), 200 if healthy else 503
