"""REDIS_URL: rate-limit counts shared through a real Redis (Debian's redis-server, started here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import CORE_ID, PARTICLE_SECRET
from tests.server import Server, free_port

pytestmark = pytest.mark.e2e


def redis_server_binary() -> str:
    """redis-server, installed from Debian's packages when it is missing and we may."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("redis-server is not installed and cannot be installed here: apt-get install redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
    install = ["apt-get", "install", "-y", "-qq", "redis-server"]
    subprocess.run(install, check=True, env=env, capture_output=True, timeout=300)
    return shutil.which("redis-server") or pytest.fail("redis-server still missing after apt-get install")


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


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
