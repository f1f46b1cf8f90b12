"""A small closed-loop HTTP/1.1 load generator, for machines without wrk.

Each of `processes` processes runs an asyncio loop holding its share of `connections` keep-alive
connections; each connection sends one request, waits for the whole answer, records the latency
and sends the next, until the deadline. Slower than wrk (it is Python, and it competes with the
server for the same cores), so its figures are lower bounds: prefer wrk where it is installed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# (process index, connection index, request number) -> the raw request bytes.
RequestFactory = Callable[[int, int, int], bytes]


@dataclass
class LoadResult:
    """What one run measured: latencies in seconds, statuses and socket errors."""

    duration: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile in seconds (0 when nothing completed)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    def merge(self, other: LoadResult) -> None:
        self.duration = max(self.duration, other.duration)
        self.latencies.extend(other.latencies)
        self.statuses.update(other.statuses)
        self.errors += other.errors


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep-alive) after reading the whole response; raises on a broken one."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    keep_alive = status_line.startswith(b"HTTP/1.1")
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
        elif name == b"transfer-encoding":
            raise ConnectionError("chunked responses are not supported")
    if length:
        await reader.readexactly(length)
    return status, keep_alive


async def _connection(
    host: str, port: int, make: RequestFactory, proc: int, conn: int, deadline: float, result: LoadResult
) -> None:
    number = 0
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    while time.perf_counter() < deadline:
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection(host, port)
            request = make(proc, conn, number)
            number += 1
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            remaining = max(0.001, deadline + 5 - started)
            status, keep_alive = await asyncio.wait_for(_read_response(reader), remaining)
            result.latencies.append(time.perf_counter() - started)
            result.statuses[status] += 1
            if not keep_alive:
                writer.close()
                writer = reader = None
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            result.errors += 1
            if writer is not None:
                writer.close()
            writer = reader = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _process_main(
    host: str, port: int, make: RequestFactory, proc: int, connections: int, duration: float
) -> LoadResult:
    result = LoadResult()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(_connection(host, port, make, proc, conn, deadline, result) for conn in range(connections)))
    result.duration = time.perf_counter() - started
    return result


def _child(
    queue: multiprocessing.Queue[LoadResult],
    host: str,
    port: int,
    make: RequestFactory,
    proc: int,
    connections: int,
    duration: float,
) -> None:
    # Ctrl-C reaches the whole foreground process group: the parent stops us, not the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    queue.put(asyncio.run(_process_main(host, port, make, proc, connections, duration)))


def run_load(
    host: str, port: int, make: RequestFactory, connections: int, duration: float, processes: int
) -> LoadResult:
    """Spread `connections` over `processes` forked processes for `duration` seconds."""
    processes = max(1, min(processes, connections))
    context = multiprocessing.get_context("fork")  # the factory may be a closure
    queue: multiprocessing.Queue[LoadResult] = context.Queue()
    shares = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    children = [
        context.Process(target=_child, args=(queue, host, port, make, i, share, duration), daemon=True)
        for i, share in enumerate(shares)
    ]
    for child in children:
        child.start()
    merged = LoadResult()
    try:
        for _ in children:
            merged.merge(queue.get(timeout=duration + 30))
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join(timeout=5)
    return merged
