"""What the store holds, as the rest of the program sees it: an event, and a delivery of one."""

from __future__ import annotations

import base64
import json
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Received:
    """A request as it arrived, kept so that its event can be re-sent byte for byte."""

    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]  # the sender's, without credentials or transport headers

    def as_dict(self) -> dict[str, Any]:
        return {
            "content_type": self.content_type,
            "headers": [list(pair) for pair in self.headers],
            "body_base64": base64.b64encode(self.body).decode("ascii"),
        }


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
    received: Received | None = None
    # Encoded once however many subscribers get it (see `encoded`); not part of the event.
    _encoded: dict[bool, str] = field(default_factory=dict, compare=False, repr=False)

    def encoded(self, raw: bool = False) -> str:
        """`as_dict(raw)` as compact JSON text, made once per event and kept."""
        text = self._encoded.get(raw)
        if text is None:
            text = self._encoded[raw] = json.dumps(self.as_dict(raw), ensure_ascii=False, separators=(",", ":"))
        return text

    def as_dict(self, raw: bool = False) -> dict[str, Any]:
        """The event JSON of the contract; `raw` adds what was received (content type, headers, body)."""
        document = {
            "id": self.id,
            "source": self.source,
            "received_at": self.received_at,
            "event": self.event or None,
            "device": self.device or None,
            "payload": self.payload,
        }
        if raw:
            document.update(self.received.as_dict() if self.received else NOT_KEPT)
        return document


# What `as_dict(raw=True)` says of an event stored before raw bodies were kept.
NOT_KEPT: dict[str, Any] = {"content_type": None, "headers": [], "body_base64": None}


def iso_utc(at: float, timespec: str = "microseconds") -> str:
    """Seconds since the epoch as events' `received_at` is written (so text order is time order)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


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
    keys = row.keys()
    received = None
    if "body" in keys and row["body"] is not None:
        pairs = tuple((str(name), str(value)) for name, value in json.loads(row["headers"] or "[]"))
        received = Received(bytes(row["body"]), row["content_type"] or "", pairs)
    return StoredEvent(
        id=str(row["id"]),
        source=row["source"],
        received_at=row["received_at"],
        event=row["event"],
        device=row["device"],
        payload=json.loads(row["payload"]),
        client_ip=row["client_ip"],
        received=received,
    )
