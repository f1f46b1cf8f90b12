"""The audit trail: every request to a webhook endpoint, accepted or refused, and `webhook-server
audit` and `sources`, which read it."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import (
    PARTICLE_SECRET,
    WEBHOOK_SECRET,
    assert_accepted,
    assert_error,
    bearer,
    new_store,
    particle_event,
    signed_headers,
)
from webhook_server.auth import STANDARD_WEBHOOKS_REASONS
from webhook_server.cli import main
from webhook_server.ingest import views
from webhook_server.store.audit import (
    DISTINCT_REFUSALS_PER_MINUTE,
    MANY_CLIENTS,
    MANY_REASONS,
    MORE_REASONS,
    AuditRecord,
    first_id_since,
    record,
    roll_up,
    secret_uses,
)
from webhook_server.store.audit import records as audit_records
from webhook_server.store.base import STORE_ERRORS, EventStore
from webhook_server.store.retention import purge

pytestmark = pytest.mark.usefixtures("each_store")

TIGHT_SECRET = "tight-secret-0123456789"
TIGHT_SECRET_OLD = "tight-secret-old-0123456789"
GUARDED_SECRET = "guarded-secret-0123456789"
PAYLOAD_MARKER = "sensor-reading-do-not-log-4711"

SOURCES = """
[sources.tight]
scheme = "bearer"
secrets = ["TIGHT_SECRET", "TIGHT_SECRET_OLD"]
max_payload_bytes = 200

[sources.limited]
scheme = "bearer"
secrets = ["TIGHT_SECRET"]
rate_limit = "1/minute"

