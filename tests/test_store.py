"""The store's write path: group commit, WAL checkpoints, concurrent inserts from threads and processes."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import new_store
from webhook_server.store.group import Checkpointer, GroupWriter
from webhook_server.store.sqlite import Store

PAYLOAD = {"event": "t", "data": "x", "coreid": "0123456789abcdef01234567", "published_at": "2026-11-23T18:02:11Z"}


def _insert_many(path: Path, prefix: str, threads: int, per_thread: int) -> list[tuple[str, bool]]:
    store = new_store(path) if os.environ.get("DATABASE_URL") else Store(path, busy_timeout_ms=0)
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(per_thread):
            # Every third key repeats one already sent by this thread: a redelivery.
            key = f"{prefix}-{t}-{i - i % 3}"
            result = store.insert_event("particle", key, "e", "d", "127.0.0.1", PAYLOAD)
            with lock:
                results.append(result)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


@pytest.mark.usefixtures("each_store")
def test_concurrent_inserts_get_their_own_ids_and_duplicates_the_first(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    results = _insert_many(path, "a", threads=8, per_thread=60)
    created = [event_id for event_id, new in results if new]
    duplicates = [event_id for event_id, new in results if not new]
    assert len(created) == len(set(created)) == 8 * 20
    # Each key was sent three times: once created, twice answered with the first id.
    assert Counter(duplicates) == Counter({event_id: 2 for event_id in created})
    assert _count_events(path) == 160


def _count_events(path: Path) -> int:
    return int(new_store(path).connection().execute("SELECT COUNT(*) FROM events").fetchone()[0])


def _child(path: str, prefix: str, queue: multiprocessing.Queue[list[tuple[str, bool]]]) -> None:
    queue.put(_insert_many(Path(path), prefix, threads=4, per_thread=45))


@pytest.mark.usefixtures("each_store")
def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    new_store(path)
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[tuple[str, bool]]] = context.Queue()
    children = [context.Process(target=_child, args=(str(path), p, queue)) for p in ("p", "q")]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    created = [event_id for part in results for event_id, new in part if new]
    assert len(created) == len(set(created)) == 2 * 4 * 15
    assert _count_events(path) == 120


def _writer(path: Path, interval: float = 0.5, timeout: float = 5.0) -> tuple[GroupWriter, sqlite3.Connection]:
    """`timeout` is the connection's own busy timeout (Python's default is 5 s); the web processes use 0."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER)")
    return GroupWriter(lambda: conn, Checkpointer(interval)), conn


def test_one_failing_write_spoils_no_other_in_its_group(tmp_path: Path) -> None:
    writer, conn = _writer(tmp_path / "g.sqlite3")
    barrier = threading.Barrier(6)
    outcomes: dict[int, object] = {}

    def work(n: int) -> None:
        barrier.wait()
        try:
            # n == 3 inserts a key that exists: a constraint error for that write alone.
            key = "k0" if n == 3 else f"k{n}"
            outcomes[n] = writer.run(lambda c: c.execute("INSERT INTO t VALUES (?, ?)", (key, n)).rowcount)
        except sqlite3.IntegrityError as exc:
            outcomes[n] = exc

    writer.run(lambda c: c.execute("INSERT INTO t VALUES ('k0', 0)"))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(outcomes.pop(3), sqlite3.IntegrityError)
    assert outcomes == {n: 1 for n in (1, 2, 4, 5, 6)}
    keys = {row[0] for row in conn.execute("SELECT k FROM t")}
    assert keys == {"k0", "k1", "k2", "k4", "k5", "k6"}


def test_a_write_that_raises_a_non_sqlite_error_gets_it_back(tmp_path: Path) -> None:
    writer, _ = _writer(tmp_path / "g.sqlite3")

    def broken(c: sqlite3.Connection) -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        writer.run(broken)
    assert writer.run(lambda c: c.execute("SELECT 7").fetchone()[0]) == 7


