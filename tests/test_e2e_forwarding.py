"""Forwarding against real processes: `webhook-server serve` (Gunicorn + worker), a real HTTP
target (`tests.receiver`, which verifies every Standard Webhooks signature) and a real SMTP server.

A kill -9 mid-burst loses no acknowledged event and re-sends one only under its `webhook-id`; a
slow target and a dead one hold back neither the mail nor another target."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import WEBHOOK_SECRET, assert_accepted, signed_headers
from tests.receiver import Arrival, Receiver, Reply
from tests.server import Server, free_port
from tests.smtpsink import SmtpSink

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

SIGNING = "whsec_" + base64.b64encode(b"e2e-forwarding-key-0123456789abc").decode()
HOOK_SECRET = "hook-secret-0123456789abcdef"
HOOK_SOURCE = """
[sources.hook]
scheme = "hmac-sha256"
secrets = ["HOOK_SECRET"]
"""
# Email and a `fast` forward each land this soon after the POST, whatever the other targets do.
PROMPT_SECONDS = 2.0


def target_table(name: str, url: str, **keys: Any) -> str:
    lines = [f"[targets.{name}]", f'url = "{url}"', 'secret = "TARGET_SIGNING"', 'sources = ["hook"]']
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def forwarding_env(tmp_path: Path, tables: str, smtp_port: int | None = None, **overrides: Any) -> dict[str, Any]:
    sources = tmp_path / "sources.toml"
    sources.write_text(HOOK_SOURCE + tables, encoding="utf-8")
    env: dict[str, Any] = {
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "HOOK_SECRET": HOOK_SECRET,
        "TARGET_SIGNING": SIGNING,
        "SOURCES_FILE": sources,
        "DATA_DIR": tmp_path / "data",
        "RATE_LIMIT": "100000/second",
        "ALERT_COOLDOWN_SECONDS": 0,
        "RETRY_BASE_SECONDS": 0.2,
        "DELIVERY_LEASE_SECONDS": 3,
        "WORKER_POLL_SECONDS": 0.1,
    }
    if smtp_port is not None:
        env |= {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": smtp_port,
            "SMTP_SECURITY": "none",
            "SMTP_EMAIL": "alerts@example.com",
            "SMTP_TIMEOUT": 3,
            "RECIPIENT_EMAIL": "owner@example.com",
        }
    return env | overrides


def post_hook(base_url: str, n: int, session: Any = requests) -> requests.Response:
    body = json.dumps({"n": n, "note": f"event number {n}"}).encode()
    headers = signed_headers(body, HOOK_SECRET, **{"X-GitHub-Event": "push"})
    return session.post(f"{base_url}/webhook/hook", data=body, headers=headers, timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SIGNING) as running:
        yield running


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


def test_kill_9_mid_burst_every_acknowledged_event_arrives_and_repeats_keep_their_webhook_id(
    tmp_path: Path, receiver: Receiver
) -> None:
    # timeout_seconds 1: a forward leased at the kill is due again after max(3 s, 3 x 1 s).
    env = forwarding_env(tmp_path, target_table("svc", receiver.url + "/svc", timeout_seconds=1))
    receiver.script("/svc", *[Reply(200, delay=0.1)] * 400)  # so that some are in flight at the kill
    receiver.server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # resets at the kill
    reply = receiver.next_reply
    begun = itertools.count(1)
    started = [0]  # requests the receiver has begun to answer

    def counting_reply(path: str) -> Reply:
        started[0] = next(begun)
        return reply(path)

    receiver.next_reply = counting_reply  # type: ignore[method-assign]
    server = Server(env, tmp_path).start()
    total, threads = 100, 8
    acknowledged: dict[int, str] = {}
    lock = threading.Lock()
    restarted = threading.Event()

    def sender(offset: int) -> None:
        session = requests.Session()
        for n in range(offset, total, threads):
            if n >= total // 2:
                restarted.wait(30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until it is acknowledged: a POST at the kill fails
                try:
                    response = post_hook(server.url, n, session)
                except requests.RequestException:
                    session = requests.Session()
                    time.sleep(0.1)
                    continue
                if response.status_code == 202:
                    with lock:
                        acknowledged[n] = response.json()["id"]
                    break
                time.sleep(0.1)

    workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        # Half the burst acknowledged, some forwards done and at least two being answered.
        while time.monotonic() < deadline and (
            len(acknowledged) < total // 2 - threads
            or len(receiver.arrivals) < 5
            or started[0] - len(receiver.arrivals) < 2
        ):
            time.sleep(0.005)
        at_kill, in_flight = len(receiver.arrivals), started[0] - len(receiver.arrivals)
        server.kill()  # SIGKILL to Gunicorn, its workers and the delivery worker, forwards in flight
        server = Server(env, tmp_path, port=server.port).start()
        restarted.set()
        for thread in workers:
            thread.join(timeout=40)
        ids = set(acknowledged.values())
        assert len(ids) == total, f"only {len(acknowledged)} of {total} acknowledged"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not ids <= {a.event_id for a in receiver.delivered("/svc")}:
            time.sleep(0.1)
        time.sleep(0.5)  # room for a late duplicate, so the count of doubles is honest
        arrivals = list(receiver.arrivals)
    finally:
        restarted.set()
        server.stop()
    by_event: dict[str, list[Arrival]] = defaultdict(list)
    for arrival in arrivals:
        by_event[arrival.event_id].append(arrival)
    delivered = {a.event_id for a in arrivals if a.status == 200}
    twice = {e: a for e, a in by_event.items() if len(a) > 1}
    extra = set(by_event) - ids  # stored, but its 202 was lost at the kill (the POST was sent again)
    print(
        f"\nforwarding kill -9: {len(ids)} acknowledged; at the kill {at_kill} arrived and {in_flight} in flight;"
        f" {len(arrivals)} arrivals in all, {len(delivered & ids)} acknowledged delivered,"
        f" {len(twice)} arrived more than once, {len(extra)} unacknowledged extras"
    )
    assert not ids - delivered, f"acknowledged but never forwarded: {sorted(ids - delivered, key=int)}"
    assert all(a.verified for a in arrivals), "a request failed Standard Webhooks verification"
    for event_id, repeats in twice.items():
        assert len({a.webhook_id for a in repeats}) == 1, (event_id, [a.webhook_id for a in repeats])


def arrival_delays(posted: dict[str, float], arrived: dict[str, float]) -> list[float]:
    """Seconds from each event's POST to its arrival; an event that never came counts as infinite."""
    return [arrived.get(event_id, float("inf")) - at for event_id, at in posted.items()]


