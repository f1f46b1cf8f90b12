"""Notifications: an accepted event as a rich email, a short SMS or a log record, and sending it.

One `Notifier` per channel, chosen from an explicit table (`notifiers`). `send()` returns when the
message was accepted and raises `TemporaryFailure` (retry later) or `PermanentFailure` (dead letter
now) otherwise. Text from a webhook is untrusted: it is cleaned to one line before it reaches a
header, escaped before it reaches HTML, and capped in length everywhere.
"""

from __future__ import annotations

import html
import json
import logging
import smtplib
import socket
import ssl
import unicodedata
from abc import ABC, abstractmethod
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from .config import Settings
from .store import StoredEvent

log = logging.getLogger(__name__)

SMS_LIMIT = 160
SUBJECT_LIMIT = 150
# A payload may be up to MAX_PAYLOAD_BYTES: cap what one email shows so a huge body cannot
# produce a megabyte message that providers reject or a table no one can read.
VALUE_LIMIT = 2000
FIELD_LIMIT = 200
ADDRESS_FORBIDDEN = frozenset(' <>,;"\\()[]')
LONG = "%Y-%m-%d %H:%M:%S %Z"
# Inline styles only: mail clients strip <style> and must not fetch anything.
CELL = "padding:4px 8px;border:1px solid #ccc;text-align:left;vertical-align:top"
MONO = "font-family:monospace;word-break:break-all"


class DeliveryError(Exception):
    """A notification was not delivered."""


class TemporaryFailure(DeliveryError):
    """Worth retrying: connection refused/reset, timeout, TLS failure, SMTP 4xx."""


class PermanentFailure(DeliveryError):
    """Retrying cannot help: SMTP 5xx, a bad address, a message that cannot be built."""


@dataclass(frozen=True)
class Notification:
    """One delivery of one event to one recipient on one channel."""

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


# -- text cleaning --------------------------------------------------------------------------


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


def _fields(event: StoredEvent) -> dict[str, Any]:
    return event.payload if isinstance(event.payload, dict) else {}


def event_name(event: StoredEvent, limit: int = 80) -> str:
    return clean(event.event, limit) or "event"


def event_data(event: StoredEvent, limit: int) -> str:
    """Particle's `data`; for other sources the whole payload, compactly."""
    fields = _fields(event)
    return clean(fields.get("data", event.payload), limit)


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
    return _parse_time(_fields(event).get("published_at")) or _parse_time(event.received_at) or datetime.now(UTC)


def _in_zone(moment: datetime, settings: Settings) -> datetime:
    try:
        return moment.astimezone(ZoneInfo(settings.alert_timezone))
    except (OverflowError, ValueError):  # year 1 or 9999 shifted out of range: show it as given
        return moment


def local_time(moment: datetime, settings: Settings, fmt: str = "%H:%M:%S %Z") -> str:
    return clean(_in_zone(moment, settings).strftime(fmt), 40)


def _window_start(n: Notification) -> datetime:
    if n.window_start is None:
        return happened_at(n.event)
    try:
        return datetime.fromtimestamp(n.window_start, UTC)
    except (OverflowError, OSError, ValueError):
        return happened_at(n.event)


# -- routing --------------------------------------------------------------------------------


def channel_for(settings: Settings, recipient: str) -> str:
    """`log` without SMTP, `sms` for an email-to-SMS gateway, else `email`."""
    if settings.smtp is None:
        return "log"
    return "sms" if settings.is_sms(recipient) else "email"


