"""Logs: one JSON object per line on stderr/stdout, never a secret or a whole payload."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, request
from gunicorn.glogging import Logger as GunicornLogger

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...extra fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send the root logger's records to stdout as JSON lines (idempotent; other handlers stay)."""
    # Our lines carry none of the caller's file and line, thread or process names: skip
    # collecting them on every record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "_webhook_server", False)]
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler._webhook_server = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_log = logging.getLogger("webhook_server.access")


def outcome_for(status: int) -> str:
    """The same outcome names as the metrics use (unauthorized, too_large, ...)."""
    from .metrics import OUTCOMES

    return OUTCOMES.get(status) or ("error" if status >= 400 else "ok")


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
            "duration_ms": round(duration_ms, 2),
        },
    )
    return response


def init_app(app: Flask, level: str) -> None:
    """JSON logs for this process, and one access line per request with its id and timing."""
    configure_logging(level)
    app.before_request(_start_request)
    app.after_request(_log_request)


class GunicornNoAccessLogger(GunicornLogger):  # type: ignore[misc]
    """Gunicorn's logger without its access log: ours (`_log_request`) records every request.

    Gunicorn builds its access-log line whenever a logging config is given, even with
    `accesslog = None`, and drops it only at the handler: about 6% of a worker's CPU here.
    """

    @property
    def access_log_enabled(self) -> bool:
        return False
