"""Per-source `events` filters and `cooldown_seconds` in SOURCES_FILE: what is refused at start,
which event names notify, and each source's own cool-down window."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_accepted
from tests.test_delivery import Harness, stamp_receipts_with
from webhook_server.ingest.sources import Source
from webhook_server.ops.events import notification_state
from webhook_server.settings import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("each_store")

BILLING = "billing-secret-0123456789"
OPS = "ops-secret-0123456789abc"
TOKEN = "stream-token-0123456789abc"
HOOK = '[sources.hook]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n'
SOURCES = """
[sources.billing]
scheme = "bearer"
secrets = ["BILLING_SECRET"]
events = ["invoice.*", "push", "build-?"]
cooldown_seconds = 300

[sources.ops]
scheme = "bearer"
secrets = ["OPS_SECRET"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sources.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problems load_settings reports for this sources file (it must refuse it)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings({"SOURCES_FILE": str(path), "HOOK_SECRET": "hook-secret-0123456789", "DATA_DIR": str(tmp_path)})
    return list(caught.value.problems)


def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str = SOURCES, cooldown: float = 60) -> Harness:
    """A web app and worker (log channel: one delivery per alert) with these sources."""
    h = Harness(
        tmp_path,
        SOURCES_FILE=write(tmp_path, text),
        BILLING_SECRET=BILLING,
        OPS_SECRET=OPS,
        SUBSCRIBER_TOKENS=f"{TOKEN}:*",
        ALERT_COOLDOWN_SECONDS=cooldown,
    )
    stamp_receipts_with(h.clock, monkeypatch)
    return h


def post(h: Harness, source: str, event: str, **fields: Any) -> int:
    """Post `{"event": event}` to a declared bearer source; the accepted event's id."""
    secret = BILLING if source == "billing" else OPS
    response = h.client.post(
        f"/webhook/{source}", json={"event": event, **fields}, headers={"Authorization": f"Bearer {secret}"}
    )
    return int(assert_accepted(response))


def deliveries(h: Harness, event_id: int) -> list[tuple[str, str]]:
    rows = h.worker.store.connection().execute("SELECT kind, status FROM deliveries WHERE event_id = ?", (event_id,))
    return [(r[0], r[1]) for r in rows.fetchall()]


def windows(h: Harness) -> list[tuple[str, str, float, int]]:
    """(source, event, length, repeats) of each open cool-down window."""
    rows = h.worker.store.connection().execute(
        "SELECT source, event, closes_at - opened_at, repeats FROM cooldowns ORDER BY source, event"
    )
    return [(r[0], r[1], round(r[2], 3), r[3]) for r in rows.fetchall()]


def summaries(h: Harness) -> list[tuple[str, int]]:
    """(source, repeats) of each summary delivery, by source."""
    rows = h.worker.store.connection().execute(
        "SELECT e.source, d.repeats FROM deliveries d JOIN events e ON e.id = d.event_id"
        " WHERE d.kind = 'summary' ORDER BY e.source"
    )
    return [(r[0], r[1]) for r in rows.fetchall()]


# --------------------------------------------------------------------------- configuration

