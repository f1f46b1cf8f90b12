"""Retention on a real store: what is older than EVENT_RETENTION_DAYS / AUDIT_RETENTION_DAYS goes
(events with their deliveries, audit rows by their last request), oldest first and in batches,
and nothing the worker still needs; the two settings parse and refuse like the others."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import PARTICLE_SECRET, base_settings, new_store
from webhook_server.delivery.worker import Worker
from webhook_server.settings import ConfigError, load_settings
from webhook_server.store.base import EventStore
from webhook_server.store.retention import DAY_SECONDS, Purged, purge

pytestmark = pytest.mark.usefixtures("each_store")

NOW = 1_800_000_000.0  # 2027-01-15, seconds since the epoch
DAYS = 30
CUTOFF = NOW - DAYS * DAY_SECONDS


def iso(at: float) -> str:
    """As the store writes `received_at` (records.utc_now_iso)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    return new_store(tmp_path / "data" / "webhooks.sqlite3")


def add_event(store: EventStore, at: float, dispatched: bool = True, deliveries: tuple[str, ...] = ("sent",)) -> int:
    """An event received at `at` with one delivery per status given; its id."""
    with store.transaction() as conn:
        event_id = int(
            conn.execute(
                "INSERT INTO events (source, received_at, payload, dispatched, body) VALUES ('particle', ?, '{}', ?, ?)"
                " RETURNING id",
                (iso(at), int(dispatched), b"x" * 1500),
            ).fetchone()[0]
        )
        for status in deliveries:
            conn.execute(
                "INSERT INTO deliveries (event_id, kind, channel, recipient, status, next_attempt_at, created_at)"
                " VALUES (?, 'alert', 'email', 'owner@example.com', ?, ?, ?)",
                (event_id, status, at, at),
            )
    return event_id


def add_audit(store: EventStore, at: float, last_at: float) -> int:
    with store.transaction() as conn:
        return int(
            conn.execute(
                "INSERT INTO audit (at, last_at, status, total_ms) VALUES (?, ?, 202, 1.0) RETURNING id", (at, last_at)
            ).fetchone()[0]
        )


def event_ids(store: EventStore) -> list[int]:
    return [row[0] for row in store.connection().execute("SELECT id FROM events ORDER BY id")]


def delivery_event_ids(store: EventStore) -> list[int]:
    return [row[0] for row in store.connection().execute("SELECT event_id FROM deliveries ORDER BY id")]


def audit_ids(store: EventStore) -> list[int]:
    return [row[0] for row in store.connection().execute("SELECT id FROM audit ORDER BY id")]


def test_events_older_than_the_cutoff_go_with_their_deliveries(store: EventStore) -> None:
    old = add_event(store, CUTOFF - 86400, deliveries=("sent", "dead"))
    just_old = add_event(store, CUTOFF - 1, deliveries=("sent", "sent"))
    at_cutoff = add_event(store, CUTOFF)
    just_new = add_event(store, CUTOFF + 1, deliveries=("dead",))
    purged = purge(store, DAYS, DAYS, now=NOW)
    assert purged == Purged(events=2, deliveries=4, audit=0, more=False)
    assert old < just_old and event_ids(store) == [at_cutoff, just_new]
    assert delivery_event_ids(store) == [at_cutoff, just_new]


def test_audit_rows_go_by_their_last_request(store: EventStore) -> None:
    gone = add_audit(store, CUTOFF - 100, CUTOFF - 1)
    folded_until_recently = add_audit(store, CUTOFF - 100, CUTOFF + 1)  # a refusal row still being folded into
    at_cutoff = add_audit(store, CUTOFF, CUTOFF)
    assert purge(store, DAYS, DAYS, now=NOW).audit == 1
    assert gone not in audit_ids(store)
    assert audit_ids(store) == [folded_until_recently, at_cutoff]


