"""Rate limits: counted with the stored event in one transaction, and refused requests counted too."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from webhook_server.errors import RateLimited
from webhook_server.ingest.ratelimit import RateLimits, get_rate_limits
from webhook_server.ingest.sources import Source
from webhook_server.store.base import EventStore
from webhook_server.store.counters import StoreCounters

from .conftest import bearer, new_store, particle_event

pytestmark = pytest.mark.usefixtures("each_store")

SOURCE = Source(name="particle", scheme="bearer", secrets=("x" * 20,))


def _limits(tmp_path: Path, limit: str) -> tuple[RateLimits, EventStore]:
    store = new_store(tmp_path / "webhooks.sqlite3")
    return RateLimits(StoreCounters(store), limit), store


def _events(store: EventStore) -> int:
    return int(store.connection().execute("SELECT COUNT(*) FROM events").fetchone()[0])


def test_an_accepted_event_is_counted_in_its_own_transaction(tmp_path: Path) -> None:
    limits, store = _limits(tmp_path, "2/minute")
    for n in range(2):
        hit = limits.check(SOURCE, "192.0.2.1")
        assert not hit.counted  # only read so far
        store.insert_event("particle", f"k{n}", "e", "d", None, {}, before=hit.count_in)
        assert hit.counted
    with pytest.raises(RateLimited) as refused:
        limits.check(SOURCE, "192.0.2.1")
    assert 1 <= refused.value.retry_after <= 60
    assert _events(store) == 2


def test_a_window_filled_after_the_check_refuses_the_event_and_stores_nothing(tmp_path: Path) -> None:
    limits, store = _limits(tmp_path, "1/minute")
    hit = limits.check(SOURCE, "192.0.2.1")  # the window is empty when checked ...
    limits.check(SOURCE, "192.0.2.1").count()  # ... and another request fills it meanwhile
    with pytest.raises(RateLimited):
        store.insert_event("particle", "k", "e", "d", None, {}, before=hit.count_in)
    assert _events(store) == 0


def test_concurrent_requests_get_exactly_the_limit(tmp_path: Path) -> None:
    limits, store = _limits(tmp_path, "25/minute")
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def client(t: int) -> None:
        barrier.wait()
        for n in range(10):
            try:
                hit = limits.check(SOURCE, "192.0.2.1")
                store.insert_event("particle", f"k{t}-{n}", "e", "d", None, {}, before=hit.count_in)
                outcome = "stored"
            except RateLimited:
                outcome = "refused"
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == {"stored": 25, "refused": 55}
    assert _events(store) == 25


def test_limits_are_per_client_address(tmp_path: Path) -> None:
    limits, store = _limits(tmp_path, "1/minute")
    store.insert_event("particle", "a", "e", "d", None, {}, before=limits.check(SOURCE, "192.0.2.1").count_in)
    store.insert_event("particle", "b", "e", "d", None, {}, before=limits.check(SOURCE, "192.0.2.2").count_in)
    with pytest.raises(RateLimited):
        limits.check(SOURCE, "192.0.2.1")


def test_unauthenticated_requests_use_up_the_limit(make_app: Callable[..., Flask]) -> None:
    client = make_app(RATE_LIMIT="3/minute").test_client()
    for _ in range(3):
        assert client.post("/webhook/particle", json=particle_event(), headers=bearer("wrong" * 5)).status_code == 401
    response = client.post("/webhook/particle", json=particle_event(), headers=bearer())
    assert response.status_code == 429
    assert response.json is not None and response.json["error"] == "rate_limited"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"{", 400, id="malformed"),
        pytest.param(b'{"event": "x"}', 422, id="invalid"),
    ],
)
def test_refused_bodies_use_up_the_limit_and_keep_their_own_status(
    make_app: Callable[..., Flask], body: bytes, status: int
) -> None:
    client = make_app(RATE_LIMIT="2/minute").test_client()
    headers = {**bearer(), "Content-Type": "application/json"}
    # The third is over the limit: refused with 429 before its body is looked at.
    statuses = [client.post("/webhook/particle", data=body, headers=headers).status_code for _ in range(3)]
    assert statuses == [status, status, 429]


def test_a_broken_counter_store_lets_events_through(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(RATE_LIMIT="1/minute")
    with app.app_context():
        storage = get_rate_limits().storage
    assert isinstance(storage, StoreCounters)

    def broken(*args: object, **kwargs: object) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    storage.get = broken  # type: ignore[method-assign]
    storage.incr = broken  # type: ignore[method-assign]
    client = app.test_client()
    statuses = [
        client.post("/webhook/particle", json=particle_event(data=str(n)), headers=bearer()).status_code
        for n in range(3)
    ]
    assert statuses == [202, 202, 202]
    said = [r for r in caplog.records if "rate limit storage failed" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None  # once an outage, not a traceback a request


def test_a_data_dir_with_url_characters_works(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    data_dir = tmp_path / "alarms#2 %41"
    client = make_app(DATA_DIR=str(data_dir), RATE_LIMIT="5/minute").test_client()
    assert client.post("/webhook/particle", json=particle_event(), headers=bearer()).status_code == 202
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("alarms")) == ["alarms#2 %41"]


def test_a_counter_that_cannot_be_written_lets_the_event_through(tmp_path: Path) -> None:
    limits, store = _limits(tmp_path, "5/minute")
    hit = limits.check(SOURCE, "192.0.2.1")
    store.connection().execute("DROP TABLE counters")
    assert store.insert_event("particle", "k", "e", "d", None, {}, before=hit.count_in)[1] is True
    assert _events(store) == 1


def test_counter_connections_keep_the_event_store_durable(tmp_path: Path, each_store: str) -> None:
    if each_store != "sqlite":
        pytest.skip("SQLite's synchronous setting")
    limits, _ = _limits(tmp_path, "5/minute")
    assert isinstance(limits.storage, StoreCounters)
    # NORMAL (1), not OFF (0): the counters share the event store's file.
    assert limits.storage.store.connection().execute("PRAGMA synchronous").fetchone()[0] == 1
