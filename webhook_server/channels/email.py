"""The rich email: a subject naming the event and device, every field in an HTML table with a
plain-text alternative. Only inline styles and no external resources: mail clients strip the
rest, and must not fetch anything."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from webhook_server import values
from webhook_server.channels.text import (
    LONG,
    clean,
    device_label,
    event_data,
    event_name,
    happened_at,
    local_time,
    summary_since,
    window_start,
)
from webhook_server.settings import Settings
from webhook_server.store.records import Notification, StoredEvent

SUBJECT_LIMIT = 150
# A payload may be up to MAX_PAYLOAD_BYTES: cap what one email shows so a huge body cannot
# produce a megabyte message that providers reject or a table no one can read.
VALUE_LIMIT = 2000
FIELD_LIMIT = 200
CELL = "padding:4px 8px;border:1px solid #ccc;text-align:left;vertical-align:top"
MONO = "font-family:monospace;word-break:break-all"


def subject(n: Notification, settings: Settings) -> str:
    """The rich email's subject: "Alert: motion on Storage unit 12"."""
    what = f"{event_name(n.event)} on {device_label(n.event, settings)}"
    if n.kind == "summary":
        since = summary_since(n, settings)
        what = f"Summary: {what} — {n.repeats} more since {since}"
    else:
        what = f"Alert: {what}"
    return clean(what, SUBJECT_LIMIT)


def table(n: Notification, settings: Settings) -> list[tuple[str, str]]:
    """Every field worth showing, as (label, clean value) rows."""
    event, moment = n.event, happened_at(n.event)
    friendly = settings.device_names.get(event.device.lower()) if event.device else None
    device = f"{event.device} ({friendly})" if friendly else event.device
    rows = [
        ("Event", event.event),
        ("Data", event_data(event, VALUE_LIMIT)),
        ("Device", device),
        ("Source", event.source),
        ("Event id", event.id),
        ("Happened (UTC)", _in_utc(moment)),
        ("Received at", event.received_at),
    ]
    if settings.alert_timezone != "UTC":
        rows.insert(6, (f"Happened ({settings.alert_timezone})", local_time(moment, settings, LONG)))
    if n.kind == "summary":
        rows.append(("Repeats", str(n.repeats)))
        rows.append(("Window opened", local_time(window_start(n), settings, LONG)))
    rows.extend(_payload_rows(event))
    return [(clean(label, 100), clean(value, VALUE_LIMIT)) for label, value in rows]


def _in_utc(moment: datetime) -> str:
    try:
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError):
        return moment.isoformat()


def _payload_rows(event: StoredEvent) -> list[tuple[str, Any]]:
    if not isinstance(event.payload, dict):
        return [("payload", event.payload)]
    items = list(event.payload.items())
    rows: list[tuple[str, Any]] = [(f"payload.{key}", value) for key, value in items[:FIELD_LIMIT]]
    if len(items) > FIELD_LIMIT:
        rows.append(("payload", f"… {len(items) - FIELD_LIMIT} more fields not shown"))
    return rows


def text_body(n: Notification, settings: Settings) -> str:
    lines = [subject(n, settings), ""]
    lines.extend(f"{label}: {value}" for label, value in table(n, settings))
    return "\n".join(lines) + "\n"


def html_body(n: Notification, settings: Settings) -> str:
    """A self-contained page: one table, inline styles, no external resources, all escaped."""
    rows = "\n".join(
        f'<tr><th style="{CELL};background:#f4f4f4">{html.escape(label)}</th>'
        f'<td style="{CELL};{MONO}">{html.escape(value)}</td></tr>'
        for label, value in table(n, settings)
    )
    title = html.escape(subject(n, settings))
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
        f"{title}</title></head>\n"
        '<body style="font-family:sans-serif;font-size:14px;color:#222">\n'
        f'<h2 style="font-size:16px;margin:0 0 8px">{title}</h2>\n'
        f'<table style="border-collapse:collapse">\n{rows}\n</table>\n</body></html>\n'
    )


def new_message(n: Notification, settings: Settings) -> EmailMessage:
    message = EmailMessage()  # the default policy refuses line breaks in headers
    message["From"] = settings.smtp.sender if settings.smtp else "webhook-server@localhost"
    if n.recipient != "-":
        message["To"] = values.email_address(n.recipient)  # ValueError: one that would inject headers
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = n.message_id
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to alerts
    # Ids only (digits), so mail filters and operators can tie a message to the store.
    message["X-Webhook-Event-Id"] = n.event.id
    message["X-Webhook-Delivery-Id"] = str(n.delivery_id)
    return message


def render_email(n: Notification, settings: Settings) -> EmailMessage:
    """The rich form: plain text and an HTML table, as multipart/alternative."""
    message = new_message(n, settings)
    message["Subject"] = subject(n, settings)
    message.set_content(text_body(n, settings))
    message.add_alternative(html_body(n, settings), subtype="html")
    return message
