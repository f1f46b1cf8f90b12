"""Notifications: the channel base class, one short class per channel, and the table of them.

Each `Notifier` holds its metadata as class attributes, checks its settings in `__init__` and
has one `send()`, which returns when the message was accepted and raises `TemporaryFailure`
(retry later) or `PermanentFailure` (dead letter now) otherwise. The work of each channel
(rendering, transport) is in `webhook_server.channels`; `NOTIFIERS` names every channel.
"""

from __future__ import annotations

import logging
import smtplib
from abc import ABC, abstractmethod
from typing import ClassVar

from webhook_server import values
from webhook_server.channels.email import render_email, text_body
from webhook_server.channels.http import HttpTransport, request_for
from webhook_server.channels.sms import is_sms_gateway, render_sms, sms_text
from webhook_server.channels.smtp import SmtpTransport
from webhook_server.channels.text import clean
from webhook_server.settings import Settings
from webhook_server.store.records import Notification

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """A notification was not delivered."""


class TemporaryFailure(DeliveryError):
    """Worth retrying: connection refused/reset, timeout, TLS failure, SMTP 4xx, HTTP 429 or 5xx.

    `retry_after`: the seconds the far end asked to wait (an HTTP Retry-After), if it did.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentFailure(DeliveryError):
    """Retrying cannot help: SMTP 5xx, a bad address, a message that cannot be built."""


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
    """Email and email-to-SMS over SMTP: the rich form, or the SMS form for a gateway."""

    name = "smtp"
    channels = ("email", "sms")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        if settings.smtp is None:
            raise ValueError("EmailNotifier needs SMTP settings")
        self.transport = SmtpTransport(settings.smtp)

    def send(self, notification: Notification) -> None:
        recipient = checked_address(notification.recipient)
        render = render_sms if notification.channel == "sms" else render_email
        try:
            message = render(notification, self.settings)
        except (ValueError, TypeError) as exc:  # a message that cannot be built never will be
            raise PermanentFailure(f"cannot build the message: {exc}") from exc
        try:
            self.transport.transmit(message, recipient)
        except (OSError, smtplib.SMTPException) as exc:
            raise classify(exc) from exc


class LogNotifier(Notifier):
    """No SMTP configured: the notification goes to the log, so a first run needs no account."""

    name = "log"
    channels = ("log",)

    def send(self, notification: Notification) -> None:
        n, settings = notification, self.settings
        sms = n.recipient != "-" and is_sms_gateway(n.recipient)
        text = sms_text(n, settings) if sms else text_body(n, settings)
        to = "" if n.recipient == "-" else f" for {clean(n.recipient, 254)}"
        log.info(
            "%s %s%s, written here because no SMTP is set (SMTP_EMAIL or SMTP_HOST):\n%s",
            n.kind,
            n.delivery_id,
            to,
            text,
        )


class HttpForwarder(Notifier):
    """Forwarding to SOURCES_FILE's targets: a signed (optionally encrypted) POST per delivery,
    whose recipient is the target's name."""

    name = "http"
    channels = ("http",)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # Targets may share a host: room for every target's sends in the pool of one host.
        self.transport = HttpTransport(FORWARDS_PER_TARGET * max(1, len(settings.targets)))

    def send(self, notification: Notification) -> None:
        target = self.settings.targets.get(notification.recipient)
        if target is None:
            raise PermanentFailure(f"no target named {notification.recipient} is configured now")
        try:
            body, headers = request_for(target, notification.event, notification.delivery_id)
        except Exception as exc:  # an unusable key or body: trying again cannot help
            raise PermanentFailure(f"the request could not be made ({type(exc).__name__})") from None
        outcome = self.transport.post(target, body, headers)
        if outcome.delivered:
            return
        if outcome.temporary:
            raise TemporaryFailure(outcome.error, outcome.retry_after)
        raise PermanentFailure(outcome.error)


NOTIFIERS: dict[str, type[Notifier]] = {
    "email": EmailNotifier,
    "sms": EmailNotifier,
    "log": LogNotifier,
    "http": HttpForwarder,
}
# Sends in flight to one forwarding target at most (1 for an ordered one): a slow target holds
# only its own.
FORWARDS_PER_TARGET = 4


def notifiers(settings: Settings) -> dict[str, Notifier]:
    """Channel name -> notifier. Without SMTP the mail channels log, so queued mail is not stuck."""
    made: dict[type[Notifier], Notifier] = {LogNotifier: LogNotifier(settings), HttpForwarder: HttpForwarder(settings)}
    if settings.smtp is not None:
        made[EmailNotifier] = EmailNotifier(settings)  # one instance for both channels: one TLS context
    return {name: made.get(cls, made[LogNotifier]) for name, cls in NOTIFIERS.items()}


# -- which channel, for whom ------------------------------------------------------------------


def channel_for(settings: Settings, recipient: str) -> str:
    """`log` without SMTP, `sms` for an email-to-SMS gateway, else `email`."""
    if settings.smtp is None:
        return "log"
    return "sms" if is_sms_gateway(recipient) else "email"


def targets(settings: Settings, recipients: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(channel, recipient) pairs for one alert; without SMTP or recipients, one log entry."""
    chosen = settings.recipients if recipients is None else recipients
    if settings.smtp is None and not chosen:
        return [("log", "-")]
    return [(channel_for(settings, r), r) for r in dict.fromkeys(chosen)]


def checked_address(address: str) -> str:
    """The address, or PermanentFailure when it could never be delivered or would inject headers."""
    try:
        return values.email_address(address)
    except ValueError:
        raise PermanentFailure(f"not a usable email address: {clean(address, 80)!r}") from None


# -- failures -------------------------------------------------------------------------------


def _by_code(code: int, text: str) -> DeliveryError:
    return PermanentFailure(text) if 500 <= code < 600 else TemporaryFailure(text)


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
