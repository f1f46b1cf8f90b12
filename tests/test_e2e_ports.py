"""`serve` and `web` never share a port: a second server, or another program, on it stops them at start."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import PARTICLE_SECRET
from tests.server import Server, free_port

pytestmark = pytest.mark.e2e

OTHER_SECRET = "another-particle-secret-987654"


def env_for(work: Path, secret: str) -> dict[str, object]:
    return {"PARTICLE_WEBHOOK_SECRET": secret, "DATA_DIR": work / "data", "RATE_LIMIT": "1000/second"}


def run_cli(
    args: list[str], work: Path, env: dict[str, object], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhook_server", *args],
        cwd=work,
        env={"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8", **{k: str(v) for k, v in env.items()}},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def first(tmp_path: Path) -> Iterator[Server]:
    work = tmp_path / "first"
    work.mkdir()
    with Server(env_for(work, PARTICLE_SECRET), work) as server:
        yield server


@pytest.mark.parametrize("command", ["serve", "web"])
def test_a_second_server_on_a_port_in_use_refuses_and_the_first_keeps_every_request(
    first: Server, tmp_path: Path, command: str
) -> None:
    work = tmp_path / "second"
    work.mkdir()
    metrics_files = sorted((first.workdir / "data" / "prometheus").glob("*.db"))
    assert metrics_files
    started = time.monotonic()
    result = run_cli([command, "--host", "127.0.0.1", "--port", str(first.port)], work, env_for(work, OTHER_SECRET))
    assert result.returncode == 2
    assert time.monotonic() - started < 15
    assert f"port {first.port}" in result.stderr
    assert "listening on" not in result.stderr
    # The first server alone answers: every send with its secret is accepted.
    send_env = env_for(first.workdir, PARTICLE_SECRET)
    for n in range(10):
        sent = run_cli(["send", "--url", first.url, json.dumps({"event": "motion", "data": str(n)})], work, send_env)
        assert sent.stdout.startswith("202 "), sent.stdout + sent.stderr
    # ... and its Prometheus files were left alone.
    assert set(metrics_files) <= set((first.workdir / "data" / "prometheus").glob("*.db"))


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize("command", ["serve", "web"])
def test_a_port_held_by_another_program_fails_fast_naming_it(tmp_path: Path, held_port: int, command: str) -> None:
    started = time.monotonic()
    result = run_cli([command, "--port", str(held_port)], tmp_path, env_for(tmp_path, PARTICLE_SECRET))
    assert result.returncode == 2
    assert time.monotonic() - started < 15
    assert f"port {held_port} on 127.0.0.1 is already in use" in result.stderr


def test_plain_gunicorn_with_our_config_also_refuses_a_held_port(tmp_path: Path, held_port: int) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "gunicorn", "-c", "python:webhook_server.gunicorn_conf"),
            *("--bind", f"127.0.0.1:{held_port}", "webhook_server:create_app()"),
        ],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            **{k: str(v) for k, v in env_for(tmp_path, PARTICLE_SECRET).items()},
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 15
    assert f"port {held_port}" in result.stdout + result.stderr
    assert "Booting worker" not in result.stdout + result.stderr


def test_the_listening_line_names_the_address(first: Server) -> None:
    requests.get(first.url + "/health", timeout=5)
    lines = [json.loads(line) for line in first.output().splitlines() if line.startswith("{")]
    listening = [entry["message"] for entry in lines if entry["message"].startswith("Listening at")]
    assert listening == [f"Listening at: http://127.0.0.1:{first.port} ({listening[0].rsplit('(', 1)[1]}"]
    assert "Listening at:  (" not in first.output()


def test_a_free_port_after_a_server_stopped_can_be_used_again(tmp_path: Path) -> None:
    port = free_port()
    for attempt in range(2):
        work = tmp_path / str(attempt)
        work.mkdir()
        with Server(env_for(work, PARTICLE_SECRET), work, port=port) as server:
            # A connection leaves TIME_WAIT behind: that must not count as "in use".
            assert requests.get(server.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_group_stops_everything_at_once(tmp_path: Path, signum: int) -> None:
    """Ctrl-C in a terminal reaches every process of `serve` and, forwarded, the children again:
    the delivery worker once deadlocked on the second one and held the stop for 30 s."""
    server = Server(env_for(tmp_path, PARTICLE_SECRET), tmp_path).start()
    assert server.process is not None
    # Running, not starting: /health answers as soon as one web worker is up, before the other
    # and the delivery worker are. A signal to a Gunicorn worker still booting is lost (it meets
    # the master's inherited handlers) and the stop then waits out graceful_timeout.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
        "delivery worker started" in server.output() and server.output().count("Worker ready") >= 2
    ):
        time.sleep(0.05)
    started = time.monotonic()
    os.killpg(server.process.pid, signum)
    server.process.wait(timeout=25)
    took = time.monotonic() - started
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, 0)
        pytest.fail("a process of the group outlived the stop")
    server.process = None
    server.log.close()
    output = server.output()
    # The bug held the stop for 30 s; a loaded machine may take a few seconds.
    assert took < 15, f"stopping took {took:.1f} s:\n{output[-3000:]}"
    assert "delivery worker stopped" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