def targets(settings: Settings, recipients: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(channel, recipient) pairs for one alert; without SMTP or recipients, one log entry."""
    chosen = settings.recipients if recipients is None else recipients
    if settings.smtp is None and not chosen:
        return [("log", "-")]
    return [(channel_for(settings, r), r) for r in dict.fromkeys(chosen)]


# -- rendering ------------------------------------------------------------------------------


def subject(n: Notification, settings: Settings) -> str:
    """The rich email's subject: "Alert: motion on Storage unit 12"."""
    what = f"{event_name(n.event)} on {device_label(n.event, settings)}"
    if n.kind == "summary":
        since = local_time(_window_start(n), settings, "%H:%M")
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
        rows.append(("Window opened", local_time(_window_start(n), settings, LONG)))
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


def sms_text(n: Notification, settings: Settings, budget: int = SMS_LIMIT) -> str:
    """One line: "motion on Storage unit 12 at 18:02:11 EST: data…", at most `budget` characters."""
    event = n.event
    name = event_name(event, 40)
    if n.kind == "summary":
        since = local_time(_window_start(n), settings, "%H:%M")
        name = f"{name} x{n.repeats} since {since}"
    when = local_time(happened_at(event), settings)
    head = f"{name} on {device_label(event, settings, 30)} at {when}"
    room = budget - len(head) - 2
    data = event_data(event, room) if room > 3 else ""
    return clean(f"{head}: {data}" if data else head, budget)


def _message(n: Notification, settings: Settings) -> EmailMessage:
    message = EmailMessage()  # the default policy refuses line breaks in headers
    message["From"] = settings.smtp.sender if settings.smtp else "webhook-server@localhost"
    if n.recipient != "-":
        message["To"] = checked_address(n.recipient)
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = n.message_id
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to alerts
    # Ids only (digits), so mail filters and operators can tie a message to the store.
    message["X-Webhook-Event-Id"] = n.event.id
    message["X-Webhook-Delivery-Id"] = str(n.delivery_id)
    return message


def render_email(n: Notification, settings: Settings) -> EmailMessage:
    """The rich form: plain text and an HTML table, as multipart/alternative."""
    message = _message(n, settings)
    message["Subject"] = subject(n, settings)
    message.set_content(text_body(n, settings))
    message.add_alternative(html_body(n, settings), subtype="html")
    return message


def render_sms(n: Notification, settings: Settings) -> EmailMessage:
    """The SMS form: no subject, plain text only, within 160 characters."""
    message = _message(n, settings)
    # Gateways prepend the subject, so there is none; set_content adds a final newline.
    message.set_content(sms_text(n, settings, SMS_LIMIT - 1))
    return message


def checked_address(address: str) -> str:
    """The address, or PermanentFailure when it could never be delivered or would inject headers."""
    local, at, domain = address.rpartition("@")
    if (
        not (local and at and domain)
        or len(address) > 254
        or any(c in ADDRESS_FORBIDDEN or not c.isprintable() for c in address)
    ):
        raise PermanentFailure(f"not a usable email address: {clean(address, 80)!r}")
    return address


# -- notifiers ------------------------------------------------------------------------------


class Notifier(ABC):
    """One way out. Metadata as class attributes, settings checked in `__init__`, one `send()`."""

    name: ClassVar[str]
    channels: ClassVar[tuple[str, ...]]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def send(self, notification: Notification) -> None:
        """Return once delivered; raise TemporaryFailure or PermanentFailure otherwise."""


class EmailNotifier(Notifier):
    """Email and email-to-SMS over SMTP: one connection and one recipient per message."""

    name = "smtp"
    channels = ("email", "sms")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        if settings.smtp is None:
            raise ValueError("EmailNotifier needs SMTP settings")
        self.smtp = settings.smtp
        self.tls = ssl.create_default_context(cafile=self.smtp.ca_file)
        # smtplib would look the FQDN up (a reverse DNS query) on every connection.
        self.local_hostname = socket.getfqdn()

    def send(self, notification: Notification) -> None:
        recipient = checked_address(notification.recipient)
        render = render_sms if notification.channel == "sms" else render_email
        try:
            message = render(notification, self.settings)
        except (ValueError, TypeError) as exc:  # a message that cannot be built never will be
            raise PermanentFailure(f"cannot build the message: {exc}") from exc
        try:
            self._transmit(message, recipient)
        except (OSError, smtplib.SMTPException) as exc:
            raise classify(exc) from exc

    def _connect(self) -> smtplib.SMTP:
        host, port, timeout = self.smtp.host, self.smtp.port, self.smtp.timeout
        if self.smtp.security == "ssl":
            return smtplib.SMTP_SSL(host, port, self.local_hostname, timeout=timeout, context=self.tls)
        return smtplib.SMTP(host, port, self.local_hostname, timeout=timeout)

    def _transmit(self, message: EmailMessage, recipient: str) -> None:
        client = self._connect()
        try:
            if self.smtp.security == "starttls":
                client.starttls(context=self.tls)
            if self.smtp.password:
                client.login(self.smtp.username or self.smtp.sender, self.smtp.password)
            client.send_message(message, from_addr=self.smtp.sender, to_addrs=[recipient])
        finally:
            with suppress(smtplib.SMTPException, OSError):
                client.quit()
            client.close()


class LogNotifier(Notifier):
    """No SMTP configured: the notification goes to the log, so a first run needs no account."""

    name = "log"
    channels = ("log",)

    def send(self, notification: Notification) -> None:
        n, settings = notification, self.settings
        sms = n.recipient != "-" and settings.is_sms(n.recipient)
        text = sms_text(n, settings) if sms else text_body(n, settings)
        to = "" if n.recipient == "-" else f" for {clean(n.recipient, 254)}"
        log.info(
            "%s %s%s, written here because no SMTP is set (SMTP_EMAIL or SMTP_HOST):\n%s",
            n.kind,
            n.delivery_id,
            to,
            text,
        )


NOTIFIERS: dict[str, type[Notifier]] = {
    "email": EmailNotifier,
    "sms": EmailNotifier,
    "log": LogNotifier,
}


def notifiers(settings: Settings) -> dict[str, Notifier]:
    """Channel name -> notifier. Without SMTP every channel logs, so queued mail is not stuck."""
    log_notifier = LogNotifier(settings)
    if settings.smtp is None:
        return dict.fromkeys(NOTIFIERS, log_notifier)
    mail = EmailNotifier(settings)  # one instance for both channels: one TLS context
    return {name: mail if cls is EmailNotifier else log_notifier for name, cls in NOTIFIERS.items()}


# -- failures -------------------------------------------------------------------------------


def _by_code(code: int, text: str) -> DeliveryError:
    if 500 <= code < 600:
        return PermanentFailure(text)
    return TemporaryFailure(text)


def _reply(code: int, message: bytes | str) -> str:
    raw = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"SMTP {code} {clean(raw, 200)}"


def classify(exc: BaseException) -> DeliveryError:
    """Temporary (retry) or permanent (dead letter now), from what the server or network said."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, message = next(iter(exc.recipients.values()), (451, b"refused"))
        return _by_code(code, _reply(code, message))
    if isinstance(exc, smtplib.SMTPConnectError | smtplib.SMTPServerDisconnected):
        return TemporaryFailure(f"{type(exc).__name__}: {clean(str(exc), 200)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        return _by_code(exc.smtp_code, _reply(exc.smtp_code, exc.smtp_error))
    if isinstance(exc, smtplib.SMTPException):
        # No STARTTLS or AUTH offered, no usable AUTH method: the configuration must change.
        return PermanentFailure(f"{type(exc).__name__}: {clean(str(exc), 200)}")
    # OSError: refused, reset, unreachable, timeouts, TLS handshake and certificate errors.
    return TemporaryFailure(f"{type(exc).__name__}: {clean(str(exc), 200) or 'network error'}")
