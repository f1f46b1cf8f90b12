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


def flood(port: int, total: int, threads: int = 6) -> tuple[Counter[int], float]:
    """`total` requests with a wrong token from ATTACKER; (statuses, seconds taken)."""
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    headers = {
        "Authorization": "Bearer guessing-0123456789abcdef",
        "Content-Type": "application/json",
        "X-Forwarded-For": ATTACKER,
    }
    body = json.dumps({"event": "x", "data": "1", "coreid": "c", "published_at": "2026-12-01T10:00:00Z"}).encode()

    def run(share: int) -> None:
        mine: Counter[int] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(share):
            mine[post(conn, body, headers)] += 1
        conn.close()
        with lock:
            statuses.update(mine)

    began = time.perf_counter()
    workers = [threading.Thread(target=run, args=(total // threads + (i < total % threads),)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statuses, time.perf_counter() - began


def during_flood(port: int, secret: str, total: int, events: int) -> tuple[Trickle, Counter[int], float]:
    """A trickle of `events` real ones while `total` refused requests flood in."""
    box: dict[str, tuple[Counter[int], float]] = {}
    attacker = threading.Thread(target=lambda: box.update(result=flood(port, total)))
    attacker.start()
    time.sleep(0.3)  # the flood is under way
    accepted = trickle(port, secret, events, start=10_000)
    attacker.join()
    statuses, seconds = box["result"]
    return accepted, statuses, seconds
