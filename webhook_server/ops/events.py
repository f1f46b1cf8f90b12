"""What `webhook-server events` and `events show` read: stored events, newest first, and one whole.

Read-only: nothing here writes to the store. The JSON objects are the contract's: `events`
prints the event JSON; `events show` adds `content_type`, `headers`, `body_base64` and
`deliveries` (each with `channel`, `recipient`, `state`, `tries`, `last_error`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from webhook_server.store.base import EventStore
from webhook_server.store.records import StoredEvent, event_from_row, iso_utc

DURATION = re.compile(r"^([0-9]{1,9})([smhd])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Since:
    """`--since`: after an event id, or received within a duration."""

    after_id: int | None = None
    received_after: str | None = None  # ISO 8601 UTC, compared as text like the column


def duration_seconds(value: str) -> int:
    """A DURATION such as 90s, 15m, 2h, 7d in seconds; ValueError otherwise."""
    match = DURATION.match(value.strip())
    if match is None:
        raise ValueError("expected a duration such as 90s, 15m, 2h or 7d")
    return int(match[1]) * SECONDS[match[2]]


def parse_since(value: str, now: float | None = None) -> Since:
    """An id (digits) or a duration such as 90s, 15m, 2h, 7d; ValueError otherwise."""
    if value.isascii() and value.isdigit():
        return Since(after_id=int(value))
    try:
        start = (time.time() if now is None else now) - duration_seconds(value)
    except ValueError:
        raise ValueError("expected an event id or a duration such as 90s, 15m, 2h or 7d") from None
    return Since(received_after=iso_utc(start))


def list_events(store: EventStore, source: str | None, since: Since, limit: int) -> list[tuple[StoredEvent, str]]:
    """(event, notification state), newest first."""
    clauses: list[str] = ["1 = 1"]
    params: list[str | int] = []
    if source is not None:
        clauses.append("source = ?")
        params.append(source)
    if since.after_id is not None:
        clauses.append("id > ?")
        params.append(since.after_id)
    if since.received_after is not None:
        clauses.append("received_at >= ?")
        params.append(since.received_after)
    where = " AND ".join(clauses)
    rows = (
        store.connection()
        .execute(f"SELECT * FROM events WHERE {where} ORDER BY id DESC LIMIT ?", (*params, limit))  # noqa: S608
        .fetchall()
    )
    return [(event_from_row(row), notification_state(store, row["id"], row["dispatched"])) for row in rows]


def deliveries(store: EventStore, event_id: int) -> list[dict[str, Any]]:
    rows = (
        store.connection()
        .execute(
            "SELECT kind, channel, recipient, status, attempts, last_error FROM deliveries"
            " WHERE event_id = ? ORDER BY id",
            (event_id,),
        )
        .fetchall()
    )
    return [
        {"kind": r[0], "channel": r[1], "recipient": r[2], "state": r[3], "tries": r[4], "last_error": r[5]}
        for r in rows
    ]


def notification_state(store: EventStore, event_id: int, dispatched: int) -> str:
    """waiting (not looked at yet), none (folded into a cool-down, or a source that does not
    notify), else the deliveries': sent, pending, dead, or mixed such as "sent, dead"."""
    if not dispatched:
        return "waiting"
    states = sorted({d["state"] for d in deliveries(store, event_id)})
    return ", ".join(states) if states else "none"


def show(store: EventStore, event_id: int) -> dict[str, Any] | None:
    """One event whole: the event JSON, what was received, and its deliveries."""
    event = store.get_event(event_id)
    if event is None:
        return None
    return {**event.as_dict(raw=True), "deliveries": deliveries(store, event_id)}
