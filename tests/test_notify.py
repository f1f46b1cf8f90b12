"""Notifications rendered and sent through a real SMTP server (tests/smtpsink.py); no mocks."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.smtpsink import SmtpSink, make_self_signed_cert
from webhook_server.notify import (
    EmailNotifier,
    HttpForwarder,
    LogNotifier,
    Notification,
    PermanentFailure,
    TemporaryFailure,
    channel_for,
    clean,
    notifiers,
    render_email,
    render_sms,
    targets,
)
from webhook_server.settings import Settings, load_settings
from webhook_server.store.records import StoredEvent

CORE = "0123456789abcdef01234567"
PUBLISHED = "2026-11-23T18:02:11.000Z"  # 13:02:11 EST in New York
EMAIL, SMS = "a@example.com", "5551234567@vtext.com"
USER, PASSWORD = "alerts@example.com", "app-password"
WINDOW_START = datetime(2026, 11, 23, 18, 0, 5, tzinfo=UTC).timestamp()  # 13:00 in New York

INJECTIONS = [
    "motion\r\nBcc: evil@example.com",
    "motion\nBcc: evil@example.com",
    "motion\rBcc: evil@example.com",
    "motion\n\nbody injected",
    "motion\u2028Bcc: evil@example.com\u2029",
    "motion\x85Bcc: evil@example.com",
    "motion\x00\x1b[31m\x7f\x0b\x0c\tBcc: evil@example.com",
    "motion\u202e\u200bBcc:\u00a0evil@example.com",
    "motion\ud800 lone surrogate",
]


# -- helpers and fixtures ---------------------------------------------------------------------


def make_event(**changes: Any) -> StoredEvent:
    payload = {"event": "motion", "data": "front door", "coreid": CORE, "published_at": PUBLISHED}
    payload.update(changes.pop("payload", {}))
    fields: dict[str, Any] = {
        "id": "42",
        "source": "particle",
        "received_at": "2026-11-23T18:02:12.345678Z",
        "event": "motion",
        "device": CORE,
        "payload": payload,
    }
    fields.update(changes)
    return StoredEvent(**fields)


def note(event: StoredEvent | None = None, channel: str = "email", recipient: str = EMAIL, **kw: Any) -> Notification:
    return Notification(
        delivery_id=kw.pop("delivery_id", 7),
        event=event or make_event(),
        kind=kw.pop("kind", "alert"),
        channel=channel,
        recipient=recipient,
        **kw,
    )


def make_settings(tmp_path: Path, sink: SmtpSink | None = None, **env: str | None) -> Settings:
    values: dict[str, str | None] = {
        "PARTICLE_WEBHOOK_SECRET": "x" * 20,
        "RECIPIENT_EMAIL": f"{EMAIL},{SMS}",
        "DATA_DIR": str(tmp_path),
        "DEVICE_NAMES": f"{CORE}:Storage unit 12",
        "ALERT_TIMEZONE": "America/New_York",
    }
    if sink is not None:
        values.update(SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port), SMTP_SECURITY="none", SMTP_TIMEOUT="5")
    values.update(env)
    return load_settings({k: v for k, v in values.items() if v is not None})


def sms_length(message: EmailMessage) -> int:
    body = message.get_content().rstrip("\r\n")
    assert isinstance(body, str)
    return len(message["Subject"] or "") + len(body)


def html_part(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def text_part(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_self_signed_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def settings(tmp_path: Path, sink: SmtpSink) -> Settings:
    return make_settings(tmp_path, sink)


# -- transports: plain, STARTTLS, SSL, AUTH -------------------------------------------------


def test_plain_smtp_sends_one_message_per_recipient(sink: SmtpSink, settings: Settings) -> None:
    mailer = notifiers(settings)
    for number, (channel, recipient) in enumerate(targets(settings), start=1):
        mailer[channel].send(note(channel=channel, recipient=recipient, delivery_id=number))
    first, second = sink.wait_for(2)
    assert [rcpts for _, rcpts, _ in sink.envelopes] == [[EMAIL], [SMS]]
    assert first["To"] == EMAIL and second["To"] == SMS
    assert first["From"] == second["From"] == settings.smtp.sender  # type: ignore[union-attr]
    assert first["Message-ID"] == "<wh-1-42@webhook-server>"
    assert first["Date"] is not None and first["Auto-Submitted"] == "auto-generated"


def test_starttls_with_a_private_ca(tmp_path: Path, cert: tuple[str, str]) -> None:
    with SmtpSink(starttls_cert=cert) as sink:  # the sink refuses mail before STARTTLS
        settings = make_settings(tmp_path, sink, SMTP_SECURITY="starttls", SMTP_CA_FILE=cert[0])
        EmailNotifier(settings).send(note())
        assert sink.wait_for(1)[0]["Subject"] == "Alert: motion on Storage unit 12"


def test_starttls_with_an_untrusted_certificate_is_temporary(tmp_path: Path, cert: tuple[str, str]) -> None:
    with SmtpSink(starttls_cert=cert) as sink:
        settings = make_settings(tmp_path, sink, SMTP_SECURITY="starttls")
        with pytest.raises(TemporaryFailure, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            EmailNotifier(settings).send(note())
        assert sink.messages == []


def test_plain_client_against_a_server_requiring_starttls_is_refused(tmp_path: Path, cert: tuple[str, str]) -> None:
    with SmtpSink(starttls_cert=cert) as sink:
        with pytest.raises(PermanentFailure, match="530"):
            EmailNotifier(make_settings(tmp_path, sink)).send(note())
        assert sink.messages == []


def test_implicit_tls(tmp_path: Path, cert: tuple[str, str]) -> None:
    with SmtpSink(ssl_cert=cert, require_auth=(USER, PASSWORD)) as sink:
        settings = make_settings(
            tmp_path, sink, SMTP_SECURITY="ssl", SMTP_CA_FILE=cert[0],
            SMTP_EMAIL=USER, SMTP_PASSWORD=PASSWORD,
        )  # fmt: skip
        EmailNotifier(settings).send(note())
        assert sink.wait_for(1)[0]["From"] == USER


def test_auth_with_the_right_password(tmp_path: Path, cert: tuple[str, str]) -> None:
    with SmtpSink(starttls_cert=cert, require_auth=(USER, PASSWORD)) as sink:
        settings = make_settings(
            tmp_path, sink, SMTP_SECURITY="starttls", SMTP_CA_FILE=cert[0],
            SMTP_EMAIL=USER, SMTP_PASSWORD=PASSWORD,
        )  # fmt: skip
        EmailNotifier(settings).send(note())
        assert sink.wait_for(1)[0]["From"] == USER
        assert sink.auth_attempts == 1


@pytest.mark.parametrize("password", ["wrong-password", "", None])
def test_auth_refused_is_permanent_and_quick(tmp_path: Path, password: str | None) -> None:
    with SmtpSink(require_auth=(USER, PASSWORD)) as sink:
        settings = make_settings(tmp_path, sink, SMTP_EMAIL=USER, SMTP_PASSWORD=password)
        started = time.monotonic()
        with pytest.raises(PermanentFailure, match=r"535|530"):
            EmailNotifier(settings).send(note())
        assert time.monotonic() - started < 2  # refused, not timed out
        assert sink.messages == []


# -- the rich email -------------------------------------------------------------------------


def test_rich_email_shows_every_field_escaped(sink: SmtpSink, settings: Settings) -> None:
    event = make_event(payload={"data": "<script>alert('x')</script>", "fw_version": "42", "public": "false"})
    EmailNotifier(settings).send(note(event))
    message = sink.wait_for(1)[0]
    assert message.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    assert message["Subject"] == "Alert: motion on Storage unit 12"
    page, text = html_part(message), text_part(message)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script>alert('x')</script>" in text
    for value in ("motion", CORE, "Storage unit 12", "particle", "42", PUBLISHED, "false"):
        assert value in page and value in text
    for key in ("event", "data", "coreid", "published_at", "fw_version", "public"):
        assert f"payload.{key}" in page
    assert "2026-11-23 18:02:11 UTC" in page
    assert "2026-11-23 13:02:11 EST" in page and "America/New_York" in page
    assert "2026-11-23T18:02:12.345678Z" in page
    for external in ("http", "<link", "<img", "<style", "<script"):
        assert external not in page


def test_summary_subject_counts_repeats_in_the_alert_zone(sink: SmtpSink, settings: Settings) -> None:
    EmailNotifier(settings).send(note(kind="summary", repeats=37, window_start=WINDOW_START))
    message = sink.wait_for(1)[0]
    assert message["Subject"] == "Summary: motion on Storage unit 12 — 37 more since 13:00"
    assert "37" in html_part(message)


def test_device_name_lookup_ignores_case_and_falls_back(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, DEVICE_NAMES=f"{CORE.upper()}:Garage")
    shouted = make_event(device=CORE.upper())
    subject = render_email(note(shouted, recipient="-"), settings)["Subject"]
    assert subject == "Alert: motion on Garage"
    other = make_event(device="ffffffffffffffffffffffff")
    subject = render_email(note(other, recipient="-"), settings)["Subject"]
    assert subject == "Alert: motion on ffffffffffffffffffffffff"
    unnamed = make_event(device="", event="", source="github", payload={"zen": "hi"})
    assert render_email(note(unnamed, recipient="-"), settings)["Subject"] == ("Alert: event on github")


@pytest.mark.parametrize(
    ("published_at", "expected"),
    [
        (PUBLISHED, "13:02:11 EST"),
        ("2026-07-01T12:00:00+00:00", "08:00:00 EDT"),
        ("2026-11-23T18:02:11", "13:02:11 EST"),  # no zone given: UTC
        ("not a date", "13:02:12 EST"),  # falls back to the time received
        (12345, "13:02:12 EST"),
        (None, "13:02:12 EST"),
        ("9" * 500, "13:02:12 EST"),
    ],
)
def test_the_time_it_happened(tmp_path: Path, published_at: Any, expected: str) -> None:
    settings = make_settings(tmp_path)
    event = make_event(payload={"published_at": published_at})
    assert expected in html_part(render_email(note(event, recipient="-"), settings))
    assert expected in render_sms(note(event, "sms", SMS), settings).get_content()


@pytest.mark.parametrize(
    "payload",
    [
        ["a", "list"],
        "a string",
        None,
        42,
        {"nested": {"deep": [1, {"x": "<b>"}]}, "published_at": "0001-01-01T00:00:00Z"},
        {f"key{i}": "v" * 5000 for i in range(300)},
        {"\r\nBcc": "x", "data": {"not": "a string"}},
    ],
)
def test_odd_payloads_still_render(tmp_path: Path, payload: Any) -> None:
    settings = make_settings(tmp_path)
    event = make_event(source="generic", device="", event="push", payload={})
    event = StoredEvent(**{**event.__dict__, "payload": payload})
    message = render_email(note(event, recipient="-"), settings)
    page = html_part(message)
    assert "<b>" not in page
    assert len(message.as_bytes()) < 3_000_000
    sms = render_sms(note(event, "sms", SMS), settings)
    assert sms_length(sms) <= 160


# -- the SMS form ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_name", "data", "device_names"),
    [
        ("motion", "front door", f"{CORE}:Storage unit 12"),
        ("motion", "x" * 1000, f"{CORE}:Storage unit 12"),
        ("e" * 300, "front door", f"{CORE}:Storage unit 12"),
        ("e" * 300, "d" * 300, f"{CORE}:{'N' * 200}"),
        ("motion", "ünïcødé ✓ " * 40, None),
        ("motion", "", None),
        ("motion", None, None),
    ],
)
def test_sms_fits_in_160_characters(
    sink: SmtpSink, tmp_path: Path, event_name: str, data: Any, device_names: str | None
) -> None:
    settings = make_settings(tmp_path, sink, DEVICE_NAMES=device_names)
    event = make_event(event=event_name, payload={"event": event_name, "data": data})
    EmailNotifier(settings).send(note(event, "sms", SMS))
    message = sink.wait_for(1)[0]
    assert message.get_content_type() == "text/plain" and not message.is_multipart()
    assert sms_length(message) <= 160
    body = message.get_content()
    assert event_name[:20] in body and "13:02:11 EST" in body
    if data and len(data) > 100:
        assert data[:20] in body and "…" in body
    elif data:
        assert data in body


def test_sms_uses_the_friendly_name_and_keeps_short_data_whole(tmp_path: Path) -> None:
    body = render_sms(note(channel="sms", recipient=SMS), make_settings(tmp_path)).get_content()
    assert body.strip() == "motion on Storage unit 12 at 13:02:11 EST: front door"


def test_summary_sms_carries_the_count(tmp_path: Path) -> None:
    n = note(channel="sms", recipient=SMS, kind="summary", repeats=37, window_start=WINDOW_START)
    message = render_sms(n, make_settings(tmp_path))
    assert "motion x37 since 13:00" in message.get_content()
    assert sms_length(message) <= 160


# -- header injection -----------------------------------------------------------------------


@pytest.mark.parametrize("hostile", INJECTIONS)
@pytest.mark.parametrize("channel", ["email", "sms"])
def test_webhook_text_never_reaches_a_header(sink: SmtpSink, settings: Settings, hostile: str, channel: str) -> None:
    event = make_event(event=hostile, device=hostile, payload={"event": hostile, "data": hostile, hostile: hostile})
    recipient = SMS if channel == "sms" else EMAIL
    EmailNotifier(settings).send(note(event, channel, recipient))
    message = sink.wait_for(1)[0]
    assert [rcpts for _, rcpts, _ in sink.envelopes] == [[recipient]]
    expected = {"From", "To", "Date", "Message-ID", "Auto-Submitted", "MIME-Version"}
    expected |= {"X-Webhook-Event-Id", "X-Webhook-Delivery-Id"}
    expected |= {"Content-Type", "Content-Transfer-Encoding"}
    headers = set(message.keys())
    assert headers - {"Subject"} <= expected and "Bcc" not in headers
    subject = message["Subject"] or ""
    assert "\r" not in subject and "\n" not in subject and "\u2028" not in subject
    assert len(subject) <= 150
    if channel == "sms":
        assert sms_length(message) <= 160


@pytest.mark.parametrize(
    "recipient",
    [f"{EMAIL}\r\nBcc: evil@example.com", f"{EMAIL}, evil@example.com", "no-at-sign", "a b@c.com"],
)
def test_a_bad_recipient_is_refused_before_connecting(sink: SmtpSink, settings: Settings, recipient: str) -> None:
    with pytest.raises(PermanentFailure, match="address"):
        EmailNotifier(settings).send(note(recipient=recipient))
    assert sink.envelopes == []


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("a\r\nb", 10, "a b"),
        ("a\u2028\u2029b", 10, "a b"),
        ("  many   spaces\t", 20, "many spaces"),
        ("abcdefghij", 5, "abcd…"),
        ("x" * 10_000, 3, "xx…"),
        ("a\u200bb\u202ec", 10, "abc"),
        ("\ud800", 5, "\ufffd"),
        ({"a": 1}, 20, '{"a":1}'),
        (None, 5, ""),
        ("abc", 0, ""),
    ],
)
def test_clean(value: Any, limit: int, expected: str) -> None:
    assert clean(value, limit) == expected


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "code", "failure"),
    [
        ("data", 550, PermanentFailure),
        ("data", 554, PermanentFailure),
        ("data", 451, TemporaryFailure),
        ("data", 452, TemporaryFailure),
        ("rcpt", 550, PermanentFailure),
        ("rcpt", 450, TemporaryFailure),
    ],
)
def test_refusals_are_classified_by_code(
    sink: SmtpSink, settings: Settings, stage: str, code: int, failure: type[Exception]
) -> None:
    sink.refuse_code, sink.refuse_stage = code, stage
    with pytest.raises(failure, match=str(code)):
        EmailNotifier(settings).send(note())
    assert sink.messages == []


def test_nothing_listening_is_temporary(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, SMTP_HOST="127.0.0.1", SMTP_PORT=str(closed_port()))
    with pytest.raises(TemporaryFailure, match="Refused"):
        EmailNotifier(settings).send(note())


@pytest.fixture
def raw_server() -> Iterator[Callable[[bytes], int]]:
    """A TCP server that answers each connection with fixed bytes, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    reply = [b""]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(reply[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def answer(data: bytes) -> int:
        reply[0] = data
        return int(listener.getsockname()[1])

    yield answer
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
    listener.close()
    thread.join(timeout=2)


@pytest.mark.parametrize(
    "greeting",
    [b"", b"554 no service here\r\n", b"421 too busy\r\n", b"garbage without a code\r\n"],
)
def test_a_broken_server_is_temporary(tmp_path: Path, raw_server: Callable[[bytes], int], greeting: bytes) -> None:
    port = raw_server(greeting)
    settings = make_settings(tmp_path, SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), SMTP_TIMEOUT="1")
    with pytest.raises(TemporaryFailure):
        EmailNotifier(settings).send(note())


def test_tls_against_a_plain_server_is_temporary(sink: SmtpSink, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, sink, SMTP_SECURITY="ssl", SMTP_TIMEOUT="1")
    with pytest.raises(TemporaryFailure, match="SSL"):
        EmailNotifier(settings).send(note())
    assert sink.messages == []


def test_a_slow_server_times_out_as_temporary(tmp_path: Path) -> None:
    with SmtpSink(delay=2.0) as sink:
        settings = make_settings(tmp_path, sink, SMTP_TIMEOUT="0.2")
        started = time.monotonic()
        with pytest.raises(TemporaryFailure, match=r"[Tt]imeout|timed out"):
            EmailNotifier(settings).send(note())
        assert time.monotonic() - started < 1.5


def test_a_retry_carries_the_same_message_id(sink: SmtpSink, settings: Settings) -> None:
    mailer, notification = EmailNotifier(settings), note(delivery_id=99)
    sink.refuse_code = 451
    with pytest.raises(TemporaryFailure):
        mailer.send(notification)
    sink.refuse_code = None
    mailer.send(notification)
    mailer.send(notification)
    first, second = sink.wait_for(2)
    assert first["Message-ID"] == second["Message-ID"] == "<wh-99-42@webhook-server>"


def test_message_id_keeps_only_safe_characters() -> None:
    event = make_event(id="4\r\n2>@x")
    assert note(event, delivery_id=3).message_id == "<wh-3-42x@webhook-server>"


# -- no SMTP: the log -----------------------------------------------------------------------


def test_without_smtp_every_channel_logs(tmp_path: Path) -> None:
    table = notifiers(make_settings(tmp_path))
    assert set(table) == {"email", "sms", "log", "http"}
    assert all(isinstance(table[name], LogNotifier) for name in ("email", "sms", "log"))
    assert isinstance(table["http"], HttpForwarder)  # forwarding needs no SMTP
    with pytest.raises(ValueError, match="SMTP"):
        EmailNotifier(make_settings(tmp_path))


def test_with_smtp_mail_channels_share_one_notifier(settings: Settings) -> None:
    table = notifiers(settings)
    assert table["email"] is table["sms"] and isinstance(table["email"], EmailNotifier)
    assert isinstance(table["log"], LogNotifier)


def test_log_notifier_writes_one_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, RECIPIENT_EMAIL=None)
    ((channel, recipient),) = targets(settings)
    with caplog.at_level(logging.INFO, logger="webhook_server.notify"):
        notifiers(settings)[channel].send(note(channel=channel, recipient=recipient))
    (record,) = caplog.records
    # Info, not a warning: a log-only alert is how a first run works, not a fault.
    assert record.name == "webhook_server.notify" and record.levelno == logging.INFO
    assert "motion" in record.getMessage() and "front door" in record.getMessage()
    assert "Storage unit 12" in record.getMessage()
    assert "because no SMTP is set" in record.getMessage()
    assert "(no recipients)" not in record.getMessage()


