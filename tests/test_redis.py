"""REDIS_URL: rate-limit counts and the live fan-out through a real Redis (Debian's redis-server, started here)."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import CORE_ID, PARTICLE_SECRET
from tests.server import Server
from tests.services import RedisProcess
from webhook_server import create_app

pytestmark = pytest.mark.e2e


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def post(server: Server, n: int) -> requests.Response:
    form = {"event": "motion", "data": str(n), "coreid": CORE_ID, "published_at": f"2026-11-23T18:02:{n:02d}Z"}
    headers = {"Authorization": f"Bearer {PARTICLE_SECRET}", "Connection": "close"}
    return requests.post(f"{server.url}/webhook/particle", data=form, headers=headers, timeout=5)


def test_rate_limit_counts_are_shared_through_redis(tmp_path: Path, redis_server: RedisProcess) -> None:
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "DATA_DIR": tmp_path / "data",
        "RATE_LIMIT": "10/minute",
        "REDIS_URL": redis_server.url,
        "WEB_CONCURRENCY": 2,
    }
    # Two web servers on one Redis stand for two replicas behind Traefik.
    with Server(env, tmp_path, command="web") as first, Server(env, tmp_path, command="web") as second:
        statuses = [post(first if n % 2 else second, n).status_code for n in range(30)]
        assert statuses.count(202) == 10, statuses
        assert statuses.count(429) == 20
        health = requests.get(first.url + "/health", timeout=5).json()
        assert health["rate_limit_storage"] == "redis"
    assert any(b"particle" in key for key in redis.Redis.from_url(redis_server.url).keys("*"))


def test_alarms_are_still_accepted_when_redis_is_down(tmp_path: Path, redis_server: RedisProcess) -> None:
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "DATA_DIR": tmp_path / "data",
        "RATE_LIMIT": "10/minute",
        "REDIS_URL": redis_server.url,
    }
    with Server(env, tmp_path, command="web") as server:
        assert post(server, 1).status_code == 202
        redis_server.stop()
        # The limiter's store is down: the event is still stored and acknowledged.
        assert post(server, 2).status_code == 202


def wait_for_health(server: Server, key: str, value: str, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        health: dict[str, object] = requests.get(server.url + "/health", timeout=5).json()
        if health.get(key) == value or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def test_health_says_when_redis_goes_away_and_comes_back(tmp_path: Path, redis_server: RedisProcess) -> None:
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "DATA_DIR": tmp_path / "data",
        "RATE_LIMIT": "3/minute",
        "REDIS_URL": redis_server.url,
    }
    with Server(env, tmp_path, command="web") as server:
        health = wait_for_health(server, "redis", "reachable")
        assert (health["status"], health["store"], health["redis"]) == ("healthy", "sqlite", "reachable")
        redis_server.stop()
        health = wait_for_health(server, "redis", "unreachable")
        assert (health["status"], health["redis"]) == ("healthy", "unreachable")  # degraded, not down
        assert [post(server, n).status_code for n in range(5)] == [202] * 5  # limits let it through
        redis_server.start()  # the same port: Redis is back, empty
        assert wait_for_health(server, "redis", "reachable")["redis"] == "reachable"
        # The limits work again, from a fresh count.
        assert [post(server, n).status_code for n in range(10, 14)] == [202, 202, 202, 429]
    assert "not configured" in json.dumps(redis_less_health(tmp_path))


def redis_less_health(tmp_path: Path) -> dict[str, object]:
    app = create_app({"PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET, "DATA_DIR": str(tmp_path / "plain")})
    body: dict[str, object] = app.test_client().get("/health").get_json()
    return body


SUBSCRIBER_TOKEN = "subscriber-token-0123456789"


class LiveStream:
    """`GET /events/particle` on one server, read in a thread: each event's id and when it came."""

    def __init__(self, server: Server) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.conn.request("GET", "/events/particle", headers={"Authorization": f"Bearer {SUBSCRIBER_TOKEN}"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        self.arrived: queue.Queue[tuple[str, float]] = queue.Queue()
        self.live = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.live.wait(10), "no ': live' from the stream"

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            for raw in iter(self.response.readline, b""):
                line = raw.decode().rstrip("\n")
                if line == ": live":
                    self.live.set()
                elif line.startswith("id: "):
                    self.arrived.put((line[4:], time.monotonic()))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end, then we close
        self.reader.join(timeout=5)
        self.conn.close()


def post_and_wait(server: Server, stream: LiveStream, n: int) -> tuple[float, float]:
    """POST event `n` to `server`: (seconds the POST took, seconds until `stream` had it)."""
    start = time.monotonic()
    response = post(server, n)
    answered = time.monotonic() - start
    assert response.status_code == 202, response.text
    event_id, at = stream.arrived.get(timeout=5)
    assert event_id == str(response.json()["id"])
    return answered, at - start


def test_the_live_stream_reaches_other_replicas_through_redis(tmp_path: Path, redis_server: RedisProcess) -> None:
    """Two servers on one SQLite file, each with a DATA_DIR of its own (so each has its own doorbell
    directory: the file is reached through a symlink): only Redis can wake A for B's events at once."""
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "RATE_LIMIT": "1000/minute",
        "REDIS_URL": redis_server.url,
        "SUBSCRIBER_TOKENS": f"{SUBSCRIBER_TOKEN}:particle",
        "WEB_CONCURRENCY": 2,
    }
    (tmp_path / "b").mkdir(mode=0o700)
    with Server({**env, "DATA_DIR": tmp_path / "a"}, tmp_path, command="web") as a:
        (tmp_path / "b" / "webhooks.sqlite3").symlink_to(tmp_path / "a" / "webhooks.sqlite3")
        with Server({**env, "DATA_DIR": tmp_path / "b"}, tmp_path, command="web") as b:
            stream = LiveStream(a)
            try:
                # Each POST right after the last event came: the poll alone would take about 1 s.
                fast = [post_and_wait(b, stream, n)[1] for n in range(8)]
                assert max(fast) < 0.5, fast

                redis_server.stop()
                down = [post_and_wait(b, stream, n) for n in range(10, 15)]
                assert max(took for took, _ in down) < 0.5, down  # ingest does not wait for Redis
                # Still delivered, by the once-a-second poll (so the fast path above was Redis).
                assert all(0.5 < came < 2.0 for _, came in down[1:]), down

                redis_server.start()
                deadline = time.monotonic() + 20
                n = 20
                while post_and_wait(b, stream, n)[1] > 0.3:
                    assert time.monotonic() < deadline, "the fast path did not come back"
                    n += 1
                back = [post_and_wait(b, stream, m)[1] for m in range(40, 48)]
                assert max(back) < 0.5, back
            finally:
                stream.close()
        # Said once per process that published (each of B's two workers may have).
        assert b.output().count("cannot publish to Redis") in (1, 2), b.output()
        assert b.output().count("publishing to Redis again") == b.output().count("cannot publish to Redis")
    # Only the worker holding the stream listens.
    assert a.output().count("live fan-out: lost Redis") == 1, a.output()
    assert a.output().count("Redis is back") == 1