BAD = [
    pytest.param("events = []\n", "events must be a non-empty list of event names or glob patterns", id="events-empty"),
    pytest.param('events = "push"\n', "events must be a non-empty list", id="events-a-string"),
    pytest.param("events = [1]\n", "events must be a non-empty list", id="events-a-number"),
    pytest.param('events = ["push", true]\n', "events must be a non-empty list", id="events-a-bool"),
    pytest.param('events = [["push"]]\n', "events must be a non-empty list", id="events-nested"),
    pytest.param('events = [""]\n', "events must be a non-empty list", id="events-empty-name"),
    pytest.param("events = {push = 1}\n", "events must be a non-empty list", id="events-a-table"),
    pytest.param(
        "cooldown_seconds = -1\n", "cooldown_seconds must be a whole number of seconds", id="cooldown-negative"
    ),
    pytest.param("cooldown_seconds = 1.5\n", "cooldown_seconds must be a whole number of seconds", id="cooldown-float"),
    pytest.param("cooldown_seconds = 300.0\n", "cooldown_seconds must be a whole number of seconds", id="cooldown-x.0"),
    pytest.param(
        'cooldown_seconds = "300"\n', "cooldown_seconds must be a whole number of seconds", id="cooldown-text"
    ),
    pytest.param("cooldown_seconds = true\n", "cooldown_seconds must be a whole number of seconds", id="cooldown-bool"),
    pytest.param(
        "cooldown_seconds = 86401\n",
        "cooldown_seconds must be a whole number of seconds, 0 to 86400",
        id="cooldown-over-a-day",
    ),
    pytest.param('event = ["push"]\n', "unknown keys event", id="unknown-key-typo"),
    pytest.param("cooldown = 5\n", "unknown keys cooldown", id="unknown-key-cooldown"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_filter_or_cooldown_is_refused_naming_file_table_and_key(tmp_path: Path, line: str, message: str) -> None:
    found = problems(tmp_path, HOOK + line)
    where = f"SOURCES_FILE {tmp_path / 'sources.toml'} [sources.hook]: "
    assert any(p.startswith(where) and message in p for p in found), found


def test_a_bad_value_is_never_echoed(tmp_path: Path) -> None:
    found = problems(tmp_path, HOOK + 'cooldown_seconds = "S3CRET-ish"\nevents = "Pr1vate-name"\n')
    assert len(found) == 2, found
    assert not any("S3CRET-ish" in p or "Pr1vate-name" in p for p in found)


def test_both_keys_are_taken_and_default_to_none(tmp_path: Path) -> None:
    path = write(
        tmp_path, SOURCES + '\n[sources.zero]\nscheme = "bearer"\nsecrets = ["OPS_SECRET"]\ncooldown_seconds = 0\n'
    )
    settings = load_settings({"SOURCES_FILE": str(path), "BILLING_SECRET": BILLING, "OPS_SECRET": OPS})
    billing, ops, zero = (settings.sources[n] for n in ("billing", "ops", "zero"))
    assert billing.events == ("invoice.*", "push", "build-?") and billing.cooldown_seconds == 300
    assert ops.events is None and ops.cooldown_seconds is None
    assert zero.cooldown_seconds == 0 and zero.events is None


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("invoice.paid", True),
        ("invoice.", True),
        ("invoice.payment.failed", True),
        ("invoices", False),
        ("invoice", False),
        ("Invoice.paid", False),  # case-sensitive, whatever the platform
        ("xinvoice.paid", False),
        ("push", True),
        ("push ", False),
        ("pushed", False),
        ("PUSH", False),
        ("build-1", True),
        ("build-x", True),
        ("build-", False),
        ("build-12", False),
        ("", False),
    ],
)
def test_event_names_match_the_globs(name: str, expected: bool) -> None:
    source = Source("billing", "bearer", ("x" * 20,), events=("invoice.*", "push", "build-?"))
    assert source.notifies(name) is expected


def test_no_filter_notifies_every_name_and_notify_false_none() -> None:
    assert all(Source("a", "bearer", ("x" * 20,)).notifies(n) for n in ("", "anything", "*"))
    quiet = Source("q", "bearer", ("x" * 20,), notify=False, events=("*",))
    assert not quiet.notifies("push") and not quiet.notifies("")
    assert Source("s", "bearer", ("x" * 20,), events=("*",)).notifies("")


def test_brackets_are_glob_classes_too() -> None:
    # fnmatch's [seq] comes with it; documented as * and ?, but it must not crash or match literally.
    source = Source("s", "bearer", ("x" * 20,), events=("build-[0-9]",))
    assert source.notifies("build-7") and not source.notifies("build-[0-9]")


# --------------------------------------------------------------------------- delivery


