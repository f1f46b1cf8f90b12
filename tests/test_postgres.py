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

from tests.conftest import base_settings, bearer, particle_event
from tests.services import PostgresProcess
from webhook_server import create_app
from webhook_server.delivery.queue import DeliveryQueue
from webhook_server.errors import RateLimited
from webhook_server.ingest.ratelimit import Hit, RateLimits
from webhook_server.settings import ConfigError, load_settings
from webhook_server.store import postgres as postgres_store
from webhook_server.store.audit import AuditRecord, record, secret_uses
from webhook_server.store.base import STORE_ERRORS
from webhook_server.store.counters import StoreCounters
from webhook_server.store.group import _Write
from webhook_server.store.postgres import (
    CONNECTION_SETTINGS,
    EVENT_ORDER_LOCK,
    IDLE_CHECK_SECONDS,
    NAMED_LOCKS,
    POOL_WAIT_SECONDS,
    PostgresStore,
)
from webhook_server.store.retention import purge
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


# --------------------------------------------------------------------------- found in review


def _captured(store: PostgresStore, key: str, before: Any) -> Any:
    """The operation `insert_event` hands its group writer, to put several in one group."""
    operations: list[Any] = []
    run = store.writer.run
    store.writer.run = lambda op: operations.append(op) or ("?", True)  # type: ignore[method-assign]
    store.insert_event("particle", key, "e", "d", None, {}, before=before)
    store.writer.run = run  # type: ignore[method-assign]
    return operations[0]


def _hit(store: PostgresStore, client: str, limit: str = "1000/minute") -> Hit:
    limits = RateLimits(StoreCounters(store), limit)
    return Hit(limits, limits.items(limit), ("particle", client))


def test_replicas_counting_the_same_client_do_not_deadlock(url: str) -> None:
    """A's group counts client Y then X; B counts X in between. Each group takes the event-order
    lock before any row, so B waits for A instead of each waiting for the other."""
    a, b = PostgresStore(url), PostgresStore(url)
    outcome: dict[str, Any] = {}

    def replica_b() -> None:
        time.sleep(0.1)
        hit = _hit(b, "X")
        outcome["b"] = b.insert_event("particle", "b1", "e", "d", None, {}, before=hit.count_in)

    def replica_a() -> None:
        y, x = _hit(a, "Y"), _hit(a, "X")
        slow_x = lambda conn: (time.sleep(0.4), x.count_in(conn))  # noqa: E731
        batch = [_Write(_captured(a, "a1", y.count_in)), _Write(_captured(a, "a2", slow_x))]
        a.writer._commit(batch)
        outcome["a"] = [w.error or w.result for w in batch]

    threads = [threading.Thread(target=replica_b), threading.Thread(target=replica_a)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r[1] for r in outcome["a"]] == [True, True] and outcome["b"][1] is True
    counts = dict(a.connection().execute("SELECT key, count FROM counters").fetchall())
    assert sorted(counts.values()) == [1, 2]  # Y once, X twice


def test_a_write_run_again_after_another_was_refused_still_counts_its_request(url: str) -> None:
    store = PostgresStore(url)
    first = _hit(store, "192.0.2.1", "1/minute")
    store.insert_event("particle", "k1", "e", "d", None, {}, before=first.count_in)
    second = _hit(store, "192.0.2.1", "1/minute")  # over the limit
    batch = [_Write(_captured(store, "k2", second.count_in)), _Write(lambda conn: conn.execute("SELECT 1/0"))]
    store.writer._commit(batch)  # the second is refused: the group is written again without it
    assert isinstance(batch[0].error, RateLimited) and isinstance(batch[1].error, psycopg.errors.DivisionByZero)
    assert store.connection().execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1