def test_a_locked_database_fails_the_group_after_the_patience(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import webhook_server.store.group as store_module

    monkeypatch.setattr(store_module, "WRITE_PATIENCE_SECONDS", 0.2)
    path = tmp_path / "g.sqlite3"
    # No busy timeout of the connection's own (as in the web processes): the patience alone waits.
    writer, _ = _writer(path, timeout=0)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            writer.run(lambda c: c.execute("INSERT INTO t VALUES ('x', 1)"))
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
    assert 0.2 <= waited < 2.0, waited  # the patched patience, not the default 5 s
    assert writer.run(lambda c: c.execute("INSERT INTO t VALUES ('x', 1)").rowcount) == 1


def test_writes_are_checkpointed_into_the_database_file(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    writer, _ = _writer(path, interval=0.0)
    for n in range(50):
        writer.run(lambda c, n=n: c.execute("INSERT INTO t VALUES (?, ?)", (f"k{n}", n)))
    # `immutable` reads the database file alone, not the WAL: the rows are there only if a
    # checkpoint copied them (automatic checkpoints are off).
    main_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    assert main_file.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 50


def test_without_a_due_checkpoint_the_rows_stay_in_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    writer, _ = _writer(path, interval=3600.0)
    writer.run(lambda c: c.execute("SELECT 1"))  # the first group checkpoints at once
    for n in range(5):
        writer.run(lambda c, n=n: c.execute("INSERT INTO t VALUES (?, ?)", (f"k{n}", n)))
    main_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    assert main_file.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0


def test_store_connections_leave_checkpoints_to_the_writers(tmp_path: Path) -> None:
    store = Store(tmp_path / "w.sqlite3")
    assert store.connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    assert store.connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_wal_stays_small_under_many_writes(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    store = Store(path)
    store.checkpointer.interval = 0.0
    for i in range(400):
        store.insert_event("particle", f"k{i}", "e", "d", None, PAYLOAD)
    wal = path.with_name(path.name + "-wal")
    # Checkpointed and restarted as it goes: far below 400 transactions' worth of pages.
    assert wal.stat().st_size < 400 * 4096


def test_the_fallback_checkpoints_only_after_enough_commits(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    writer = GroupWriter(lambda: conn, Checkpointer(interval=0.0, min_commits=3))
    writer.run(lambda c: c.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))
    writer.run(lambda c: c.execute("INSERT INTO t VALUES ('a')"))
    main_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    assert main_file.execute("SELECT name FROM sqlite_master").fetchall() == []
    writer.run(lambda c: c.execute("INSERT INTO t VALUES ('b')"))  # the third commit
    main_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    assert main_file.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 2


def test_a_transaction_lost_mid_group_fails_every_write_and_stores_none(tmp_path: Path) -> None:
    from webhook_server.store.group import GroupAborted

    writer, conn = _writer(tmp_path / "g.sqlite3")
    outcomes: dict[str, object] = {}

    def hold(c: sqlite3.Connection) -> None:
        # Lead a group of one until the next three writes are queued behind it.
        deadline = time.monotonic() + 5
        while len(writer._queue) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)

    def lost(c: sqlite3.Connection) -> None:
        # What SQLite does on an I/O error: it rolls the whole transaction back.
        c.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    def call(name: str, operation: Callable[[sqlite3.Connection], object]) -> None:
        try:
            outcomes[name] = writer.run(operation)
        except sqlite3.Error as exc:
            outcomes[name] = exc

    first = threading.Thread(target=writer.run, args=(hold,))
    first.start()
    time.sleep(0.02)
    threads = []
    for name, operation in (
        ("before", lambda c: c.execute("INSERT INTO t VALUES ('before', 1)").rowcount),
        ("lost", lost),
        ("after", lambda c: c.execute("INSERT INTO t VALUES ('after', 2)").rowcount),
    ):
        thread = threading.Thread(target=call, args=(name, operation))
        thread.start()
        threads.append(thread)
        time.sleep(0.02)
    for thread in [first, *threads]:
        thread.join(timeout=10)
    assert all(isinstance(outcomes[name], GroupAborted) for name in ("before", "lost", "after")), outcomes
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
    assert writer.run(lambda c: c.execute("INSERT INTO t VALUES ('later', 3)").rowcount) == 1


def test_a_new_store_is_private_to_its_user(tmp_path: Path) -> None:
    """The store holds every payload: a fresh DATA_DIR is 0700, the database files 0600."""
    data = tmp_path / "fresh" / "data"
    store = Store(data / "webhooks.sqlite3")
    store.insert_event("particle", None, "motion", "", "127.0.0.1", {"data": "x"})
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    for name in ("webhooks.sqlite3", "webhooks.sqlite3-wal", "webhooks.sqlite3-shm"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name


def test_an_existing_data_dir_keeps_its_mode(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    data.chmod(0o750)  # a volume the operator set up
    Store(data / "webhooks.sqlite3")
    assert stat.S_IMODE(data.stat().st_mode) == 0o750
    assert stat.S_IMODE((data / "webhooks.sqlite3").stat().st_mode) == 0o600


def test_a_store_that_does_not_answer_is_a_json_503_never_a_500(make_app: Callable[..., Any]) -> None:
    """A poll reads the store before its stream starts, and any store error a view lets through
    (SQLite's or PostgreSQL's) is answered as the store being unavailable."""
    import psycopg

    app = make_app(SUBSCRIBER_TOKENS="sub-token-0123456789abcdef:*")
    store = app.extensions["webhook_store"]

    def down(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.OperationalError("the server went away")

    store.connection = down
    client = app.test_client()
    headers = {"Authorization": "Bearer sub-token-0123456789abcdef"}
    answer = client.get("/events/particle?poll=1&since=0", headers=headers)
    assert answer.status_code == 503 and answer.get_json()["error"] == "unavailable"
    assert answer.headers["Retry-After"] == "5"
    assert client.get("/health").status_code == 503
