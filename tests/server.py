"""Real processes for end-to-end tests: `webhook-server serve` (Gunicorn + worker) on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`webhook-server <command>` in its own process group, with a clean environment."""

    def __init__(self, env: dict[str, Any], workdir: Path, command: str = "serve", port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.command = command
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            **{k: str(v) for k, v in env.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Server:
        args = [sys.executable, "-m", "webhook_server", self.command]
        if self.command in ("serve", "web"):
            args += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.command in ("serve", "web"):
            self.wait_healthy(timeout)
            self.wait_workers_ready(timeout)
        return self

    def wait_workers_ready(self, timeout: float) -> None:
        """Every Gunicorn worker booted: /health answers from the first one, and a test that needs
        both (or signals them) must not race a second still booting on a loaded machine."""
        workers = int(self.env.get("WEB_CONCURRENCY", "2"))
        if self.env.get("LOG_LEVEL", "info").lower() not in ("debug", "info"):
            return  # the line is not written
        deadline = time.monotonic() + timeout
        while self.output().count("Worker ready") < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{workers} workers not ready after {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: Gunicorn master, its workers and the delivery worker."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        # SIGTERM to the server's own process only, as `docker stop` and systemd send it: it
        # stops its children itself. SIGTERM to the whole group raced Gunicorn: a worker that
        # got it exited, the master booted a replacement before handling its own SIGTERM, and
        # that replacement (still in the master's signal handlers) ignored it, so the master
        # waited out graceful_timeout (20 s) for it.
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            with contextlib.suppress(ProcessLookupError):  # nothing of it may outlive the test
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        self.log.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