def test_a_filtered_out_event_is_stored_streamed_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(tmp_path, monkeypatch)
    skipped = post(h, "billing", "customer.created")
    h.drain()
    assert deliveries(h, skipped) == []
    assert windows(h) == []  # no window opened either
    stored = h.worker.store.get_event(skipped)
    assert stored is not None and stored.event == "customer.created" and stored.source == "billing"
    assert notification_state(h.worker.store, skipped, 1) == "none"
    stream = h.client.get("/events/billing?since=0&poll=1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert stream.status_code == 200, stream.get_data(as_text=True)
    ids = [
        json.loads(line[6:])["id"] for line in stream.get_data(as_text=True).splitlines() if line.startswith("data: ")
    ]
    assert ids == [str(skipped)]


def test_a_matching_event_alerts_and_a_filtered_one_does_not_count_as_a_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(tmp_path, monkeypatch)
    paid = post(h, "billing", "invoice.paid")
    h.drain()
    assert deliveries(h, paid) == [("alert", "sent")]
    assert windows(h) == [("billing", "invoice.paid", 300.0, 0)]
    for name in ("invoices", "Invoice.paid", "invoice"):
        post(h, "billing", name)
    h.drain()
    assert windows(h) == [("billing", "invoice.paid", 300.0, 0)]  # untouched by the filtered ones
    h.clock.advance(301)
    h.drain()
    kinds = h.worker.store.connection().execute("SELECT kind FROM deliveries").fetchall()
    assert [k[0] for k in kinds] == ["alert"]  # no summary: the window had no repeats
    assert windows(h) == []


def test_each_source_folds_repeats_with_its_own_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness(tmp_path, monkeypatch)
    for _ in range(3):
        post(h, "billing", "invoice.paid")
        post(h, "ops", "deploy")
    h.drain()
    assert windows(h) == [("billing", "invoice.paid", 300.0, 2), ("ops", "deploy", 60.0, 2)]
    h.clock.advance(61)  # the global 60 s window of ops has ended; billing's 300 s has not
    h.drain()
    assert windows(h) == [("billing", "invoice.paid", 300.0, 2)]
    assert summaries(h) == [("ops", 2)]
    h.clock.advance(240)
    h.drain()
    assert windows(h) == []
    assert summaries(h) == [("billing", 2), ("ops", 2)]


def test_cooldown_seconds_zero_sends_every_repeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = SOURCES.replace("cooldown_seconds = 300", "cooldown_seconds = 0")
    h = harness(tmp_path, monkeypatch, text)
    ids = [post(h, "billing", "push") for _ in range(4)]
    ops = [post(h, "ops", "deploy") for _ in range(2)]
    h.drain()
    assert [deliveries(h, i) for i in ids] == [[("alert", "sent")]] * 4
    assert [len(deliveries(h, i)) for i in ops] == [1, 0]  # ops still folds with the global 60 s
    assert windows(h) == [("ops", "deploy", 60.0, 1)]


def test_a_source_cooldown_applies_when_the_global_one_is_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness(tmp_path, monkeypatch, cooldown=0)
    billing = [post(h, "billing", "build-1") for _ in range(2)]
    ops = [post(h, "ops", "deploy") for _ in range(2)]
    h.drain()
    assert [len(deliveries(h, i)) for i in billing] == [1, 0]
    assert [len(deliveries(h, i)) for i in ops] == [1, 1]
    assert windows(h) == [("billing", "build-1", 300.0, 1)]


def test_replay_obeys_the_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness(tmp_path, monkeypatch)
    skipped = post(h, "billing", "customer.created")
    paid = post(h, "billing", "invoice.paid")
    h.drain()
    assert h.queue.replay_event(skipped) == 0
    assert deliveries(h, skipped) == []
    assert h.queue.replay_event(paid) == 1  # past the open window, as a new alert
    assert len(deliveries(h, paid)) == 2
    assert h.queue.replay_event(10_000) is None


def test_replay_of_a_notify_false_source_with_a_filter_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(tmp_path, monkeypatch, SOURCES.replace("cooldown_seconds = 300", "notify = false"))
    paid = post(h, "billing", "invoice.paid")
    h.drain()
    assert deliveries(h, paid) == []
    assert h.queue.replay_event(paid) == 0
