"""What PostgreSQL must give that SQLite's single writer gave for free: ids committed in order across
replicas, migrations that two processes can start at once, savepoints inside a group, claims that
two workers never share, and cool-downs exact with two workers (against a real server)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import base_settings
from tests.services import PostgresProcess
from webhook_server.delivery.queue import DeliveryQueue
from webhook_server.settings import load_settings
from webhook_server.store.postgres import PostgresStore
from webhook_server.store.schema import POSTGRES_MIGRATIONS


@pytest.fixture
def url(postgres: PostgresProcess) -> Any:
    database = postgres.new_database()
    yield database
    postgres.drop(database)


def test_ids_reach_a_tail_in_order_while_two_replicas_insert(url: str) -> None:
    """A reader following `id > cursor` (the live stream) misses no event although two stores
    (two replicas) insert at once: ids are given and committed one transaction at a time."""
    replicas = [PostgresStore(url, pool_size=8) for _ in range(2)]
    reader = PostgresStore(url, pool_size=1)
    seen: list[int] = []
    done = threading.Event()

    def tail() -> None:
        cursor = 0
        while not done.is_set() or cursor < reader.newest_id():
            for event in reader.events_after(cursor, 100):
                seen.append(int(event.id))
                cursor = int(event.id)

    def insert(store: PostgresStore, prefix: str) -> None:
        for n in range(50):
            store.insert_event("particle", f"{prefix}-{n}", "e", "d", None, {"n": n})

    follower = threading.Thread(target=tail)
    follower.start()
    writers = [threading.Thread(target=insert, args=(s, f"{i}-{t}")) for i, s in enumerate(replicas) for t in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    done.set()
    follower.join(timeout=30)
    stored = [row[0] for row in reader.connection().execute("SELECT id FROM events ORDER BY id").fetchall()]
    assert len(stored) == 400 and seen == stored


def test_a_redelivery_to_the_other_replica_is_the_same_event_and_uses_no_id(url: str) -> None:
    first, second = PostgresStore(url), PostgresStore(url)
    assert first.insert_event("particle", "same", "e", "d", None, {}) == ("1", True)
    assert second.insert_event("particle", "same", "e", "d", None, {}) == ("1", False)
    assert second.insert_event("particle", "other", "e", "d", None, {}) == ("2", True)


def _start_store(url: str) -> None:
    PostgresStore(url, pool_size=1).close()


def test_processes_starting_at_once_migrate_once(postgres: PostgresProcess) -> None:
    name = f"wh_race_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # an empty one: no template
    url = postgres.url(name)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_start_store, args=(url,)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    with psycopg.connect(url) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(POSTGRES_MIGRATIONS) + 1))
    postgres.drop(url)


def test_one_failing_write_spoils_no_other_in_its_group(url: str) -> None:
    store = PostgresStore(url, pool_size=2)
    store.writer.run(lambda c: c.execute("INSERT INTO counters VALUES ('k0', 0, 0)"))
    barrier = threading.Barrier(6)
    outcomes: dict[int, object] = {}

    def work(n: int) -> None:
        barrier.wait()
        key = "k0" if n == 3 else f"k{n}"  # n == 3: a key that exists, an error for it alone

        def write(c: Any) -> int:
            c.execute("INSERT INTO counters VALUES (?, ?, 0)", (key, n))
            if n == 5:  # not a database error: what it wrote stays (a refused request's count)
                raise ValueError("refused")
            return n

        try:
            outcomes[n] = store.writer.run(write)
        except (psycopg.Error, ValueError) as exc:
            outcomes[n] = type(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == {1: 1, 2: 2, 3: psycopg.errors.UniqueViolation, 4: 4, 5: ValueError, 6: 6}
    keys = {row[0] for row in store.connection().execute("SELECT key FROM counters")}
    assert keys == {"k0", "k1", "k2", "k4", "k5", "k6"}


def _queue(url: str, tmp_path: Path, **overrides: Any) -> DeliveryQueue:
    env = base_settings(tmp_path, DATABASE_URL=url, RECIPIENT_EMAIL="owner@example.com", **overrides)
    return DeliveryQueue(PostgresStore(url, pool_size=4), load_settings(env))


def test_two_workers_never_claim_the_same_delivery(url: str, tmp_path: Path) -> None:
    queues = [_queue(url, tmp_path, ALERT_COOLDOWN_SECONDS="0") for _ in range(2)]
    for n in range(200):
        queues[0].store.insert_event("particle", None, f"e{n}", "d", None, {})
    assert queues[0].dispatch() == 200
    claimed: list[list[int]] = [[], []]

    def claim(index: int) -> None:
        while batch := queues[index].claim(7):
            claimed[index].extend(n.delivery_id for n in batch)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == list(range(1, 201))


def test_a_claim_skips_rows_another_worker_is_claiming_rather_than_wait(url: str, tmp_path: Path) -> None:
    queue = _queue(url, tmp_path, ALERT_COOLDOWN_SECONDS="0")
    for n in range(20):
        queue.store.insert_event("particle", None, f"e{n}", "d", None, {})
    queue.dispatch()
    with psycopg.connect(url) as other:  # another worker, in the middle of its claim of 1..7
        other.execute("SELECT id FROM deliveries WHERE id <= 7 FOR UPDATE")
        started = time.monotonic()
        taken = [n.delivery_id for n in queue.claim(7)]
        assert time.monotonic() - started < 1
    assert taken == list(range(8, 15))


def test_two_workers_dispatching_at_once_fold_repeats_into_one_alert(url: str, tmp_path: Path) -> None:
    queues = [_queue(url, tmp_path, ALERT_COOLDOWN_SECONDS="3600") for _ in range(2)]
    stop = threading.Event()

    def dispatch(queue: DeliveryQueue) -> None:
        while not stop.is_set():
            queue.dispatch()

    threads = [threading.Thread(target=dispatch, args=(q,)) for q in queues]
    for thread in threads:
        thread.start()
    for n in range(20):
        queues[n % 2].store.insert_event("particle", None, "motion", "door", None, {"n": n})
    deadline = time.monotonic() + 10
    conn = queues[0].store.connection()
    while (
        conn.execute("SELECT COUNT(*) FROM events WHERE dispatched = 0").fetchone()[0] and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    stop.set()
    for thread in threads:
        thread.join()
    assert conn.execute("SELECT kind, COUNT(*) FROM deliveries GROUP BY kind").fetchall() == [("alert", 1)]
    assert conn.execute("SELECT repeats FROM cooldowns").fetchone()[0] == 19
    assert queues[1].close_windows(now=time.time() + 7200) == 1
    assert conn.execute("SELECT repeats FROM deliveries WHERE kind = 'summary'").fetchall() == [(19,)]
