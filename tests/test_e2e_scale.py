"""Several hosts: two `web` instances with DATA_DIRs of their own, two `worker`s, one PostgreSQL, one
Redis and a real SMTP server, all real processes on loopback."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import CORE_ID, PARTICLE_SECRET
from tests.server import Server
from tests.services import PostgresProcess, RedisProcess
from tests.smtpsink import SmtpSink
from tests.test_e2e_delivery import server_env
from tests.test_live_e2e import TOKEN_ALL, subscribe

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class Cluster:
    """Two webs (`a`, `b`) and two workers, each as if on a host of its own."""

    def __init__(self, tmp_path: Path, database_url: str, redis_url: str, smtp_port: int) -> None:
        self.tmp_path = tmp_path
        # The delivery e2e tests' settings (a fast retry and lease), on the shared store and Redis.
        self.env: dict[str, Any] = {
            **server_env(tmp_path, smtp_port, WORKER_POLL_SECONDS=0.2, WEB_CONCURRENCY=2),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "FLASK_SECRET_KEY": "shared-by-every-replica-0123456789",
            "SUBSCRIBER_TOKENS": f"{TOKEN_ALL}:*",
        }
        self.webs = {name: self.process(name, "web") for name in ("a", "b")}
        self.workers = [self.process(f"worker-{n}", "worker") for n in (1, 2)]
        self.redis: RedisProcess | None = None

    def process(self, host: str, command: str, **overrides: Any) -> Server:
        workdir = self.tmp_path / host
        workdir.mkdir(exist_ok=True)
        return Server({**self.env, "DATA_DIR": workdir / "data", **overrides}, workdir, command=command)

    def start(self) -> Cluster:
        for server in (*self.webs.values(), *self.workers):
            server.start()
        for worker in self.workers:
            wait_for_line(worker, "delivery worker started")
        return self

    def restart_worker(self, index: int) -> None:
        self.workers[index] = self.process(f"worker-{index + 1}", "worker").start()

    def stop(self) -> None:
        for server in (*self.webs.values(), *self.workers):
            server.stop()


def wait_for_line(server: Server, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.output():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{server.output()}"
        time.sleep(0.05)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def cluster(tmp_path: Path, postgres: PostgresProcess, sink: SmtpSink) -> Iterator[Cluster]:
    redis = RedisProcess(tmp_path).start()
    database = postgres.new_database()
    running = Cluster(tmp_path, database, redis.url, sink.port)
    running.redis = redis
    try:
        yield running.start()
    finally:
        running.stop()
        redis.stop()
        postgres.drop(database)


def particle_form(n: int, event: str = "motion") -> dict[str, str]:
    return {"event": event, "data": f"reading {n}", "coreid": CORE_ID, "published_at": f"2026-11-23T18:00:00.{n:03d}Z"}


def post(base_url: str, form: dict[str, str], session: Any = requests) -> requests.Response:
    headers = {"Authorization": f"Bearer {PARTICLE_SECRET}"}
    return session.post(f"{base_url}/webhook/particle", data=form, headers=headers, timeout=10)


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_300_events_across_two_webs_with_a_worker_killed_mid_burst(cluster: Cluster, sink: SmtpSink) -> None:
    """Every event's email arrives; a repeat only with the Message-ID of the first; a subscriber
    on web A sees every event posted to web B, in order."""
    stream = subscribe(cluster.webs["a"], "particle")
    acknowledged: dict[str, str] = {}  # event id -> the web that took it
    lock = threading.Lock()
    total, concurrency = 300, 20

    def sender(offset: int) -> None:
        session = requests.Session()
        for n in range(offset, total, concurrency):
            web = "a" if n % 2 else "b"
            response = post(cluster.webs[web].url, particle_form(n), session)
            assert response.status_code == 202, response.text
            with lock:
                acknowledged[response.json()["id"]] = web

    senders = [threading.Thread(target=sender, args=(i,)) for i in range(concurrency)]
    for thread in senders:
        thread.start()
    wait_until(lambda: len(sink.messages) >= 60, 60, "no mail is arriving")
    cluster.workers[0].kill()  # SIGKILL, with sends in flight
    cluster.restart_worker(0)
    for thread in senders:
        thread.join(timeout=120)
    assert len(acknowledged) == total

    def mailed() -> set[str]:
        return {str(m["X-Webhook-Event-Id"]) for m in list(sink.messages)}

    wait_until(lambda: set(acknowledged) <= mailed(), 90, "acknowledged events never mailed")
    time.sleep(1)  # a late repeat lands now, so the count of repeats is honest
    message_ids: dict[str, set[str]] = defaultdict(set)
    for message in list(sink.messages):
        message_ids[str(message["X-Webhook-Event-Id"])].add(str(message["Message-ID"]))
    sent = Counter(str(m["X-Webhook-Event-Id"]) for m in list(sink.messages))
    repeats = sum(count - 1 for count in sent.values())
    print(f"\nscale-out: {total} events over 2 webs, worker killed mid-burst: {len(sent)} mailed, {repeats} repeats")
    assert set(sent) == set(acknowledged)
    assert all(len(ids) == 1 for ids in message_ids.values()), "a repeat with another Message-ID"

    from_b = sorted((int(i) for i, web in acknowledged.items() if web == "b"))
    stream.wait_for(lambda ms: {int(m.id or 0) for m in ms} >= set(from_b), timeout=30)
    seen = [int(i) for i in stream.ids()]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) and set(seen) == {int(i) for i in acknowledged}
    stream.close()


def health(web: Server) -> dict[str, Any]:
    answer: dict[str, Any] = requests.get(f"{web.url}/health", timeout=10).json()
    return answer


def test_the_same_particle_event_posted_to_both_webs_is_stored_once(cluster: Cluster, sink: SmtpSink) -> None:
    form = particle_form(7, event="door-open")
    first, second = post(cluster.webs["a"].url, form), post(cluster.webs["b"].url, form)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    wait_until(lambda: len(sink.messages) >= 1, 20, "no mail")
    time.sleep(1)
    assert len(sink.messages) == 1
    shown = health(cluster.webs["a"])
    assert (shown["store"], shown["redis"], shown["rate_limit_storage"]) == ("postgresql", "reachable", "redis")
    assert "password" not in str(shown) and "postgresql://" not in str(shown)


def test_without_redis_events_are_still_taken_delivered_and_streamed(cluster: Cluster, sink: SmtpSink) -> None:
    stream = subscribe(cluster.webs["a"], "particle")
    assert cluster.redis is not None
    cluster.redis.stop()
    taken = [post(cluster.webs["b"].url, particle_form(n, event="after-redis")) for n in range(5)]
    assert [r.status_code for r in taken] == [202] * 5
    ids = {r.json()["id"] for r in taken}
    stream.wait_for(lambda ms: {m.id for m in ms} >= ids, timeout=15)  # from the stream's look at the store
    wait_until(lambda: {str(m["X-Webhook-Event-Id"]) for m in list(sink.messages)} >= ids, 30, "not delivered")
    wait_until(lambda: health(cluster.webs["b"])["redis"] == "unreachable", 10, "health still says reachable")
    stream.close()


def test_twenty_repeats_over_two_webs_and_two_workers_fold_into_one_alert_and_one_summary(
    tmp_path: Path, postgres: PostgresProcess, sink: SmtpSink
) -> None:
    redis = RedisProcess(tmp_path).start()
    database = postgres.new_database()
    cluster = Cluster(tmp_path, database, redis.url, sink.port)
    cluster.env["ALERT_COOLDOWN_SECONDS"] = 4
    cluster.webs = {name: cluster.process(name, "web") for name in ("a", "b")}
    cluster.workers = [cluster.process(f"worker-{n}", "worker") for n in (1, 2)]
    try:
        cluster.start()
        for n in range(20):
            web = cluster.webs["a" if n % 2 else "b"]
            assert post(web.url, particle_form(n, event="smoke")).status_code == 202
        wait_until(lambda: len(sink.messages) >= 2, 30, "no alert and summary")
        time.sleep(1.5)
        subjects = [str(m["Subject"]) for m in list(sink.messages)]
        assert len(subjects) == 2, subjects
        assert "19" in subjects[1], subjects  # the summary counts the 19 repeats
    finally:
        cluster.stop()
        redis.stop()
        postgres.drop(database)


def test_postgresql_away_for_a_while_then_back(tmp_path: Path, sink: SmtpSink) -> None:
    """A web and a worker on a PostgreSQL of their own, which is stopped and started again."""
    postgres = PostgresProcess().start()
    cluster = Cluster(tmp_path, postgres.url(), "", sink.port)
    del cluster.env["REDIS_URL"]
    web, worker = cluster.process("a", "web"), cluster.process("worker-1", "worker")
    try:
        web.start()
        worker.start()
        assert post(web.url, particle_form(1, event="before")).status_code == 202
        wait_until(lambda: len(sink.messages) == 1, 20, "no mail before the outage")
        postgres.halt()
        started = time.monotonic()
        refused = post(web.url, particle_form(2, event="during"))
        assert refused.status_code == 503 and refused.json()["error"] == "unavailable"
        # One wait for the pool (3 s), not one for each of the rate limit, the event and the audit
        # record (9 s); with room for a loaded machine.
        assert time.monotonic() - started < 7.5
        assert requests.get(f"{web.url}/health", timeout=10).status_code == 503
        postgres.resume()
        wait_until(lambda: post(web.url, particle_form(3, event="after")).status_code == 202, 20, "no 202 after")
        wait_until(lambda: len(sink.messages) == 2, 20, "no mail after the outage")
        assert worker.output().count("store error in worker") == 1
        wait_until(lambda: "the store answers the worker again" in worker.output(), 10, "worker did not say so")
    finally:
        web.stop()
        worker.stop()
        postgres.stop()
