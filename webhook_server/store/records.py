"""What the store holds, as the rest of the program sees it: an event, and a delivery of one."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class StoredEvent:
    """An accepted event as subscribers, notifiers and forwarding targets see it."""

    id: str
    source: str
    received_at: str
    event: str
    device: str
    payload: Any
    client_ip: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "received_at": self.received_at,
            "event": self.event or None,
            "device": self.device or None,
            "payload": self.payload,
        }


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Notification:
    """One delivery of one event to one recipient on one channel, as the worker claimed it."""

    delivery_id: int
    event: StoredEvent
    kind: str  # "alert" or "summary"
    channel: str  # "email", "sms" or "log"
    recipient: str  # an address, or "-" for the log channel without recipients
    repeats: int = 0
    window_start: float | None = None
    attempt: int = 1  # the try this is (1 for the first); the worker counts them

    @property
    def message_id(self) -> str:
        """The same for every try of a delivery, so a resend is recognisably a duplicate."""
        event_id = "".join(c for c in str(self.event.id) if c.isascii() and c.isalnum())[:40]
        return f"<wh-{int(self.delivery_id)}-{event_id or 'x'}@webhook-server>"


def event_from_row(row: sqlite3.Row) -> StoredEvent:
    return StoredEvent(
        id=str(row["id"]),
        source=row["source"],
        received_at=row["received_at"],
        event=row["event"],
        device=row["device"],
        payload=json.loads(row["payload"]),
        client_ip=row["client_ip"],
    )
