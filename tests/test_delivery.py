"""The delivery queue and worker, run synchronously (`Worker.run_once`) against a real SMTP sink.

The worker and its queue read the time from a `FakeClock` the tests move: no test sleeps for a
retry, a lease or a cool-down window to pass."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import assert_accepted, base_settings, bearer, new_store, particle_event
from tests.smtpsink import SmtpSink
from webhook_server import create_app
from webhook_server.cli import main
from webhook_server.delivery.queue import DeliveryQueue, backoff
from webhook_server.delivery.worker import Worker
from webhook_server.settings import load_settings
from webhook_server.store import base as store_base

pytestmark = pytest.mark.usefixtures("each_store")


def text_of(message: Any) -> str:
    part = message.get_body(("plain",)) or message
    return str(part.get_content())


class FakeClock:
    """Seconds since the epoch that only move when a test says so. It starts a second ahead of
    the real time, so the receipt times the app gives events (real time) are in its past."""

    def __init__(self) -> None:
        self.now = time.time() + 1.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_the_fake_clock_stands_still_until_moved() -> None:
    clock = FakeClock()
    start = clock()
    assert start > time.time()
    assert clock() == start
    clock.advance(2.5)
    assert clock() == start + 2.5


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


class Harness:
    """An app to post events to and a worker to run, on the same store and settings."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.env = base_settings(tmp_path, **{k: str(v) for k, v in overrides.items()})
        self.settings = load_settings(self.env)
        self.app = create_app(self.env)
        self.client = self.app.test_client()
        self.clock = FakeClock()
        self.worker = Worker(self.settings, new_store(self.settings.database_path), clock=self.clock)
        self.queue: DeliveryQueue = self.worker.queue
        self.published = 0

    def post(self, **fields: Any) -> str:
        self.published += 1
        fields.setdefault("published_at", f"2026-11-23T18:02:{self.published % 60:02d}.{self.published:03d}Z")
        return assert_accepted(self.client.post("/webhook/particle", data=particle_event(**fields), headers=bearer()))

    def drain(self, passes: int = 20) -> None:
        for _ in range(passes):
            if not self.worker.run_once():
                return

    def next_attempts(self) -> list[float]:
        rows = self.worker.store.connection().execute("SELECT next_attempt_at FROM deliveries ORDER BY id")
        return [float(r[0]) for r in rows.fetchall()]

    def statuses(self) -> list[tuple[str, str, int]]:
        rows = (
            self.worker.store.connection()
            .execute("SELECT status, recipient, attempts FROM deliveries ORDER BY id")
            .fetchall()
        )
        return [(r[0], r[1], r[2]) for r in rows]


