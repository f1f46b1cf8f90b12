"""Auditing the way in: every request to a webhook endpoint leaves a record (`store.audit`).

An accepted one is written by the view in its event's own transaction (`accepted_writer`);
any other answer under /webhook (404, 405, 413, 401, 415, 400, 422, 403, 429, 503) is
written after the response is made, folded with identical refusals, in the transaction that
also counts it against the rate limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from flask import Flask, Response, g, request

from webhook_server.store.audit import AuditRecord, record
from webhook_server.store.base import STORE_ERRORS, Connection
from webhook_server.store.extension import get_store

log = logging.getLogger(__name__)

REDELIVERY = "redelivery of an event already stored"


def is_webhook_path(path: str) -> bool:
    return path == "/webhook" or path.startswith("/webhook/")


def elapsed_ms(started: float | None) -> float:
    """Milliseconds since `started` (the access log's `g.started`), 0 when it is unknown."""
    return round((time.perf_counter() - started) * 1000, 3) if started is not None else 0.0


def current_record(status: int) -> AuditRecord:
    """This request's record so far: the view and the error handler have put what they know in `g`."""
    return AuditRecord(
        at=time.time(),
        source=g.get("source_name"),
        client=request.remote_addr,
        status=status,
        reason=g.get("reason"),
        duration_ms=elapsed_ms(g.get("started")),
        key=g.get("key"),
    )


def _kept(conn: Connection, entry: AuditRecord) -> None:
    """Write `entry`; a record that cannot be written must not cost the request its answer."""
    try:
        record(conn, entry)
    except STORE_ERRORS:
        # The error ended the whole transaction (PostgreSQL does on any error): let it fail; the
        # event is then stored without its record (store.base.EventStore.insert_event).
        if not conn.in_transaction:
            raise
        log.warning("audit record not written", exc_info=True)


def accepted_writer() -> Callable[[Connection, str, bool], None]:
    """What writes this request's record in its event's transaction, once the event has an id."""
    entry = current_record(202)
    started = g.get("started")

    def write(conn: Connection, event_id: str, created: bool) -> None:
        status, reason = (202, None) if created else (200, REDELIVERY)
        # Timed here, in the transaction: the wait for the store's write lock is handling time too.
        spent = elapsed_ms(started)
        _kept(conn, replace(entry, status=status, reason=reason, event_id=event_id, duration_ms=spent))

    return write


def _record_refusal(response: Response) -> Response:
    if g.get("audited") or not is_webhook_path(request.path):
        return response
    entry = current_record(response.status_code)
    hit = g.pop("hit", None)
    count = hit.refused_counter() if hit is not None else None

    def write(conn: Connection) -> None:
        _kept(conn, entry)
        if count is not None:
            count(conn)

    try:
        get_store().writer.run(write)
    except STORE_ERRORS as exc:  # the store is down (this request may well be its 503)
        log.warning("audit record of a %s not written: %s", response.status_code, exc)
    return response


def init_app(app: Flask) -> None:
    """Record every answer under /webhook that the view did not record with its event."""
    app.after_request(_record_refusal)