def test_each_table_has_its_own_period(store: EventStore) -> None:
    event = add_event(store, NOW - 5 * DAY_SECONDS)
    add_audit(store, NOW - 5 * DAY_SECONDS, NOW - 5 * DAY_SECONDS)
    assert purge(store, 7, 3, now=NOW) == Purged(audit=1)
    assert event_ids(store) == [event] and audit_ids(store) == []


def test_zero_keeps_everything_forever(store: EventStore) -> None:
    ancient = NOW - 3650 * DAY_SECONDS
    event = add_event(store, ancient)
    row = add_audit(store, ancient, ancient)
    assert purge(store, 0, 0, now=NOW) == Purged()
    assert event_ids(store) == [event] and audit_ids(store) == [row]


def test_a_period_longer_than_the_epoch_removes_nothing(store: EventStore) -> None:
    event = add_event(store, 0.0)
    assert purge(store, 10**9, 10**9, now=NOW) == Purged()
    assert event_ids(store) == [event]


def test_an_undispatched_event_and_every_later_one_stay(store: EventStore) -> None:
    first = add_event(store, CUTOFF - 300)
    waiting = add_event(store, CUTOFF - 200, dispatched=False, deliveries=())
    later = add_event(store, CUTOFF - 100)
    assert purge(store, DAYS, DAYS, now=NOW).events == 1
    # Oldest first only: removing `later` would leave a gap behind the oldest kept id.
    assert event_ids(store) == [waiting, later]
    store.connection().execute("UPDATE events SET dispatched = 1 WHERE id = ?", (waiting,))
    assert purge(store, DAYS, DAYS, now=NOW).events == 2
    assert first < waiting and event_ids(store) == []


@pytest.mark.parametrize("column", ["first_event_id", "last_event_id"])
def test_an_event_a_cooldown_window_points_at_stays(store: EventStore, column: str) -> None:
    ids = [add_event(store, CUTOFF - 300 + n) for n in range(3)]
    recent = add_event(store, NOW)
    window = {"first_event_id": recent, "last_event_id": recent, column: ids[1]}
    store.connection().execute(
        "INSERT INTO cooldowns (source, event, device, opened_at, closes_at, first_event_id, last_event_id)"
        " VALUES ('particle', 'motion', 'd', ?, ?, ?, ?)",
        (NOW, NOW + 60, window["first_event_id"], window["last_event_id"]),
    )
    assert purge(store, DAYS, DAYS, now=NOW).events == 1
    assert event_ids(store) == [*ids[1:], recent]


def test_an_event_with_a_pending_delivery_stays(store: EventStore) -> None:
    first = add_event(store, CUTOFF - 300)
    retrying = add_event(store, CUTOFF - 200, deliveries=("sent", "pending"))
    assert purge(store, DAYS, DAYS, now=NOW) == Purged(events=1, deliveries=1)
    assert first < retrying and event_ids(store) == [retrying]
    assert delivery_event_ids(store) == [retrying, retrying]


def test_work_goes_in_bounded_batches_and_the_oldest_kept_id_moves_forward(store: EventStore) -> None:
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO events (source, received_at, payload, dispatched) VALUES ('particle', ?, '{}', 1)",
            [(iso(CUTOFF - 3600 + n),) for n in range(1234)],
        )
        conn.executemany(
            "INSERT INTO audit (at, last_at, status, total_ms) VALUES (?, ?, 401, 1.0)",
            [(CUTOFF - 3600, CUTOFF - 3600 + n) for n in range(700)],
        )
    newest_kept = add_event(store, NOW)
    oldest, newest = store.id_bounds()
    assert (oldest, newest) == (1, newest_kept)
    first = purge(store, DAYS, DAYS, now=NOW, batch=100, max_batches=5, pause=0)
    assert first == Purged(events=500, audit=500, more=True)
    assert store.id_bounds() == (501, newest_kept) == (event_ids(store)[0], newest_kept)
    second = purge(store, DAYS, DAYS, now=NOW, batch=100, max_batches=5, pause=0)
    assert (second.events, second.audit, second.more) == (500, 200, True)
    assert store.id_bounds()[0] == 1001
    third = purge(store, DAYS, DAYS, now=NOW, batch=100, max_batches=5, pause=0)
    assert (third.events, third.audit, third.more) == (234, 0, False)
    assert store.id_bounds() == (newest_kept, newest_kept) and audit_ids(store) == []


