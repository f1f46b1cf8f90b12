"""Forwarding to HTTP targets, against a real local receiver that verifies each request with the
`standardwebhooks` package and decrypts JWE bodies with jwcrypto. The worker runs synchronously
(`Worker.run_once`) on a `FakeClock`, except where real time is the point (Retry-After, timeouts)."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwk

from tests.conftest import WEBHOOK_SECRET, assert_accepted, new_store, signed_headers
from tests.receiver import Receiver, Reply
from tests.test_delivery import FakeClock
from tests.test_metrics import scrape, value
from webhook_server import create_app
from webhook_server.channels.http import MAX_RESPONSE_BYTES, message_id, retry_after
from webhook_server.delivery.worker import Worker
from webhook_server.live.doorbell import Doorbell
from webhook_server.settings import load_settings

pytestmark = pytest.mark.usefixtures("each_store")

SIGNING = "whsec_" + base64.b64encode(b"forwarding-test-key-0123456789ab").decode()
TOKEN_IN_URL = "tok3n-in-the-url-0123456789"
HOOK_SECRET = "hook-secret-0123456789abcdef"
# A source with no schema: any JSON body, the 1-byte `1` too.
HOOK_SOURCE = """
[sources.hook]
scheme = "hmac-sha256"
secrets = ["HOOK_SECRET"]
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, jwk.JWK]:
    """An RSA key pair: the public half as a PEM file for `encrypt_to`, the private one to decrypt."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("keys") / "target.pub.pem"
    path.write_bytes(pem)
    return path, jwk.JWK.from_pyca(private)


@pytest.fixture
def receiver(keys: tuple[Path, jwk.JWK]) -> Iterator[Receiver]:
    with Receiver(SIGNING, keys[1]) as running:
        yield running


def target_table(name: str, url: str, **keys: Any) -> str:
    lines = [f"[targets.{name}]", f'url = "{url}"', 'secret = "TARGET_SIGNING"']
    keys.setdefault("sources", ["*"])
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


class Forwarding:
    """An app to post generic (HMAC-signed) events to, and a worker to run, with targets."""

    def __init__(self, tmp_path: Path, tables: str, **env: Any) -> None:
        path = tmp_path / "sources.toml"
        path.write_text(HOOK_SOURCE + tables, encoding="utf-8")
        self.env = {
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "DATA_DIR": str(tmp_path / "data"),
            "RATE_LIMIT": "100000/second",
            "SOURCES_FILE": str(path),
            "TARGET_SIGNING": SIGNING,
            "HOOK_SECRET": HOOK_SECRET,
            "RETRY_BASE_SECONDS": "0.05",
            "MAX_PAYLOAD_BYTES": str(2 * 1024 * 1024),
            **{k: str(v) for k, v in env.items()},
        }
        self.settings = load_settings(self.env)
        self.client = create_app(self.env).test_client()
        self.clock = FakeClock()
        self.worker = Worker(self.settings, new_store(self.settings.database_path), clock=self.clock)

    def post(self, body: bytes, event: str = "push") -> str:
        headers = signed_headers(body, HOOK_SECRET, **{"X-GitHub-Event": event, "Content-Type": "application/json"})
        return assert_accepted(self.client.post("/webhook/hook", data=body, headers=headers))

    def drain(self, passes: int = 30) -> None:
        for _ in range(passes):
            if not self.worker.run_once():
                return

    def forwards(self) -> list[tuple[int, str, str, int]]:
        rows = self.worker.store.connection().execute(
            "SELECT event_id, recipient, status, attempts FROM deliveries WHERE channel = 'http' ORDER BY id"
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


def test_a_one_byte_and_a_one_megabyte_payload_arrive_signed_and_encrypted(
    tmp_path: Path, receiver: Receiver, keys: tuple[Path, jwk.JWK]
) -> None:
    tables = target_table("sealed", receiver.url + "/sealed", encrypt_to=str(keys[0]), body="payload")
    tables += target_table("plain", receiver.url + "/plain")
    f = Forwarding(tmp_path, tables)
    small, big = b"1", json.dumps({"blob": "x" * (1024 * 1024 - 12)}).encode()
    assert len(big) == 1024 * 1024
    ids = [f.post(small), f.post(big)]
    f.drain()
    # An unordered target gets up to 4 at once: the two may arrive either way round.
    sealed = sorted(receiver.wait_for(2, "/sealed"), key=lambda a: int(a.event_id))
    assert [a.plaintext for a in sealed] == [small, big]  # the bytes as received, whatever their size
    for arrival, event_id in zip(sealed, ids, strict=True):
        assert arrival.verified and arrival.headers["content-type"] == "application/jose"
        assert arrival.jwe_header == {"alg": "RSA-OAEP-256", "enc": "A256GCM", "cty": "application/json"}
        assert arrival.event_id == event_id and arrival.body.count(b".") == 4  # compact: five parts
        assert big not in arrival.body
    plain = sorted(receiver.wait_for(2, "/plain"), key=lambda a: int(a.event_id))
    assert all(a.verified and a.headers["content-type"] == "application/json" for a in plain)
    events = [a.event() for a in plain]
    assert [e["id"] for e in events] == ids and events[0]["payload"] == 1 and events[0]["event"] == "push"
    assert set(events[0]) == {"id", "source", "received_at", "event", "device", "payload"}
    assert f.forwards() == [(1, "sealed", "sent", 1), (1, "plain", "sent", 1), (2, "sealed", "sent", 1),
                            (2, "plain", "sent", 1)]  # fmt: skip


def test_a_500_then_200_is_retried_and_arrives_once(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"))
    receiver.script("/svc", Reply(500))
    f.post(b'{"n": 1}')
    f.drain()
    assert f.forwards() == [(1, "svc", "pending", 1)]
    f.clock.advance(60)
    f.drain()
    assert [a.status for a in receiver.arrivals] == [500, 200]
    assert len(receiver.delivered()) == 1 and f.forwards() == [(1, "svc", "sent", 2)]
    first, second = receiver.arrivals
    forward_id = f.worker.store.connection().execute("SELECT id FROM deliveries WHERE channel = 'http'").fetchone()[0]
    assert first.webhook_id == second.webhook_id == message_id("1", forward_id)  # receivers de-duplicate on it
    assert all(a.verified for a in receiver.arrivals)


def test_a_410_is_a_dead_letter_at_once_and_replays(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("gone", receiver.url + "/gone"))
    receiver.script("/gone", Reply(410))
    f.post(b'{"n": 1}')
    f.drain()
    assert f.forwards() == [(1, "gone", "dead", 1)]
    result = CliRunner().invoke(create_cli(), ["dead-letters", "list"], env=f.env)
    row = result.output.splitlines()[1].split()
    assert row[3:5] == ["http", "gone"] and "HTTP 410" in result.output and receiver.url not in result.output
    assert CliRunner().invoke(create_cli(), ["dead-letters", "replay", "--all"], env=f.env).exit_code == 0
    f.drain()
    assert len(receiver.delivered()) == 1 and f.forwards() == [(1, "gone", "sent", 1)]


def create_cli() -> Any:
    from webhook_server.cli import main

    return main


@pytest.mark.parametrize("status", [301, 302, 307, 400, 401, 404, 422])
def test_redirects_and_other_refusals_are_permanent(tmp_path: Path, receiver: Receiver, status: int) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"))
    receiver.script("/svc", Reply(status, headers={"Location": receiver.url + "/elsewhere"}))
    f.post(b'{"n": 1}')
    f.drain()
    assert f.forwards() == [(1, "svc", "dead", 1)]
    assert [a.path for a in receiver.arrivals] == ["/svc"]  # the redirect was not followed


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_temporary_statuses_are_retried(tmp_path: Path, receiver: Receiver, status: int) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"))
    receiver.script("/svc", Reply(status))
    f.post(b'{"n": 1}')
    f.drain()
    assert f.forwards() == [(1, "svc", "pending", 1)]


def test_429_with_retry_after_waits_at_least_that_long(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"))
    f.worker.clock = f.worker.queue.clock = time.time  # real time: the wait is what is measured
    receiver.script("/svc", Reply(429, headers={"Retry-After": "2"}))
    f.post(b'{"n": 1}')
    deadline = time.monotonic() + 10
    while not receiver.delivered() and time.monotonic() < deadline:
        f.worker.run_once()
        time.sleep(0.05)
    first, second = receiver.arrivals
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 2.0  # RETRY_BASE_SECONDS is 0.05: Retry-After decided


def test_a_timeout_is_retried(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("slow", receiver.url + "/slow", timeout_seconds=0.5))
    receiver.script("/slow", Reply(200, delay=1.5))
    f.post(b'{"n": 1}')
    began = time.monotonic()
    f.drain()
    assert time.monotonic() - began < 1.4  # it gave up at its timeout
    f.clock.advance(60)
    f.drain()
    assert f.forwards() == [(1, "slow", "sent", 2)]
    deadline = time.monotonic() + 5
    while len(receiver.arrivals) < 2 and time.monotonic() < deadline:  # the slow one logs when it answers
        time.sleep(0.05)
    first, second = sorted(receiver.arrivals, key=lambda a: a.headers["webhook-timestamp"])
    assert first.webhook_id == second.webhook_id


def test_ordered_delivers_in_event_order_behind_a_failing_head(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("ledger", receiver.url + "/ledger", ordered=True))
    receiver.script("/ledger", Reply(500), Reply(503), Reply(500))
    ids = [f.post(json.dumps({"n": n}).encode()) for n in range(1, 21)]
    for _ in range(10):
        f.drain()
        f.clock.advance(60)
    delivered = [a.event_id for a in receiver.delivered()]
    assert delivered == ids  # 1..20, each once, in order
    assert [a.status for a in receiver.arrivals[:4]] == [500, 503, 500, 200]
    assert {a.event_id for a in receiver.arrivals[:4]} == {ids[0]}  # nothing overtook the head


def test_an_ordered_target_moves_on_once_its_head_is_dead(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("ledger", receiver.url + "/ledger", ordered=True))
    receiver.script("/ledger", Reply(400))
    ids = [f.post(json.dumps({"n": n}).encode()) for n in range(3)]
    f.drain()
    assert [a.event_id for a in receiver.delivered()] == ids[1:]
    assert [s for *_, s, _ in f.forwards()] == ["dead", "sent", "sent"]


def test_filters_choose_which_events_a_target_takes(tmp_path: Path, receiver: Receiver) -> None:
    tables = target_table("invoices", receiver.url + "/inv", sources=["hook"], events=["invoice.*"])
    tables += target_table("nobody", receiver.url + "/none", sources=["particle"])
    f = Forwarding(tmp_path, tables, PARTICLE_WEBHOOK_SECRET="particle-secret-0123456789")
    f.post(b'{"n": 1}', event="invoice.paid")
    f.post(b'{"n": 2}', event="customer.created")
    f.drain()
    assert [a.event()["event"] for a in receiver.delivered("/inv")] == ["invoice.paid"]
    assert receiver.delivered("/none") == []


def test_events_replay_forwards_again_as_a_new_delivery(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"))
    event_id = f.post(b'{"n": 1}')
    f.drain()
    result = CliRunner().invoke(create_cli(), ["events", "replay", event_id], env=f.env)
    assert result.exit_code == 0 and "Queued 2 new deliveries" in result.output  # the log alert and the forward
    f.drain()
    first, second = receiver.delivered()
    assert first.event_id == second.event_id == event_id and first.webhook_id != second.webhook_id


def test_logs_name_the_target_never_its_url_or_secret(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    url = receiver.url + f"/svc?token={TOKEN_IN_URL}"
    unreachable = f"http://127.0.0.1:9/x?token={TOKEN_IN_URL}"  # port 9 (discard): refused
    f = Forwarding(tmp_path, target_table("svc", url) + target_table("down", unreachable))
    receiver.script("/svc?token=" + TOKEN_IN_URL, Reply(500))
    caplog.set_level(logging.DEBUG)
    f.post(b'{"n": 1}')
    f.drain()
    f.clock.advance(60)
    f.drain()
    assert "target svc" in caplog.text and "target down" in caplog.text and "connection failed" in caplog.text
    errors = [r[0] for r in f.worker.store.connection().execute("SELECT last_error FROM deliveries")]
    for text in (caplog.text, json.dumps(errors)):
        assert TOKEN_IN_URL not in text and SIGNING not in text and "127.0.0.1:9" not in text


def test_a_huge_answer_is_not_read_whole(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"))
    receiver.script("/svc", Reply(200, body=b"x" * (50 * MAX_RESPONSE_BYTES)))
    f.post(b'{"n": 1}')
    f.drain()
    assert f.forwards() == [(1, "svc", "sent", 1)]


def test_retry_after_takes_seconds_or_a_date_and_is_capped() -> None:
    assert retry_after("2") == 2.0 and retry_after("0") == 0.0 and retry_after("-5") == 0.0
    assert retry_after("999999") == 3600.0 and retry_after(None) is None and retry_after("soon") is None
    assert retry_after("nan") is None
    assert retry_after("Wed, 02 Dec 2026 00:00:10 GMT", now=1_796_169_600.0) == pytest.approx(10.0)


def test_forwards_are_counted_by_target_and_outcome_with_their_latency(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc") + target_table("gone", receiver.url + "/gone"))
    before = scrape(f.client)
    receiver.script("/svc", Reply(503))
    receiver.script("/gone", Reply(404))
    f.post(b'{"n": 1}')
    f.drain()
    f.clock.advance(60)
    f.drain()
    after = scrape(f.client)

    def delta(name: str, labels: dict[str, str]) -> float:
        return value(after, name, labels) - value(before, name, labels)

    assert delta("webhook_forwards_total", {"target": "svc", "outcome": "retry"}) == 1
    assert delta("webhook_forwards_total", {"target": "svc", "outcome": "sent"}) == 1
    assert delta("webhook_forwards_total", {"target": "gone", "outcome": "dead"}) == 1
    assert delta("webhook_forward_seconds_count", {"target": "svc"}) == 1
    assert delta("webhook_forward_seconds_count", {"target": "gone"}) == 0
    assert delta("webhook_deliveries_total", {"channel": "http", "outcome": "sent"}) == 1


def test_the_readmes_receiver_snippet_verifies_and_decrypts_a_forward(
    tmp_path: Path, receiver: Receiver, keys: tuple[Path, jwk.JWK], monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("A receiver in Python:\n\n```python\n", 1)[1].split("```", 1)[0]
    f = Forwarding(tmp_path, target_table("billing", receiver.url + "/b", encrypt_to=str(keys[0])))
    event_id = f.post(b'{"amount": 12}', event="invoice.paid")
    f.drain()
    (arrival,) = receiver.wait_for(1)
    (tmp_path / "billing.pem").write_bytes(keys[1].export_to_pem(private_key=True, password=None))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"SIGNING_KEY": SIGNING, "body": arrival.body, "headers": arrival.headers}
    exec(snippet, namespace)  # the README's own example, run as a user would
    event = json.loads(namespace["body"])
    assert event["id"] == event_id and event["payload"] == {"amount": 12}
    tampered = {**namespace, "body": arrival.body.replace(b".", b"x", 1), "headers": arrival.headers}
    with pytest.raises(Exception, match="signature"):
        exec(snippet, tampered)


def test_a_target_that_drips_its_answer_is_cut_off_at_its_timeout(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("drip", receiver.url + "/drip", timeout_seconds=1))
    receiver.script("/drip", Reply(200, trickle=0.2))  # a byte every 0.2 s: each read is quick
    f.post(b'{"n": 1}')
    began = time.monotonic()
    f.drain()
    assert time.monotonic() - began < 2.0  # the whole try is bounded, not each read
    assert f.forwards() == [(1, "drip", "pending", 1)]
    error = f.worker.store.connection().execute("SELECT last_error FROM deliveries WHERE channel = 'http'")
    assert error.fetchone()[0] == "TemporaryFailure: no answer within 1 s"
    f.clock.advance(60)
    f.drain()
    assert f.forwards() == [(1, "drip", "sent", 2)]


def test_forwards_to_a_target_taken_out_of_the_file_become_dead_letters(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("old", "http://127.0.0.1:9/x"))  # refused: stays pending
    f.post(b'{"n": 1}')
    f.drain()
    assert f.forwards() == [(1, "old", "pending", 1)]
    # The file loses the target; the worker restarts with the new configuration.
    later = Forwarding(tmp_path, target_table("new", receiver.url + "/new"))
    later.worker.housekeeping()
    assert later.forwards() == [(1, "old", "dead", 1)]
    error = later.worker.store.connection().execute("SELECT last_error FROM deliveries WHERE channel = 'http'")
    assert error.fetchone()[0] == "PermanentFailure: no target named old is configured now"


def test_a_worker_whose_loop_fails_stops_its_forwarding_too(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"))

    def broken() -> int:
        raise ValueError("a bug in a pass")

    f.worker.notify_once = broken  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="a bug"):
        f.worker.run(threading.Event())
    assert [t.name for t in threading.enumerate() if t.name == "forwarding"] == []  # the process can exit


def test_a_new_event_wakes_the_worker_at_once_not_at_its_next_look(tmp_path: Path, receiver: Receiver) -> None:
    f = Forwarding(tmp_path, target_table("svc", receiver.url + "/svc"), WORKER_POLL_SECONDS=5)
    f.worker.clock = f.worker.queue.clock = time.time
    stop = threading.Event()
    running = threading.Thread(target=f.worker.run, args=(stop,))
    running.start()
    try:
        time.sleep(0.5)  # the worker is waiting: its next look is 5 s away
        posted = time.monotonic()
        f.post(b'{"n": 1}')  # the way in rings DATA_DIR/live after the commit
        (arrival,) = receiver.wait_for(1, timeout=4)
        assert arrival.at - posted < 1.0
    finally:
        stop.set()
        Doorbell(tmp_path / "data" / "live").ring()  # so it sees the stop now, not in 5 s
        running.join(timeout=10)
