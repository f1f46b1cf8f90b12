"""A refused flood and a trickle of real events against a running server, for the audit's test
and `bench/flood`: keep-alive HTTP/1.1 clients in threads, nothing but the standard library."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlencode

ATTACKER = "203.0.113.9"
SENDER = "198.51.100.7"


def particle_form(n: int) -> bytes:
    fields = {"event": "temp", "data": str(n), "coreid": "0123456789abcdef01234567"}
    return urlencode({**fields, "published_at": f"2026-12-01T10:00:{n % 60:02d}.000Z"}).encode()


@dataclass
class Trickle:
    """Accepted events posted one at a time: their statuses and latencies in seconds."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def median_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))] * 1000


def post(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> int:
    conn.request("POST", "/webhook/particle", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


def trickle(port: int, secret: str, count: int, start: int = 0, pause: float = 0.06) -> Trickle:
    """`count` real events from SENDER, one after another."""
    result = Trickle()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {
        "Authorization": f"Bearer {secret}",
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Forwarded-For": SENDER,
    }
    for n in range(start, start + count):
        began = time.perf_counter()
        result.statuses[post(conn, particle_form(n), headers)] += 1
        result.latencies.append(time.perf_counter() - began)
        time.sleep(pause)
    conn.close()
    return result


def attacker(n: int, addresses: int) -> str:
    """The address of request `n`: ATTACKER, or one of `addresses` in 10.0.0.0/8 (a botnet)."""
    if addresses <= 1:
        return ATTACKER
    k = n % addresses
    return f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}"


def flood(port: int, total: int, threads: int = 6, addresses: int = 1) -> tuple[Counter[int], float]:
    """`total` requests with a wrong token from ATTACKER (or `addresses` of them); (statuses, seconds)."""
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    headers = {"Authorization": "Bearer guessing-0123456789abcdef", "Content-Type": "application/json"}
    body = json.dumps({"event": "x", "data": "1", "coreid": "c", "published_at": "2026-12-01T10:00:00Z"}).encode()

    def run(share: int, first: int) -> None:
        mine: Counter[int] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for n in range(first, first + share):
            mine[post(conn, body, {**headers, "X-Forwarded-For": attacker(n, addresses)})] += 1
        conn.close()
        with lock:
            statuses.update(mine)

    began = time.perf_counter()
    shares = [total // threads + (i < total % threads) for i in range(threads)]
    workers = [threading.Thread(target=run, args=(share, sum(shares[:i]))) for i, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statuses, time.perf_counter() - began


def during_flood(
    port: int, secret: str, total: int, events: int, addresses: int = 1, start: int = 10_000
) -> tuple[Trickle, Counter[int], float]:
    """A trickle of `events` real ones while `total` refused requests flood in."""
    box: dict[str, tuple[Counter[int], float]] = {}
    attack = threading.Thread(target=lambda: box.update(result=flood(port, total, addresses=addresses)))
    attack.start()
    time.sleep(0.3)  # the flood is under way
    accepted = trickle(port, secret, events, start=start)
    attack.join()
    statuses, seconds = box["result"]
    return accepted, statuses, seconds