def stamp_receipts_with(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store stamps events' receipt times from `clock` too, so cool-down windows (which run
    from receipt times) and the worker's clock agree."""

    def utc_now_iso() -> str:
        return datetime.fromtimestamp(clock(), UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

    monkeypatch.setattr(store_base, "utc_now_iso", utc_now_iso)


@pytest.fixture
def harness(tmp_path: Path, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Harness]:
    def make(**overrides: Any) -> Harness:
        smtp = {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": sink.port,
            "SMTP_SECURITY": "none",
            "SMTP_EMAIL": "alerts@example.com",
            "RECIPIENT_EMAIL": "owner@example.com,5551234567@vtext.com",
            "ALERT_COOLDOWN_SECONDS": 0,
            "RETRY_BASE_SECONDS": 0.05,
            "SMTP_TIMEOUT": 2,
        }
        smtp.update(overrides)
        h = Harness(tmp_path, **smtp)
        stamp_receipts_with(h.clock, monkeypatch)
        return h

    return make


def test_an_event_reaches_every_recipient_once(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    h = harness()
    event_id = h.post(event="door-open", data="back door")
    h.drain()
    messages = sink.wait_for(2)
    assert sorted(str(m["To"]) for m in messages) == ["5551234567@vtext.com", "owner@example.com"]
    rich = next(m for m in messages if m["To"] == "owner@example.com")
    assert "door-open" in str(rich["Subject"]) and event_id in text_of(rich)
    sms = next(m for m in messages if m["To"] != "owner@example.com")
    assert "door-open" in str(sms["Subject"]) + text_of(sms)
    assert [s[0] for s in h.statuses()] == ["sent", "sent"]
    h.drain()
    assert len(sink.messages) == 2


def test_each_sent_delivery_is_logged_with_the_domain_only(
    harness: Callable[..., Harness], sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness()
    event_id = h.post(event="door-open")
    h.clock.advance(1.5)
    with caplog.at_level(logging.INFO, logger="webhook_server.delivery.worker"):
        h.drain()
    sent = [r for r in caplog.records if r.name == "webhook_server.delivery.worker" and "sent by" in r.getMessage()]
    assert len(sent) == 2
    assert {r.levelno for r in sent} == {logging.INFO}
    assert {(r.channel, r.recipient_domain) for r in sent} == {("email", "@example.com"), ("sms", "@vtext.com")}  # type: ignore[attr-defined]
    for record in sent:
        assert record.event_id == event_id and record.tries == 1  # type: ignore[attr-defined]
        assert record.latency_ms == 1500.0  # type: ignore[attr-defined]  # receipt to sent, on the worker's clock
        # The whole address is personal data: only its domain is logged.
        assert "owner@" not in record.getMessage() and "5551234567" not in record.getMessage()


def test_sending_never_happens_on_the_request_path(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    h = harness()
    h.post()
    time.sleep(0.2)
    assert sink.messages == []
    assert [s[0] for s in h.statuses()] == []  # not even dispatched until the worker runs


def test_repeats_inside_the_cooldown_fold_into_one_summary(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    h = harness(ALERT_COOLDOWN_SECONDS=60, RECIPIENT_EMAIL="owner@example.com")
    for _ in range(6):
        h.post(event="motion", data="hall")
    h.drain()
    assert len(sink.wait_for(1)) == 1
    h.clock.advance(59.9)  # the window is still open: no summary yet
    h.drain()
    assert len(sink.messages) == 1
    h.clock.advance(0.2)
    h.drain()
    messages = sink.wait_for(2)
    assert len(messages) == 2
    summary = messages[1]
    # Five repeats folded into the summary: in the subject and in the "Repeats" row.
    assert re.fullmatch(r"Summary: motion on \S+ — 5 more since \d\d:\d\d", str(summary["Subject"])), summary["Subject"]
    assert "Repeats: 5" in text_of(summary).splitlines()
    # After the window closed, the next one is a new alert again.
    h.post(event="motion", data="hall")
    h.drain()
    messages = sink.wait_for(3)
    assert len(messages) == 3
    assert str(messages[2]["Subject"]).startswith("Alert: motion on ")


def test_cooldown_is_per_source_event_and_device(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    h = harness(ALERT_COOLDOWN_SECONDS=60, RECIPIENT_EMAIL="owner@example.com")
    h.post(event="motion")
    h.post(event="motion")
    h.post(event="door")
    h.post(event="motion", coreid="ffffffffffffffffffffffff")
    h.drain()
    messages = sink.wait_for(3)
    assert sorted(str(m["Subject"]).split(" on ")[0] for m in messages) == [
        "Alert: door",
        "Alert: motion",
        "Alert: motion",
    ]
    h.clock.advance(30)  # inside the windows: the repeat stays folded
    h.drain()
    assert len(sink.messages) == 3


def test_cooldown_survives_a_restart(harness: Callable[..., Harness], sink: SmtpSink, tmp_path: Path) -> None:
    h = harness(ALERT_COOLDOWN_SECONDS=60, RECIPIENT_EMAIL="owner@example.com")
    h.post(event="motion")
    h.drain()
    restarted = Worker(h.settings, new_store(h.settings.database_path), clock=h.clock)
    h.post(event="motion")
    restarted.run_once()  # sends synchronously: anything it sent is in the sink now
    assert len(sink.messages) == 1
    window = restarted.store.connection().execute("SELECT repeats FROM cooldowns").fetchone()
    assert window[0] == 1
    h.clock.advance(61)
    restarted.run_once()
    restarted.run_once()
    messages = sink.wait_for(2)
    assert "Repeats: 1" in text_of(messages[1]).splitlines()


def test_temporary_failures_retry_with_backoff_then_dead_letter(
    harness: Callable[..., Harness], sink: SmtpSink
) -> None:
    sink.refuse_code = 451
    h = harness(RETRY_MAX_ATTEMPTS=3, RETRY_BASE_SECONDS=10, RECIPIENT_EMAIL="owner@example.com")
    h.post()
    h.worker.run_once()
    assert h.statuses() == [("pending", "owner@example.com", 1)]
    [next_at] = h.next_attempts()
    assert h.clock() + 8 <= next_at <= h.clock() + 12  # 10 s, ±20% jitter
    h.clock.advance(next_at - h.clock() - 0.01)
    h.worker.run_once()  # not due yet: no second try
    assert h.statuses() == [("pending", "owner@example.com", 1)]
    h.clock.advance(0.02)
    h.worker.run_once()
    assert h.statuses() == [("pending", "owner@example.com", 2)]
    [next_at] = h.next_attempts()
    assert h.clock() + 16 <= next_at <= h.clock() + 24  # doubled
    h.clock.advance(24.01)
    h.worker.run_once()
    assert h.statuses() == [("dead", "owner@example.com", 3)]
    h.clock.advance(3600)
    h.worker.run_once()  # a dead letter is never tried again
    assert h.statuses() == [("dead", "owner@example.com", 3)]
    [letter] = h.queue.dead_letters()
    assert letter.tries == 3 and "451" in letter.last_error
    assert sink.messages == []


def test_a_permanent_refusal_is_a_dead_letter_at_once_and_replay_sends_it(
    harness: Callable[..., Harness], sink: SmtpSink
) -> None:
    sink.refuse_code = 550
    h = harness(RECIPIENT_EMAIL="owner@example.com")
    h.post()
    h.worker.run_once()
    assert h.statuses() == [("dead", "owner@example.com", 1)]
    sink.refuse_code = None
    assert h.queue.replay([h.queue.dead_letters()[0].delivery_id]) == 1
    h.drain()
    assert len(sink.wait_for(1)) == 1
    assert h.queue.dead_letters() == []


def test_one_bad_recipient_does_not_resend_to_the_others(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    h = harness(RECIPIENT_EMAIL="a@example.com,b@example.com")
    h.post()
    [first, second] = h.queue.dispatch() and h.queue.claim(2)
    h.worker.deliver(first)
    sink.refuse_code = 451
    h.worker.deliver(second)
    sink.refuse_code = None
    h.clock.advance(1)  # past the retry's backoff (0.05 s base)
    h.drain()
    recipients = [str(m["To"]) for m in sink.messages]
    assert sorted(recipients) == ["a@example.com", "b@example.com"]
    assert [s[0] for s in h.statuses()] == ["sent", "sent"]


def test_an_expired_lease_is_taken_over_with_the_same_message_id(
    harness: Callable[..., Harness], sink: SmtpSink
) -> None:
    h = harness(RECIPIENT_EMAIL="owner@example.com", DELIVERY_LEASE_SECONDS=30)
    h.post()
    h.queue.dispatch()
    [claimed] = h.queue.claim(1)  # a worker that then dies without finishing
    assert h.queue.claim(1) == []  # leased: nobody else takes it
    h.worker.deliver(claimed)  # the first worker did send before it died...
    # ...but did not record it: the delivery is still pending, under its lease.
    h.worker.store.connection().execute("UPDATE deliveries SET status = 'pending', lease_until = ?", (h.clock() + 30,))
    other = Worker(h.settings, new_store(h.settings.database_path), clock=h.clock)
    h.clock.advance(29.9)
    other.run_once()
    assert len(sink.messages) == 1  # the lease still holds
    h.clock.advance(0.2)
    other.run_once()
    messages = sink.wait_for(2)
    assert messages[0]["Message-ID"] == messages[1]["Message-ID"]


def test_lease_expiry_after_a_crash_delivers(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    h = harness(RECIPIENT_EMAIL="owner@example.com", DELIVERY_LEASE_SECONDS=30)
    h.post()
    h.queue.dispatch()
    assert len(h.queue.claim(1)) == 1  # claimed, then the process "dies"
    h.worker.run_once()
    h.clock.advance(29.9)
    h.worker.run_once()
    assert sink.messages == []
    h.clock.advance(0.2)
    h.worker.run_once()
    assert len(sink.wait_for(1)) == 1
    assert h.statuses() == [("sent", "owner@example.com", 2)]


def test_without_smtp_notifications_go_to_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path, ALERT_COOLDOWN_SECONDS=0)
    caplog.set_level(logging.INFO)
    h.post(event="door-open", data="garage")
    h.drain()
    assert h.statuses() == [("sent", "-", 1)]
    assert any("door-open" in r.getMessage() and "garage" in r.getMessage() for r in caplog.records)


def test_a_source_that_does_not_notify_creates_no_deliveries(tmp_path: Path) -> None:
    (tmp_path / "sources.toml").write_text(
        '[sources.quiet]\nscheme = "bearer"\nsecrets = ["QUIET_SECRET"]\nnotify = false\n'
    )
    h = Harness(tmp_path, SOURCES_FILE=tmp_path / "sources.toml", QUIET_SECRET="q" * 20)
    assert_accepted(h.client.post("/webhook/quiet", json={"a": 1}, headers={"Authorization": "Bearer " + "q" * 20}))
    h.drain()
    assert h.statuses() == []


@pytest.mark.parametrize("attempts", [1, 2, 5, 20])
def test_backoff_doubles_with_jitter_and_caps_at_an_hour(attempts: int, tmp_path: Path) -> None:
    settings = load_settings(base_settings(tmp_path, RETRY_BASE_SECONDS="2"))
    expected = min(2 * 2 ** (attempts - 1), 3600)
    samples = [backoff(settings, attempts) for _ in range(200)]
    assert min(samples) >= expected * 0.8 - 1e-9
    assert max(samples) <= expected * 1.2 + 1e-9
    assert max(samples) - min(samples) > 0  # jittered


def test_dead_letters_cli_lists_and_replays(harness: Callable[..., Harness], sink: SmtpSink, tmp_path: Path) -> None:
    sink.refuse_code = 550
    h = harness(RECIPIENT_EMAIL="owner@example.com,other@example.com")
    h.post(event="door-open")
    h.drain()
    env = {k: str(v) for k, v in h.env.items()}
    runner = CliRunner()
    listing = runner.invoke(main, ["dead-letters", "list"], env=env)
    assert listing.exit_code == 0, listing.output
    assert "door-open" in listing.output and "owner@example.com" in listing.output and "550" in listing.output
    bad = runner.invoke(main, ["dead-letters", "replay"], env=env)
    assert bad.exit_code != 0
    missing = runner.invoke(main, ["dead-letters", "replay", "9999"], env=env)
    assert missing.exit_code == 1
    sink.refuse_code = None
    replay = runner.invoke(main, ["dead-letters", "replay", "--all"], env=env)
    assert replay.exit_code == 0 and "Replayed 2" in replay.output
    h.drain()
    assert len(sink.wait_for(2)) == 2
    assert "No dead letters" in runner.invoke(main, ["dead-letters"], env=env).output


def test_housekeeping_drops_expired_rate_limit_counters(tmp_path: Path) -> None:
    from webhook_server.store.counters import StoreCounters

    h = Harness(tmp_path)
    storage = StoreCounters(new_store(h.settings.database_path))
    storage.incr("gone", expiry=-1)  # its window ended a second ago
    storage.incr("kept", expiry=60)
    h.worker.housekeeping()
    keys = [r[0] for r in storage.store.connection().execute("SELECT key FROM counters").fetchall()]
    assert keys == ["kept"]


def test_windows_close_under_steady_load(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    """A window whose end passed closes even while newer, undispatched events keep arriving."""
    h = harness(ALERT_COOLDOWN_SECONDS=60, RECIPIENT_EMAIL="owner@example.com")
    h.post(event="motion")
    h.post(event="motion")
    h.queue.dispatch()
    h.clock.advance(60.1)
    h.post(event="door")  # arrives after the motion window ended, not yet dispatched
    assert h.queue.close_windows() == 1  # the motion summary is due regardless
    summary = h.worker.store.connection().execute("SELECT repeats FROM deliveries WHERE kind = 'summary'").fetchone()
    assert summary[0] == 1


def test_a_window_waits_for_an_older_undispatched_repeat(harness: Callable[..., Harness], sink: SmtpSink) -> None:
    h = harness(ALERT_COOLDOWN_SECONDS=60, RECIPIENT_EMAIL="owner@example.com")
    h.post(event="motion")
    h.queue.dispatch()
    h.clock.advance(59.9)
    h.post(event="motion")  # a repeat inside the window, not dispatched yet
    h.clock.advance(0.2)  # now the window has ended
    assert h.queue.close_windows() == 0  # closing now would lose that repeat from the summary
    h.queue.dispatch()
    assert h.queue.close_windows() == 1
    summary = h.worker.store.connection().execute("SELECT repeats FROM deliveries WHERE kind = 'summary'").fetchone()
    assert summary[0] == 1


def _rows_in_database_file(path: Path) -> int:
    """Events in the database file itself, without the WAL: those a checkpoint has copied."""
    import sqlite3

    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is None:
            return 0  # even the schema is still only in the WAL
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def test_the_web_side_leaves_checkpoints_to_the_worker(tmp_path: Path, each_store: str) -> None:
    """A checkpoint's fsync must not land on a webhook's request: the worker's loop does it."""
    import threading

    if each_store != "sqlite":
        pytest.skip("SQLite's WAL only")
    h = Harness(tmp_path)
    for n in range(6):
        h.post(event=f"e{n}")
    assert _rows_in_database_file(h.settings.database_path) == 0
    stop = threading.Event()
    runner = threading.Thread(target=h.worker.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while _rows_in_database_file(h.settings.database_path) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert _rows_in_database_file(h.settings.database_path) == 6
