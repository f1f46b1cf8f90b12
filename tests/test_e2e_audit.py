"""A guessing attack against a real server: 20,000 refused requests leave the audit table
bounded, every one of them counted, and real events accepted meanwhile at normal speed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.flood import ATTACKER, SENDER, during_flood, trickle
from tests.server import Server

SECRET = "flood-particle-secret-0123456789"
FLOOD = 20_000
EVENTS = 60


def test_a_refused_flood_keeps_the_audit_bounded_and_events_flowing(tmp_path: Path) -> None:
    # The sender stays within its limits (about 15 a second); the attacker is over them at once.
    env = {
        "PARTICLE_WEBHOOK_SECRET": SECRET,
        "DATA_DIR": tmp_path / "data",
        "TRUSTED_PROXIES": 1,
        "RATE_LIMIT": "600/minute;20/second",
    }
    with Server(env, tmp_path, command="web") as server:
        quiet = trickle(server.port, SECRET, EVENTS)
        busy, statuses, seconds = during_flood(server.port, SECRET, FLOOD, EVENTS)
    assert quiet.statuses == {202: EVENTS} and busy.statuses == {202: EVENTS}
    assert sum(statuses.values()) == FLOOD and set(statuses) <= {401, 429}
    db = sqlite3.connect(tmp_path / "data" / "webhooks.sqlite3")
    rows = db.execute("SELECT status, reason, count FROM audit WHERE client = ?", (ATTACKER,)).fetchall()
    accepted = db.execute("SELECT COUNT(*) FROM audit WHERE client = ? AND status = 202", (SENDER,)).fetchone()[0]
    print(
        f"\nflood: {FLOOD} refused in {seconds:.1f} s ({FLOOD / seconds:.0f}/s), {dict(statuses)};"
        f" audit rows for it: {len(rows)}; accepted p50 {quiet.median_ms():.1f} ms alone,"
        f" {busy.median_ms():.1f} ms during the flood (p99 {quiet.p99_ms():.1f} / {busy.p99_ms():.1f} ms)"
    )
    assert sum(count for _, _, count in rows) == FLOOD  # every refused request is accounted for
    # One row per kind of refusal per minute: a flood of any length within two minutes stays at a few.
    assert len(rows) <= 8, rows
    assert accepted == 2 * EVENTS
    # Two cores shared with the attacker's own client: slower, but still an answer in milliseconds.
    assert busy.median_ms() < max(10 * quiet.median_ms(), 50), (quiet.median_ms(), busy.median_ms())