def test_two_workers_rolling_up_at_once_count_each_use_once(url: str) -> None:
    workers = [PostgresStore(url), PostgresStore(url)]
    now = time.time()
    for round_ in range(10):
        with workers[0].transaction() as conn:
            for _ in range(5):
                record(conn, AuditRecord(now - 3600 + round_, "particle", "192.0.2.1", 202, None, 1.0, None, "fp1"))
        barrier = threading.Barrier(2)

        def housekeeping(store: PostgresStore, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            purge(store, 30, 30, now)

        threads = [threading.Thread(target=housekeeping, args=(w,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert secret_uses(workers[0].connection())[("particle", "fp1")][0] == 50


def test_a_replica_stuck_in_its_transaction_holds_the_others_seconds_not_for_ever(url: str) -> None:
    store = PostgresStore(url)
    with psycopg.connect(url) as stuck:  # a replica paused (say its VM) while holding the lock
        stuck.execute("SELECT pg_advisory_xact_lock(%s)", (EVENT_ORDER_LOCK,))
        started = time.monotonic()
        with pytest.raises(STORE_ERRORS):
            store.insert_event("particle", None, "e", "d", None, {})
        assert time.monotonic() - started < 8  # lock_timeout: 5 s, then a 503
    assert store.insert_event("particle", None, "e", "d", None, {})[1] is True


def _retried(operation: Any, seconds: float = 20.0) -> Any:
    """`operation`'s result once the store answers (the pool reconnects with a growing pause)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return operation()
        except STORE_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_store_opened_before_its_server_starts_works_once_it_does(tmp_path: Path) -> None:
    server = PostgresProcess()
    store = PostgresStore(server.url(), pool_size=2)  # nothing listens yet: no error now
    assert store.ping() is False
    with pytest.raises(STORE_ERRORS):
        store.insert_event("particle", None, "e", "d", None, {})
    server.start()
    try:
        assert _retried(lambda: store.insert_event("particle", None, "e", "d", None, {})) == ("1", True)
        server.restart()  # the pool's connections are now dead
        time.sleep(IDLE_CHECK_SECONDS + 0.5)
        assert store.insert_event("particle", None, "e", "d", None, {}) == ("2", True)  # checked, replaced
    finally:
        store.close()
        server.stop()


def test_a_url_libpq_cannot_read_is_refused_without_quoting_it(tmp_path: Path) -> None:
    bad = "postgresql://app:Sup3rSecret%zzPw@db:5432/x"
    with pytest.raises(ConfigError) as refused:
        load_settings(base_settings(tmp_path, DATABASE_URL=bad))
    assert "DATABASE_URL" in str(refused.value) and "Sup3r" not in str(refused.value)


# --------------------------------------------------------------------------- found in a second review


def test_while_the_database_is_away_the_way_in_answers_503_in_one_wait_not_three(tmp_path: Path) -> None:
    server = PostgresProcess()  # never started: nothing listens at its port
    app = create_app(base_settings(tmp_path, DATABASE_URL=server.url()))
    client = app.test_client()
    started = time.monotonic()
    answer = client.post("/webhook/particle", data=particle_event(), headers=bearer())
    first = time.monotonic() - started
    assert answer.status_code == 503 and answer.get_json()["error"] == "unavailable"
    started = time.monotonic()
    assert client.post("/webhook/particle", data=particle_event(data="2"), headers=bearer()).status_code == 503
    second = time.monotonic() - started
    assert first < POOL_WAIT_SECONDS + 1.5 and second < 0.5, (first, second)
    app.extensions["webhook_store"].close()


def test_after_a_restart_a_pool_full_of_dead_connections_costs_no_request(url: str, postgres: PostgresProcess) -> None:
    store = PostgresStore(url, pool_size=12)
    barrier = threading.Barrier(10)

    def hold() -> None:  # ten connections at once: the pool grows to ten
        with store.checked_out():
            barrier.wait()

    threads = [threading.Thread(target=hold) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    postgres.restart()
    time.sleep(IDLE_CHECK_SECONDS + 0.5)
    started = time.monotonic()
    assert store.insert_event("particle", None, "e", "d", None, {})[1] is True
    assert time.monotonic() - started < 1.5
    store.close()


def test_a_migration_may_outlast_the_connections_statement_timeout(
    postgres: PostgresProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres.new_database()
    monkeypatch.setitem(CONNECTION_SETTINGS, "options", "-c statement_timeout=1s -c lock_timeout=1s")
    monkeypatch.setattr(postgres_store, "POSTGRES_MIGRATIONS", (*POSTGRES_MIGRATIONS, "SELECT pg_sleep(1.5)"))
    store = PostgresStore(url)
    assert store.ping()
    assert store.connection().execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 2
    store.close()
    postgres.drop(url)


def test_a_worker_finding_another_dispatching_goes_on_without_waiting(url: str, tmp_path: Path) -> None:
    queue = _queue(url, tmp_path, ALERT_COOLDOWN_SECONDS="0")
    queue.store.insert_event("particle", None, "e", "d", None, {})
    with psycopg.connect(url) as other:  # another worker's dispatch, in progress
        other.execute("SELECT pg_advisory_xact_lock(%s, hashtext('cooldowns'))", (NAMED_LOCKS,))
        started = time.monotonic()
        assert queue.dispatch() == 0 and queue.close_windows() == 0
        assert time.monotonic() - started < 0.5
    assert queue.dispatch() == 1


@pytest.mark.parametrize(
    "password",
    ["Sup3r/SecretPw", "Sup3r@SecretPw", "Sup3r:Secret/Pw"],
)
def test_an_unencoded_password_is_refused_and_never_shown(tmp_path: Path, password: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(base_settings(tmp_path, DATABASE_URL=f"postgresql://app:{password}@127.0.0.1:5432/wh"))
    assert "DATABASE_URL" in str(refused.value)
    assert not any(piece in str(refused.value) for piece in ("Sup3r", "Secret", "Pw"))
