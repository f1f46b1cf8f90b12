"""`GET /metrics` and the per-request counts: the web side of `ops.metrics`.

Access (the contract): ``DISABLE_SYSTEM_INFO=true`` hides the endpoint (404) unless
``METRICS_TOKEN`` is set and presented as ``Authorization: Bearer``; when ``METRICS_TOKEN`` is
set it is required (401 without it, or 404 under ``DISABLE_SYSTEM_INFO=true``).
"""

from __future__ import annotations

import hmac
import logging
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from webhook_server.auth import bearer_token
from webhook_server.errors import BadCredentials, outcome_for
from webhook_server.ops.metrics import CONTENT_TYPE, render, web_metrics
from webhook_server.settings import Settings
from webhook_server.store.extension import get_store

log = logging.getLogger(__name__)

WEBHOOK_BLUEPRINT = "webhooks"
# OPTIONS too, or Flask would answer it itself (200) even where /metrics is hidden.
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

bp = Blueprint("metrics", __name__)


def check_access(settings: Settings) -> None:
    """404 when hidden, 405 for another method, 401 without the token when one is set."""
    token = settings.metrics_token
    given = bearer_token(request.headers)
    valid = token is not None and given is not None and hmac.compare_digest(given.encode(), token.encode())
    if settings.disable_system_info and not valid:
        raise NotFound()
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
    if token is not None and not valid:
        raise BadCredentials("wrong or missing METRICS_TOKEN")


@bp.route("/metrics", methods=ALL_METHODS)
def metrics() -> Response:
    settings: Settings = current_app.config["SETTINGS"]
    check_access(settings)
    return Response(render(get_store()), mimetype=None, content_type=CONTENT_TYPE)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _source_label() -> str:
    """The source that answered, bounded to enabled sources (never a name from the URL)."""
    name = g.get("source_name")  # set by the view once it knows the source
    return name if isinstance(name, str) else "unknown"


def _count_webhook(response: Response) -> Response:
    if request.blueprint != WEBHOOK_BLUEPRINT:
        return response
    try:
        outcome = g.get("outcome") or outcome_for(response.status_code)
        instruments = web_metrics()
        instruments.requests.labels(_source_label(), outcome).inc()
        started = g.get("metrics_started")
        if request.method == "POST" and started is not None:
            instruments.ack_seconds.observe(time.perf_counter() - started)
    except Exception:  # a stored event must never get a 500 because of metrics
        log.warning("could not record a request metric", exc_info=True)
    return response


def init_app(app: Flask) -> None:
    """The /metrics endpoint and the per-request counts (429s included: the view decides them)."""
    web_metrics()
    app.before_request(_start_timer)
    app.after_request(_count_webhook)
    app.register_blueprint(bp)
