"""`GET /health`: liveness for load balancers, and more detail when system info is enabled."""

from __future__ import annotations

import os
import time

import redis
from flask import Blueprint, Response, current_app, jsonify

from webhook_server import __version__
from webhook_server.settings import Settings
from webhook_server.store.extension import get_store
from webhook_server.store.records import utc_now_iso

bp = Blueprint("health", __name__)
STARTED = time.monotonic()
REDIS_CHECK_SECONDS = 2.0  # a load balancer's probes do not each cost a round trip to Redis
REDIS_TIMEOUT_SECONDS = 0.25


class RedisCheck:
    """Whether REDIS_URL answers a PING, asked at most every REDIS_CHECK_SECONDS (per process).

    Redis being away degrades the rate limits (they let requests through) and the live fan-out
    across replicas (hubs fall back to looking at the store every second); ingest and delivery go
    on, so it makes /health say so, never fail.
    """

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT_SECONDS, socket_timeout=REDIS_TIMEOUT_SECONDS
        )
        self.reachable = False
        self.checked = -REDIS_CHECK_SECONDS

    def __call__(self) -> bool:
        if time.monotonic() - self.checked >= REDIS_CHECK_SECONDS:
            try:
                self.reachable = bool(self.client.ping())
            except redis.RedisError:
                self.reachable = False
            self.checked = time.monotonic()
        return self.reachable


def redis_state(url: str | None) -> str:
    """`reachable`, `unreachable`, or `not configured`."""
    if not url:
        return "not configured"
    check: RedisCheck | None = current_app.extensions.get("webhook_redis_check")
    if check is None:
        check = current_app.extensions["webhook_redis_check"] = RedisCheck(url)
    return "reachable" if check() else "unreachable"


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
            store=store.kind,
            rate_limit_storage="redis" if settings.redis_url else store.kind,
            redis=redis_state(settings.redis_url),
        )
        if healthy:
            body.update(store.counts())
    return jsonify(body), 200 if healthy else 503