def test_when_everything_is_removed_the_oldest_id_is_past_the_newest(store: EventStore) -> None:
    last = add_event(store, CUTOFF - 10)
    purge(store, DAYS, DAYS, now=NOW)
    assert store.id_bounds() == (last + 1, last)


def test_an_event_stored_through_the_store_ages_out(store: EventStore) -> None:
    """The text comparison holds for the receipt times `insert_event` really writes."""
    event_id, _ = store.insert_event("particle", None, "motion", "d", None, {"a": 1})
    now = datetime.now(UTC).timestamp()
    store.connection().execute("UPDATE events SET dispatched = 1")
    assert purge(store, 1, 1, now=now + DAY_SECONDS - 5).events == 0
    assert purge(store, 1, 1, now=now + DAY_SECONDS + 5).events == 1
    assert store.get_event(event_id) is None


def test_the_worker_purges_in_housekeeping_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(base_settings(tmp_path, EVENT_RETENTION_DAYS="2", AUDIT_RETENTION_DAYS="1"))
    store = new_store(settings.database_path)
    gone = add_event(store, NOW - 3 * DAY_SECONDS, deliveries=("sent", "sent"))
    kept = add_event(store, NOW - DAY_SECONDS)
    add_audit(store, NOW - DAY_SECONDS - 10, NOW - DAY_SECONDS - 10)
    worker = Worker(settings, store, clock=lambda: NOW)
    with caplog.at_level(logging.INFO, logger="webhook_server.delivery.worker"):
        assert worker.housekeeping() is False
    assert gone < kept and event_ids(store) == [kept] and audit_ids(store) == []
    assert "retention removed 1 events, 2 deliveries and 1 audit records" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="webhook_server.delivery.worker"):
        worker.housekeeping()
    assert "retention removed" not in caplog.text  # nothing removed: nothing said


def test_retention_defaults_to_30_days_and_takes_0_or_more(tmp_path: Path) -> None:
    settings = load_settings(base_settings(tmp_path))
    assert (settings.event_retention_days, settings.audit_retention_days) == (30, 30)
    settings = load_settings(base_settings(tmp_path, EVENT_RETENTION_DAYS="0", AUDIT_RETENTION_DAYS=" 365 "))
    assert (settings.event_retention_days, settings.audit_retention_days) == (0, 365)
    assert not any("RETENTION" in warning for warning in settings.warnings)


@pytest.mark.parametrize(
    ("name", "what"), [("EVENT_RETENTION_DAYS", "events"), ("AUDIT_RETENTION_DAYS", "audit records")]
)
@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "30d"])
def test_a_malformed_retention_is_refused_by_name(tmp_path: Path, name: str, what: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(base_settings(tmp_path, **{name: value}))
    assert caught.value.problems == [f"{name} must be a whole number of days (0 or more; 0 keeps {what} forever)"]
    assert PARTICLE_SECRET not in str(caught.value)


def test_a_batch_of_large_events_is_bounded_by_their_size_not_only_their_number(store: EventStore) -> None:
    with store.transaction() as conn:
        for n in range(12):  # 12 old events of 1 MB each
            conn.execute(
                "INSERT INTO events (source, received_at, payload, dispatched, body)"
                " VALUES ('particle', ?, '{}', 1, ?)",
                (iso(CUTOFF - 1000 + n), b"x" * (1024 * 1024)),
            )
    first = purge(store, DAYS, DAYS, now=NOW, max_batches=1)
    assert first.events == 4 and first.more  # about BATCH_BYTES (4 MB) in one transaction
    assert purge(store, DAYS, DAYS, now=NOW).events == 8 and event_ids(store) == []