[sources.guarded]
scheme = "bearer"
secrets = ["GUARDED_SECRET"]
allow = ["10.0.0.0/8"]
"""


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "sources.toml"
    path.write_text(SOURCES, encoding="utf-8")
    return {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DATA_DIR": str(tmp_path / "data"),
        "SOURCES_FILE": str(path),
        "TIGHT_SECRET": TIGHT_SECRET,
        "TIGHT_SECRET_OLD": TIGHT_SECRET_OLD,
        "GUARDED_SECRET": GUARDED_SECRET,
    }


@pytest.fixture
def client(make_app: Callable[..., Flask], env: dict[str, str]) -> FlaskClient:
    return make_app(**env).test_client()


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def audit_json(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    code, output = run(env, "audit", "--json", *args)
    assert code == 0, output
    return [json.loads(line) for line in output.splitlines()]


def tight(secret: str = TIGHT_SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}


def post_mixed_batch(client: FlaskClient) -> dict[tuple[int, str | None], int]:
    """One of each outcome; returns how many requests of each (status, reason) were sent."""
    event = particle_event(data=PAYLOAD_MARKER)
    assert_accepted(client.post("/webhook/particle", data=event, headers=bearer()))
    assert client.post("/webhook/particle", data=event, headers=bearer()).status_code == 200
    assert_error(client.post("/webhook/particle", data=event), 401)
    for _ in range(3):
        assert_error(client.post("/webhook/particle", data=event, headers=bearer("not-the-token-at-all")), 401)
    body = json.dumps({"event": "x", "note": PAYLOAD_MARKER}).encode()
    assert_error(client.post("/webhook", data=body, headers=signed_headers(body, secret="wrong-key-0123456789")), 401)
    assert_error(client.post("/webhook/guarded", json={"a": 1}, headers=bearer(GUARDED_SECRET)), 403)
    assert_error(client.post("/webhook/tight", data=b"x" * 300, headers=tight()), 413)
    assert_error(client.post("/webhook/tight", data=b"a=b", headers={**tight(), "Content-Type": "text/plain"}), 415)
    assert_error(client.post("/webhook/tight", data=b'{"broken', headers=tight()), 400)
    assert_error(client.post("/webhook/particle", data={"event": PAYLOAD_MARKER}, headers=bearer()), 422)
    assert_error(client.post("/webhook/nowhere", json={}), 404)
    assert_error(client.get("/webhook/particle"), 405)
    assert_error(client.post("/webhook/limited", json={"n": 1}, headers=tight(TIGHT_SECRET_OLD)), 401)
    assert_error(client.post("/webhook/limited", json={"n": 1}, headers=tight()), 429)  # its second in a minute
    return {
        (202, None): 1,
        (200, "redelivery of an event already stored"): 1,
        (401, "no Authorization header"): 1,
        (401, "wrong bearer token"): 4,
        (401, "X-Hub-Signature-256 does not match the body"): 1,
        (403, "This client address may not send to this source."): 1,
        (413, "The body is over the limit of 200 bytes."): 1,
        (415, "Content-Type must be application/json or application/x-www-form-urlencoded."): 1,
        (400, None): 1,  # the JSON parser's message, checked below
        (422, "schema violation at /coreid, /published_at"): 1,
        (404, "No webhook source is enabled at this path."): 1,
        (405, "The method is not allowed for the requested URL."): 1,
        (429, "Rate limit exceeded (1 per 1 minute); retry after the time in Retry-After."): 1,
    }


def test_audit_accounts_for_every_request_of_a_mixed_batch(client: FlaskClient, env: dict[str, str]) -> None:
    sent = post_mixed_batch(client)
    records = audit_json(env)
    assert sum(r["count"] for r in records) == sum(sent.values()) == 16
    by_status: Counter[int] = Counter()
    for r in records:
        by_status[r["status"]] += r["count"]
        assert set(r) >= {"time", "source", "client", "status", "reason", "duration_ms", "event_id", "key"}
        assert r["client"] == "127.0.0.1" and r["duration_ms"] >= 0
        expected = [reason for (status, reason) in sent if status == r["status"]]
        if expected[0] is not None:
            assert r["reason"] in expected, r
    expected_by_status: Counter[int] = Counter()
    for (status, _), n in sent.items():
        expected_by_status[status] += n
    assert by_status == expected_by_status
    reasons = {r["status"]: r["reason"] for r in records}
    assert reasons[202] is None
    assert reasons[400].startswith("The body is not valid JSON: Unterminated string")
    sources = {(r["status"], r["source"]) for r in records}
    assert {(404, None), (403, "guarded"), (429, "limited"), (202, "particle"), (401, "generic")} <= sources


def test_audit_never_holds_a_secret_or_the_payload(client: FlaskClient, env: dict[str, str]) -> None:
    post_mixed_batch(client)
    code, table = run(env, "audit")
    assert code == 0
    for text in (json.dumps(audit_json(env)), table):
        for secret in (PARTICLE_SECRET, WEBHOOK_SECRET, TIGHT_SECRET, GUARDED_SECRET, "not-the-token-at-all"):
            assert secret not in text
        assert PAYLOAD_MARKER not in text


def test_an_accepted_record_names_its_event_and_the_secret_that_matched(
    client: FlaskClient, env: dict[str, str]
) -> None:
    first = assert_accepted(client.post("/webhook/tight", json={"n": 1}, headers=tight(TIGHT_SECRET_OLD)))
    again = client.post("/webhook/particle", data=particle_event(), headers=bearer())
    client.post("/webhook/particle", data=particle_event(), headers=bearer())
    records = audit_json(env)
    accepted = {r["source"]: r for r in records if r["status"] == 202}
    assert accepted["tight"]["event_id"] == first and accepted["tight"]["key"] == fingerprint(TIGHT_SECRET_OLD)
    duplicate = next(r for r in records if r["status"] == 200)
    assert duplicate["event_id"] == again.get_json()["id"] and duplicate["key"] == fingerprint(PARTICLE_SECRET)
    # A request refused after its credentials passed still says whose they were.
    assert_error(client.post("/webhook/tight", data=b"{", headers=tight()), 400)
    assert audit_json(env, "--status", "400")[0]["key"] == fingerprint(TIGHT_SECRET)
    assert audit_json(env, "--status", "401") == []


def test_the_accepted_record_rides_in_the_events_own_transaction(
    make_app: Callable[..., Flask], each_store: str, request: pytest.FixtureRequest
) -> None:
    app = make_app()
    client = app.test_client()
    client.get("/health")  # the connection of this thread exists before the trace starts
    with app.app_context():
        store: EventStore = app.extensions["webhook_store"]
    if each_store == "postgresql":
        server, url = request.getfixturevalue("postgres"), os.environ["DATABASE_URL"]
        server.log_statements(url)
        app = make_app()  # connections opened now log their statements
        assert_accepted(app.test_client().post("/webhook/particle", data=particle_event(), headers=bearer()))
        logged = server.statements(url)
        event_tx = {tx for tx, sql in logged if sql.startswith("INSERT INTO events")}
        audit_tx = {tx for tx, sql in logged if sql.startswith("INSERT INTO audit")}
        assert len(event_tx) == 1 and event_tx == audit_tx
        in_it = [sql.split()[0].upper() for tx, sql in logged if tx in event_tx]
        assert in_it[0] == "BEGIN" and in_it[-1] == "COMMIT" and in_it.count("COMMIT") == 1
        return
    statements: list[str] = []
    store.connection().set_trace_callback(statements.append)  # type: ignore[attr-defined]
    assert_accepted(client.post("/webhook/particle", data=particle_event(), headers=bearer()))
    writes = [s.split()[0].upper() for s in statements if s.split()[0].upper() in ("BEGIN", "COMMIT", "INSERT")]
    assert writes.count("BEGIN") == 1 and writes.count("COMMIT") == 1
    inserts = [s for s in statements if s.upper().startswith("INSERT")]
    assert any("INTO events" in s for s in inserts) and any("INTO audit" in s for s in inserts)
    assert writes[0] == "BEGIN" and writes[-1] == "COMMIT"


def test_identical_refusals_fold_into_one_record_with_their_count(client: FlaskClient, env: dict[str, str]) -> None:
    for _ in range(40):
        client.post("/webhook/particle", data=particle_event(), headers=bearer("wrong-token-0123456789"))
    for _ in range(5):
        client.post(
            "/webhook/particle",
            data=particle_event(),
            headers=bearer("wrong-token-0123456789"),
            environ_base={"REMOTE_ADDR": "192.0.2.7"},
        )
    records = audit_json(env, "--status", "401")
    assert sorted((r["client"], r["count"]) for r in records) == [("127.0.0.1", 40), ("192.0.2.7", 5)]
    assert all(r["last_time"] >= r["time"] for r in records)


def test_audit_filters_by_source_status_and_age(client: FlaskClient, env: dict[str, str]) -> None:
    post_mixed_batch(client)
    assert {r["source"] for r in audit_json(env, "--source", "tight")} == {"tight"}
    assert [r["status"] for r in audit_json(env, "--status", "422")] == [422]
    assert len(audit_json(env, "--since", "1h")) == len(audit_json(env))
    assert len(audit_json(env, "--limit", "2")) == 2
    code, table = run(env, "audit", "--source", "tight")
    assert code == 0 and table.splitlines()[0].startswith("time (UTC)") and "tight" in table
    assert run(env, "audit", "--since", "yesterday")[0] == 2
    assert run(env, "audit", "--status", "99")[0] == 2
    assert "No audit records." in run(env, "audit", "--source", "nobody")[1]


def test_an_answer_outside_webhook_paths_is_not_audited(client: FlaskClient, env: dict[str, str]) -> None:
    client.get("/health")
    client.get("/webhooks")
    client.get("/metrics")
    assert audit_json(env) == []


def record_refusal(store: EventStore, at: float, client: str, reason: str = "wrong bearer token") -> None:
    entry = AuditRecord(at=at, source="particle", client=client, status=401, reason=reason, duration_ms=1.0)
    with store.transaction() as conn:
        record(conn, entry)


def test_refusals_fold_per_minute_and_distinct_ones_are_capped(tmp_path: Path) -> None:
    store = new_store(tmp_path / "events.sqlite3")
    minute = 1_800_000_000 // 60 * 60
    for second in (0, 10, 59):
        record_refusal(store, minute + second, "198.51.100.1")
    record_refusal(store, minute + 60, "198.51.100.1")  # the next minute: a row of its own
    for n in range(DISTINCT_REFUSALS_PER_MINUTE + 300):  # a flood from many addresses
        record_refusal(store, minute + 120 + n / 1000, f"10.{n // 256}.{n % 256}.1")
    rows = store.connection().execute("SELECT at, client, count FROM audit ORDER BY id").fetchall()
    assert [tuple(r) for r in rows[:2]] == [(minute, "198.51.100.1", 3), (minute + 60, "198.51.100.1", 1)]
    flood = rows[2:]
    assert len(flood) == DISTINCT_REFUSALS_PER_MINUTE + 1
    assert flood[-1]["client"] == MANY_CLIENTS and flood[-1]["count"] == 300
    assert sum(r["count"] for r in flood) == DISTINCT_REFUSALS_PER_MINUTE + 300


def test_a_store_that_cannot_write_the_audit_still_answers(
    make_app: Callable[..., Flask], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    with app.app_context():
        store: EventStore = app.extensions["webhook_store"]
        store.connection().execute("DROP TABLE audit")
    client = app.test_client()
    assert_accepted(client.post("/webhook/particle", data=particle_event(), headers=bearer()))
    assert_error(client.post("/webhook/particle", data=particle_event()), 401)
    assert "audit record" in caplog.text
    with pytest.raises(STORE_ERRORS):
        store.connection().execute("SELECT * FROM audit")


def sources_json(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    code, output = run(env, "sources", "--json")
    assert code == 0, output
    return {d["name"]: d for d in map(json.loads, output.splitlines())}


def test_sources_lists_each_source_with_its_secrets_fingerprints(env: dict[str, str]) -> None:
    described = sources_json(env)
    assert sorted(described) == ["generic", "guarded", "limited", "particle", "tight"]
    assert described["generic"]["path"] == "/webhook" and described["tight"]["path"] == "/webhook/tight"
    assert described["particle"]["scheme"] == "bearer" and described["generic"]["scheme"] == "hmac-sha256"
    assert [s["fingerprint"] for s in described["tight"]["secrets"]] == [
        fingerprint(TIGHT_SECRET),
        fingerprint(TIGHT_SECRET_OLD),
    ]
    assert [s["variable"] for s in described["tight"]["secrets"]] == ["TIGHT_SECRET", "TIGHT_SECRET_OLD"]
    assert described["particle"]["secrets"][0] == {
        "fingerprint": fingerprint(PARTICLE_SECRET),
        "matches": 0,
        "last_match": None,
        "variable": "PARTICLE_WEBHOOK_SECRET",
    }
    assert all(d["targets"] == [] for d in described.values())
    code, table = run(env, "sources")
    assert code == 0 and "tight: bearer at /webhook/tight" in table and fingerprint(TIGHT_SECRET_OLD) in table
    assert TIGHT_SECRET not in table and TIGHT_SECRET not in json.dumps(described)


def secret_counts(env: dict[str, str], source: str) -> dict[str, tuple[int, str | None]]:
    return {s["fingerprint"]: (s["matches"], s["last_match"]) for s in sources_json(env)[source]["secrets"]}


def test_rotation_the_old_secrets_count_stops_growing_once_senders_move(
    make_app: Callable[..., Flask], env: dict[str, str]
) -> None:
    old, new = fingerprint(TIGHT_SECRET_OLD), fingerprint(TIGHT_SECRET)
    client = make_app(**env, RATE_LIMIT="1000/second").test_client()
    for n in range(3):
        assert_accepted(client.post("/webhook/tight", json={"n": n}, headers=tight(TIGHT_SECRET_OLD)))
    assert secret_counts(env, "tight")[old][0] == 3 and secret_counts(env, "tight")[new] == (0, None)
    for n in range(3, 5):  # the senders move to the new secret; the old one is not used again
        assert_accepted(client.post("/webhook/tight", json={"n": n}, headers=tight()))
    counts = secret_counts(env, "tight")
    assert counts[old][0] == 3 and counts[new][0] == 2
    assert counts[new][1] is not None and counts[new][1] >= (counts[old][1] or "")
    # Retiring the old secret: its fingerprint is gone; a wholly new one has a new fingerprint.
    rotated = {**env, "TIGHT_SECRET": "tight-secret-rotated-0123456789", "TIGHT_SECRET_OLD": TIGHT_SECRET}
    after = secret_counts(rotated, "tight")
    assert list(after) == [fingerprint("tight-secret-rotated-0123456789"), new]
    assert after[new][0] == 2


def test_records_since_a_time_are_found_without_an_index_on_it(tmp_path: Path) -> None:
    store = new_store(tmp_path / "events.sqlite3")
    start = 1_800_000_000.0
    with store.transaction() as conn:
        for n in range(100):  # one accepted request every 10 s
            entry = AuditRecord(
                at=start + 10 * n,
                source="particle",
                client="a",
                status=202,
                reason=None,
                duration_ms=1.0,
                event_id=str(n + 1),
            )
            record(conn, entry)
    assert first_id_since(store.connection(), start + 505) == 52  # the record at start + 510
    assert first_id_since(store.connection(), start - 1) == 1
    assert first_id_since(store.connection(), start + 10_000) == 101
    # A refusal folded since start + 985 (its first request) until start + 1005.
    record_refusal(store, start + 985, "b")
    record_refusal(store, start + 1005, "b")
    found = audit_records(store.connection(), None, None, start + 995, 100)
    assert [r["event_id"] for r in found] == [None]  # the fold row only: the last accepted was at + 990
    found = audit_records(store.connection(), None, 202, start + 900, 100)
    assert [r["event_id"] for r in found] == [str(n) for n in range(100, 90, -1)]
    assert first_id_since(new_store(tmp_path / "empty.sqlite3").connection(), start) == 1


def test_secret_counts_are_rolled_up_and_outlive_the_audit_rows(tmp_path: Path) -> None:
    store = new_store(tmp_path / "events.sqlite3")
    now = 1_800_000_000.0
    with store.transaction() as conn:
        for n, age in enumerate((900, 600, 300, 30)):  # the last one may still fold: not rolled up
            record(conn, AuditRecord(now - age, "tight", "a", 202, None, 1.0, str(n + 1), key="k-old"))
        record(conn, AuditRecord(now - 5, "tight", "a", 422, "schema violation at /x", 1.0, key="k-new"))
    expected = {("tight", "k-old"): (4, now - 30), ("tight", "k-new"): (1, now - 5)}
    assert secret_uses(store.connection()) == expected
    with store.transaction() as conn:
        assert roll_up(conn, now) == 3 and roll_up(conn, now) == 3  # idempotent
    assert secret_uses(store.connection()) == expected
    assert store.connection().execute("SELECT matches FROM secret_uses").fetchall()[0][0] == 3
    # Retention takes the rolled-up rows only; the counts stay whole.
    assert purge(store, 0, 1, now=now + 86_400 + 200).audit == 5
    assert secret_uses(store.connection()) == expected


def test_refusals_that_differ_in_every_way_still_add_a_bounded_number_of_rows(tmp_path: Path) -> None:
    store = new_store(tmp_path / "events.sqlite3")
    minute = 1_800_000_000 // 60 * 60
    total = DISTINCT_REFUSALS_PER_MINUTE + MORE_REASONS + 400
    for n in range(total):  # a new address and a new reason every time
        record_refusal(store, minute + n / 1000, f"10.{n // 256}.{n % 256}.1", reason=f"bad thing number {n}")
    rows = store.connection().execute("SELECT client, reason, count FROM audit ORDER BY id").fetchall()
    assert len(rows) == DISTINCT_REFUSALS_PER_MINUTE + MORE_REASONS + 1
    assert (rows[-1]["client"], rows[-1]["reason"], rows[-1]["count"]) == (MANY_CLIENTS, MANY_REASONS, 400)
    assert sum(r["count"] for r in rows) == total


@pytest.mark.parametrize(
    "headers",
    [
        {"webhook-id": "msg_1", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"},
        {"webhook-id": "msg_1", "webhook-timestamp": "x" * 40, "webhook-signature": "\xff" * 7},
        {"webhook-id": "m", "webhook-timestamp": str(2**70), "webhook-signature": "v1," + "A" * 1197},
        {},
    ],
)
def test_standard_webhooks_refusals_have_one_of_a_few_fixed_reasons(
    make_app: Callable[..., Flask], tmp_path: Path, headers: dict[str, str]
) -> None:
    path = tmp_path / "sw.toml"
    path.write_text('[sources.sw]\nscheme = "standard-webhooks"\nsecrets = ["SW_SECRET"]\n', encoding="utf-8")
    env = {"SOURCES_FILE": str(path), "SW_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
    client = make_app(**env).test_client()
    assert_error(client.post("/webhook/sw", data=b'{"a": 1}', headers=headers, content_type="application/json"), 401)
    (entry,) = audit_json({**env, "DATA_DIR": str(tmp_path / "data")}, "--source", "sw")
    assert entry["reason"].startswith("standard webhooks: ")
    said = entry["reason"].removeprefix("standard webhooks: ")
    assert said in STANDARD_WEBHOOKS_REASONS or said.isidentifier(), said  # a message, or an exception's name


def test_a_server_failure_is_audited_with_the_kind_of_error_only(
    make_app: Callable[..., Flask], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError(f"leaked {PAYLOAD_MARKER}")

    monkeypatch.setattr(views, "describe", broken)
    client = make_app(**env).test_client()
    assert_error(client.post("/webhook/particle", data=particle_event(), headers=bearer()), 500)
    (entry,) = audit_json(env, "--status", "500")
    assert entry["reason"] == "unexpected error (RuntimeError)" and entry["key"] == fingerprint(PARTICLE_SECRET)


def test_a_schema_violation_is_logged_by_the_schemas_own_names_only(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    schema = {
        "type": "object",
        "required": ["site"],
        "properties": {
            "site": {"type": "string"},
            "readings": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema), encoding="utf-8")
    path = tmp_path / "s.toml"
    path.write_text('[sources.meter]\nscheme = "bearer"\nsecrets = ["METER_SECRET"]\nschema = "schema.json"\n', "utf-8")
    env = {"SOURCES_FILE": str(path), "METER_SECRET": "meter-secret-0123456789", "DATA_DIR": str(tmp_path / "data")}
    client = make_app(**env).test_client()
    body = {"readings": {"room-of-" + PAYLOAD_MARKER: "warm", "hall": [1]}}
    response = client.post("/webhook/meter", json=body, headers=bearer("meter-secret-0123456789"))
    answer = assert_error(response, 422)
    assert f"/readings/room-of-{PAYLOAD_MARKER}" in answer["fields"]  # the sender learns which of its keys
    (entry,) = audit_json(env, "--status", "422")
    assert entry["reason"] == "schema violation at /readings/*, /site" and PAYLOAD_MARKER not in json.dumps(entry)
