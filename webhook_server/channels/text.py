"""Webhook text made safe to show, and what an event says: its name, data, device and time.

Text from a webhook is untrusted: it is cleaned to one line before it reaches a header,
escaped before it reaches HTML (channels.email), and capped in length everywhere.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from webhook_server.settings import Settings
from webhook_server.store.records import Notification, StoredEvent

LONG = "%Y-%m-%d %H:%M:%S %Z"


def _safe_char(ch: str) -> str:
    if ch.isprintable():
        return ch
    category = unicodedata.category(ch)
    if category in ("Cc", "Zl", "Zp", "Zs"):  # line breaks, tabs, NUL, NEL, U+2028/9 ...
        return " "
    if category == "Cs":  # a lone surrogate cannot be encoded at all
        return "\ufffd"
    if category == "Cf":  # invisible: bidi overrides, zero-width characters
        return ""
    return ch


def clean(value: Any, limit: int) -> str:
    """`value` as one line of safe display text, at most `limit` characters (with … when cut)."""
    text = value if isinstance(value, str) else _json(value)
    head = text[: limit * 2 + 64]  # bounds the work on huge input; the rest is cut anyway
    line = " ".join("".join(_safe_char(c) for c in head).split())
    if len(line) > limit or len(head) < len(text):
        return line[: max(limit - 1, 0)].rstrip() + "…" if limit > 0 else ""
    return line


def _json(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


# -- what an event says -----------------------------------------------------------------------


def payload_fields(event: StoredEvent) -> dict[str, Any]:
    return event.payload if isinstance(event.payload, dict) else {}


def event_name(event: StoredEvent, limit: int = 80) -> str:
    return clean(event.event, limit) or "event"


def event_data(event: StoredEvent, limit: int) -> str:
    """Particle's `data`; for other sources the whole payload, compactly."""
    return clean(payload_fields(event).get("data", event.payload), limit)


def device_label(event: StoredEvent, settings: Settings, limit: int = 60) -> str:
    """The friendly name for the device, else its id, else the source."""
    friendly = settings.device_names.get(event.device.lower()) if event.device else None
    return clean(friendly or event.device or event.source, limit) or "unknown"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def happened_at(event: StoredEvent) -> datetime:
    """Particle's `published_at` when present and valid, else the time received."""
    return _parse_time(payload_fields(event).get("published_at")) or _parse_time(event.received_at) or datetime.now(UTC)


def _in_zone(moment: datetime, settings: Settings) -> datetime:
    try:
        return moment.astimezone(ZoneInfo(settings.alert_timezone))
    except (OverflowError, ValueError):  # year 1 or 9999 shifted out of range: show it as given
        return moment


def local_time(moment: datetime, settings: Settings, fmt: str = "%H:%M:%S %Z") -> str:
    return clean(_in_zone(moment, settings).strftime(fmt), 40)


def window_start(n: Notification) -> datetime:
    if n.window_start is None:
        return happened_at(n.event)
    try:
        return datetime.fromtimestamp(n.window_start, UTC)
    except (OverflowError, OSError, ValueError):
        return happened_at(n.event)


def summary_since(n: Notification, settings: Settings) -> str:
    """When a summary's window opened, as "18:02" in ALERT_TIMEZONE."""
    return local_time(window_start(n), settings, "%H:%M")
