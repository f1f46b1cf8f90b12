"""One access log line per request: its id, client, status, outcome, reason and timing."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

from webhook_server.errors import outcome_for
from webhook_server.ops.logs import configure_logging

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_log = logging.getLogger("webhook_server.access")


def _start_request() -> None:
    g.started = time.perf_counter()
    given = request.headers.get("X-Request-Id", "")
    g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex


def _log_request(response: Response) -> Response:
    duration_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    response.headers["X-Request-Id"] = g.get("request_id", "")
    access_log.info(
        "%s %s %s",
        request.method,
        request.path[:200],
        response.status_code,
        extra={
            "request_id": g.get("request_id"),
            "client": request.remote_addr,
            "method": request.method,
            "path": request.path[:200],
            "status": response.status_code,
            "source": g.get("source_name"),
            "outcome": g.get("outcome") or outcome_for(response.status_code),
            "event_id": g.get("event_id"),
            # Why it was refused (errors.reason_of): the response never says, the log does.
            "reason": g.get("reason"),
            "duration_ms": round(duration_ms, 2),
        },
    )
    return response


def init_app(app: Flask, level: str) -> None:
    """JSON logs for this process, and one access line per request with its id and timing."""
    configure_logging(level)
    app.before_request(_start_request)
    app.after_request(_log_request)
