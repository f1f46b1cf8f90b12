"""`webhook-server events` and `events show`: what was stored, and all of one event."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask

from tests.conftest import (
    PARTICLE_SECRET,
    assert_accepted,
    base_settings,
    bearer,
    particle_event,
    signed_headers,
)
from tests.smtpsink import SmtpSink
from webhook_server.cli import main
from webhook_server.delivery.worker import Worker
from webhook_server.ops.events import Since, parse_since
from webhook_server.settings import load_settings

pytestmark = pytest.mark.usefixtures("each_store")


@pytest.fixture
def posted(make_app: Callable[..., Flask], tmp_path: Path) -> tuple[dict[str, str], list[str], bytes]:
    app = make_app()
    client = app.test_client()
    ids = [
        assert_accepted(client.post("/webhook/particle", data=particle_event(data=f"n{n}"), headers=bearer()))
        for n in range(3)
    ]
    body = b'{"event": "deploy",  "n": 1.50}'
    ids.append(
        assert_accepted(client.post("/webhook", data=body, headers=signed_headers(body, **{"X-GitHub-Event": "push"})))
    )
    env = {k: str(v) for k, v in base_settings(tmp_path).items()}  # the app's store, SQLite or PostgreSQL
    return env, ids, body


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def test_events_lists_newest_first_with_the_notification_state(posted: tuple[dict[str, str], list[str], bytes]) -> None:
    env, ids, _ = posted
    code, output = run(env, "events")
    assert code == 0
    rows = [line.split()[0] for line in output.splitlines()[1:]]
    assert rows == list(reversed(ids))
    assert all(line.rstrip().endswith("waiting") for line in output.splitlines()[1:])  # no worker ran


def test_events_json_is_the_event_json_one_per_line(posted: tuple[dict[str, str], list[str], bytes]) -> None:
    env, ids, _ = posted
    code, output = run(env, "events", "--json", "--source", "particle", "--limit", "2")
    assert code == 0
    documents = [json.loads(line) for line in output.splitlines()]
    assert [d["id"] for d in documents] == [ids[2], ids[1]]
    assert set(documents[0]) == {"id", "source", "received_at", "event", "device", "payload"}


def test_events_since_an_id_and_a_duration(posted: tuple[dict[str, str], list[str], bytes]) -> None:
    env, ids, _ = posted
    assert [json.loads(x)["id"] for x in run(env, "events", "--json", "--since", ids[1])[1].splitlines()] == [
        ids[3],
        ids[2],
    ]
    assert len(run(env, "events", "--json", "--since", "1h")[1].splitlines()) == 4
    code, output = run(env, "events", "--since", "yesterday")
    assert code == 2 and "--since" in output


def test_events_show_returns_what_was_posted_byte_for_byte(posted: tuple[dict[str, str], list[str], bytes]) -> None:
    env, ids, body = posted
    code, output = run(env, "events", "show", ids[3], "--json")
    assert code == 0
    document = json.loads(output)
    assert base64.b64decode(document["body_base64"]) == body
    assert document["content_type"] == "application/json"
    assert ["X-Hub-Signature-256", signed_headers(body)["X-Hub-Signature-256"]] in document["headers"]
    assert document["deliveries"] == []
    code, text = run(env, "events", "show", ids[0])
    assert code == 0 and "payload:" in text and "deliveries: none" in text and PARTICLE_SECRET not in text


def test_events_show_of_an_unknown_id_fails(posted: tuple[dict[str, str], list[str], bytes]) -> None:
    env, _, _ = posted
    code, output = run(env, "events", "show", "999")
    assert code == 1 and "no event 999" in output


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800)])
def test_durations(text: str, seconds: int) -> None:
    since = parse_since(text, now=1_000_000.0)
    expected = datetime.fromtimestamp(1_000_000 - seconds, UTC).isoformat(timespec="microseconds")
    assert since == Since(received_after=expected.replace("+00:00", "Z"))
    assert parse_since("42") == Since(after_id=42)


@pytest.mark.parametrize("text", ["", "5w", "-5m", "1.5h", "h", "\uff11\uff12"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text)


def test_the_notification_state_follows_the_deliveries(posted: tuple[dict[str, str], list[str], bytes]) -> None:
    env, ids, _ = posted
    worker = Worker(load_settings(env))
    while worker.run_once():
        pass
    states = {line.split()[0]: line.split()[-1] for line in run(env, "events")[1].splitlines()[1:]}
    # Without SMTP each alert is written to the log; the two repeats of particle/motion fold.
    assert states[ids[0]] == "sent" and states[ids[3]] == "sent"
    assert states[ids[1]] == "none" and states[ids[2]] == "none"


def test_events_replay_sends_the_mail_again(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    with SmtpSink() as sink:
        smtp = {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink.port),
            "SMTP_SECURITY": "none",
            "SMTP_EMAIL": "alerts@example.com",
            "RECIPIENT_EMAIL": "owner@example.com",
        }
        app = make_app(**smtp)
        event_id = assert_accepted(app.test_client().post("/webhook/particle", data=particle_event(), headers=bearer()))
        env = {**{k: str(v) for k, v in base_settings(tmp_path).items()}, **smtp}
        worker = Worker(load_settings(env))
        while worker.run_once():
            pass
        assert len(sink.wait_for(1)) == 1
        code, output = run(env, "events", "replay", event_id)
        assert (code, output.strip()) == (
            0,
            f"Queued 1 new deliveries for event {event_id}; the delivery worker sends them.",
        )
        while worker.run_once():
            pass
        first, second = sink.wait_for(2)
        assert first["Subject"] == second["Subject"] and first["Message-ID"] != second["Message-ID"]
        assert str(second["X-Webhook-Event-Id"]) == event_id
        code, output = run(env, "events", "show", event_id, "--json")
        assert [d["state"] for d in json.loads(output)["deliveries"]] == ["sent", "sent"]
    assert run(env, "events", "replay", "999")[0] == 1