def post_paced(server: Server, count: int) -> dict[str, float]:
    """`count` events 0.1 s apart; event id -> time.monotonic() of its POST."""
    posted = {}
    session = requests.Session()
    for n in range(count):
        started = time.monotonic()
        posted[assert_accepted(post_hook(server.url, n, session))] = started
        time.sleep(0.1)
    return posted


def wait_prompt(posted: dict[str, float], sink: SmtpSink, receiver: Receiver) -> tuple[list[float], list[float]]:
    """Wait for every email and `fast` forward (a little past the promise), then their delays."""
    sink.wait_for(len(posted), timeout=max(posted.values()) - time.monotonic() + PROMPT_SECONDS + 3)
    receiver.wait_for(len(posted), "/fast", timeout=PROMPT_SECONDS + 3)
    envelopes = list(sink.envelopes)
    mailed = {str(m["X-Webhook-Event-Id"]): e[2] for m, e in zip(list(sink.messages), envelopes, strict=False)}
    forwarded = {a.event_id: a.at for a in receiver.delivered("/fast")}
    return arrival_delays(posted, mailed), arrival_delays(posted, forwarded)


def test_a_slow_target_holds_back_neither_email_nor_another_target(
    tmp_path: Path, receiver: Receiver, sink: SmtpSink
) -> None:
    count = 10
    receiver.script("/slow", *[Reply(200, delay=3.0)] * count)
    tables = target_table("slow", receiver.url + "/slow", timeout_seconds=10)
    tables += target_table("fast", receiver.url + "/fast")
    with Server(forwarding_env(tmp_path, tables, sink.port), tmp_path) as server:
        posted = post_paced(server, count)
        mail, fast = wait_prompt(posted, sink, receiver)
        slow_done = len(receiver.delivered("/slow"))
    print(
        f"\nslow target: email max {max(mail):.2f} s, fast target max {max(fast):.2f} s after POST;"
        f" slow target had {slow_done} of {count} by then"
    )
    assert max(mail) < PROMPT_SECONDS, mail
    assert max(fast) < PROMPT_SECONDS, fast
    assert slow_done < count  # it was still working: 4 at a time, 3 s each
    assert all(a.verified for a in receiver.arrivals)


def test_a_dead_target_holds_back_neither_email_nor_another_target(
    tmp_path: Path, receiver: Receiver, sink: SmtpSink
) -> None:
    count = 10
    tables = target_table("dead", f"http://127.0.0.1:{free_port()}/nobody", timeout_seconds=2)
    tables += target_table("fast", receiver.url + "/fast")
    with Server(forwarding_env(tmp_path, tables, sink.port, RETRY_BASE_SECONDS=0.1), tmp_path) as server:
        posted = post_paced(server, count)
        mail, fast = wait_prompt(posted, sink, receiver)
        log = server.output()
    print(f"\ndead target: email max {max(mail):.2f} s, fast target max {max(fast):.2f} s after POST")
    assert max(mail) < PROMPT_SECONDS, mail
    assert max(fast) < PROMPT_SECONDS, fast
    assert "to target dead failed" in log and "connection failed" in log, log[-2000:]
    assert "127.0.0.1" not in "\n".join(line for line in log.splitlines() if "target dead" in line)