def test_log_notifier_uses_the_sms_text_for_a_gateway(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path)
    with caplog.at_level(logging.INFO, logger="webhook_server.notify"):
        LogNotifier(settings).send(note(channel="log", recipient=SMS))
    (record,) = caplog.records
    assert "motion on Storage unit 12 at 13:02:11 EST: front door" in record.getMessage()
    assert "payload." not in record.getMessage()


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_log_notifier_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture, hostile: str) -> None:
    settings = make_settings(tmp_path)
    event = make_event(event=hostile, device=hostile, payload={"data": hostile, "x": [hostile]})
    with caplog.at_level(logging.INFO, logger="webhook_server.notify"):
        for recipient in ("-", EMAIL, SMS, "\r\n"):
            LogNotifier(settings).send(note(event, "log", recipient, kind="summary", repeats=2))
    assert len(caplog.records) == 4


# -- routing --------------------------------------------------------------------------------


def test_targets_with_smtp(settings: Settings) -> None:
    assert targets(settings) == [("email", EMAIL), ("sms", SMS)]
    mixed = (EMAIL, "555@TXT.ATT.NET", "b@example.org", EMAIL)
    assert targets(settings, mixed) == [
        ("email", EMAIL),
        ("sms", "555@TXT.ATT.NET"),
        ("email", "b@example.org"),
    ]
    assert targets(settings, ()) == []
    assert channel_for(settings, "x@tmomail.net") == "sms"
    assert channel_for(settings, "x@vtext.com.evil.example") == "email"
    assert channel_for(settings, "no-at-sign") == "email"


def test_targets_without_smtp(tmp_path: Path) -> None:
    with_recipients = make_settings(tmp_path)
    assert targets(with_recipients) == [("log", EMAIL), ("log", SMS)]
    assert channel_for(with_recipients, SMS) == "log"
    without = make_settings(tmp_path, RECIPIENT_EMAIL=None)
    assert targets(without) == [("log", "-")]
    assert targets(without, ()) == [("log", "-")]
    assert targets(without, (EMAIL,)) == [("log", EMAIL)]
