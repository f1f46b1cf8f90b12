"""Real servers the tests start themselves: redis-server and PostgreSQL from Debian's packages,
on free loopback ports, each stopped by its PID when done."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from tests.server import free_port


def debian_binary(name: str, package: str, pattern: str | None = None) -> str:
    """`name` on PATH (or at `pattern`), installed from Debian's `package` when missing and we may."""

    def found() -> str | None:
        hits = sorted(glob.glob(pattern)) if pattern else []
        return hits[-1] if hits else shutil.which(name)

    if (path := found()) is not None:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{name} is not installed and cannot be installed here: apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env, capture_output=True, timeout=600)
    return found() or pytest.fail(f"{name} still missing after apt-get install {package}")


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        args = [debian_binary("redis-server", "redis-server"), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
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


class PostgresProcess:
    """A throwaway PostgreSQL cluster: `initdb` into a temporary directory as the `postgres` user
    (PostgreSQL refuses to run as root), fsync off (tests only; `durable=True`, for benchmarks,
    keeps PostgreSQL's defaults: fsync, synchronous_commit, full_page_writes), on a free loopback port.

    `new_database()` gives each test a database of its own, copied from a template that already
    has the schema, so a test costs a CREATE DATABASE, not a migration."""

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="wh-pg-"))
        self.bin = Path(debian_binary("initdb", "postgresql", "/usr/lib/postgresql/*/bin/initdb")).parent
        self.template: str | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, *args: str, check: bool = True) -> None:
        command = list(args) if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
        if check and done.returncode != 0:  # say why: pg_ctl's own words, and the server's log
            log = (
                (self.directory / "log").read_text(errors="replace")[-2000:]
                if (self.directory / "log").exists()
                else ""
            )
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout!r} {done.stderr!r}\n{log}")

    def start(self) -> PostgresProcess:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        data = str(self.directory / "data")
        self._as_postgres(str(self.bin / "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "--locale=C.UTF-8")
        self._launch()
        return self

    def _launch(self) -> None:
        data = str(self.directory / "data")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} -c max_connections=300"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        # Each line names its database and its transaction (%v: the same for every statement of
        # one, savepoints included), for `statements`.
        options += " -c log_line_prefix='%d|%v|'"
        log = str(self.directory / "log")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", data, "-o", options, "-l", log, "start", "-w")

    def halt(self) -> None:
        """A fast shutdown, keeping the data: clients' connections break and new ones are refused."""
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "stop", "-m", "fast", "-w")

    def resume(self) -> None:
        """Start again after `halt`, on the same port."""
        self._launch()

    def restart(self) -> None:
        """A fast shutdown and a start again, on the same port: clients' connections break.
        (Not `pg_ctl restart`: the server it starts keeps this process's output pipe open.)"""
        self.halt()
        self.resume()

    def stop(self) -> None:
        data = str(self.directory / "data")
        try:
            # Not checked: a test that failed while the server was halted must show its own error.
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", data, "stop", "-m", "immediate", "-w", check=False)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def new_database(self) -> str:
        """The URL of a new, empty database with the current schema."""
        if self.template is None:
            from webhook_server.store.postgres import PostgresStore

            self._create("wh_template", None)
            PostgresStore(self.url("wh_template"), pool_size=1).close()
            self.template = "wh_template"
        name = f"wh_{uuid.uuid4().hex[:12]}"
        self._create(name, self.template)
        return self.url(name)

    def log_statements(self, url: str) -> None:
        """From now on, log every statement that new connections to `url`'s database run."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} SET log_statement = 'all'")  # type: ignore[arg-type]

    def statements(self, url: str) -> list[tuple[str, str]]:
        """(transaction, statement) for each statement logged for `url`'s database, in order."""
        prefix = url.rsplit("/", 1)[1] + "|"
        found = []
        for line in (self.directory / "log").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith(prefix):
                continue
            _, transaction, message = line.split("|", 2)
            # Simple queries log "statement: SQL", prepared ones "execute <name>: SQL".
            if message.startswith(("LOG:  statement: ", "LOG:  execute ")):
                found.append((transaction, message.split(": ", 2)[2]))
        return found

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]  # our own names

    def _create(self, name: str, template: str | None) -> None:
        copy = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}{copy}")  # type: ignore[arg-type]  # our own names
