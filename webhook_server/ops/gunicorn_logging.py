"""Gunicorn's own logging, adjusted: no access-log work, no empty "Listening at" line.

Apart from `ops.logs` so that only Gunicorn's processes import Gunicorn.
"""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.glogging import Logger as GunicornLogger


class WithoutEmptyListeningLine(logging.Filter):
    """Drop Gunicorn's "Listening at:  (pid)": under reuse_port its master binds nothing, so the
    line names no address; `gunicorn_conf.when_ready` logs one that does."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (record.msg == "Listening at: %s (%s)" and isinstance(args, tuple) and bool(args) and args[0] == "")


class GunicornNoAccessLogger(GunicornLogger):  # type: ignore[misc]
    """Gunicorn's logger without its access log: ours (`_log_request`) records every request.

    Gunicorn builds its access-log line whenever a logging config is given, even with
    `accesslog = None`, and drops it only at the handler: about 6% of a worker's CPU here.
    """

    @property
    def access_log_enabled(self) -> bool:
        return False

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None
