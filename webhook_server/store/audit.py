"""The audit trail: one record per request to a webhook endpoint, accepted or refused.

An accepted (or redelivered) event's record is written in the transaction that stores the
event, so the audit costs it no second transaction. Refusals fold: identical ones (same source,
client address, status, reason and key) within one minute are one row with a count, the last
time and the summed handling time, so a flood of one kind of refusal adds one row a minute. At
most DISTINCT_REFUSALS_PER_MINUTE different refusals get rows of their own each minute (the
count lives in the `counters` table, shared by every process); past that, refusals also fold
across client addresses, into rows whose client is MANY_CLIENTS, and MORE_REASONS rows later across
reasons too (MANY_REASONS). A flood from a million addresses, each with a reason of its own,
therefore adds at most DISTINCT_REFUSALS_PER_MINUTE + MORE_REASONS rows a minute, plus one per
source, status and secret.

Every function here runs inside the caller's transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from webhook_server.store.base import Connection, Row
from webhook_server.store.counters import increment
from webhook_server.store.records import iso_utc

FOLD_SECONDS = 60
DISTINCT_REFUSALS_PER_MINUTE = 500
MORE_REASONS = 100
MANY_CLIENTS = "*"
MANY_REASONS = "(many different reasons)"


@dataclass(frozen=True)
class AuditRecord:
    """One request as the audit keeps it: never a payload, never a secret."""

    at: float  # seconds since the epoch
    source: str | None
    client: str | None
    status: int
    reason: str | None
    duration_ms: float
    event_id: str | None = None
    key: str | None = None  # the fingerprint of the secret that matched (auth.fingerprint)


def record(conn: Connection, entry: AuditRecord) -> None:
    """Keep `entry`: a row of its own when accepted, folded into its minute's row when refused."""
    if entry.status < 300:
        conn.execute(
            "INSERT INTO audit (at, last_at, source, client, status, reason, key, total_ms, event_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.at, entry.at, *_folded(entry), entry.duration_ms, entry.event_id),
        )
        return
    _fold(conn, entry)


def _folded(entry: AuditRecord, client: str | None = None, reason: str | None = None) -> tuple[str, str, int, str, str]:
    """The columns identical refusals share, '' standing for none (see store.schema); `client`
    and `reason` replace the entry's own (past the cap)."""
    return (
        entry.source or "",
        client if client is not None else entry.client or "",
        entry.status,
        reason if reason is not None else (entry.reason or "")[:300],
        entry.key or "",
    )


FOLD = (
    "UPDATE audit SET count = count + 1, last_at = GREATEST(last_at, ?), total_ms = total_ms + ?"
    " WHERE bucket = ? AND source = ? AND client = ? AND status = ? AND reason = ? AND key = ?"
)
INSERT_FOLD = (
    "INSERT INTO audit (at, last_at, source, client, status, reason, key, total_ms, bucket)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (bucket, source, client, status, reason, key) WHERE bucket IS NOT NULL"
    " DO UPDATE SET count = audit.count + 1, last_at = GREATEST(audit.last_at, excluded.last_at),"
    " total_ms = audit.total_ms + excluded.total_ms"
)


def _fold(conn: Connection, entry: AuditRecord) -> None:
    bucket = int(entry.at // FOLD_SECONDS)
    columns = _folded(entry)
    if _folded_into(conn, entry, bucket, columns):
        return
    key = f"audit-rows:{bucket}"
    # The counters' windows run on the clock `increment` reads.
    rows = conn.execute("SELECT count FROM counters WHERE key = ? AND expires_at > ?", (key, time.time())).fetchone()
    made = int(rows[0]) if rows else 0
    # Past the cap, one row per source, status and reason, whatever the address; MORE_REASONS
    # rows later, one per source and status (reasons made to differ each time).
    if made >= DISTINCT_REFUSALS_PER_MINUTE:
        many_reasons = made >= DISTINCT_REFUSALS_PER_MINUTE + MORE_REASONS
        columns = _folded(entry, MANY_CLIENTS, MANY_REASONS if many_reasons else None)
        if _folded_into(conn, entry, bucket, columns):
            return
    conn.execute(INSERT_FOLD, (entry.at, entry.at, *columns, entry.duration_ms, bucket))
    increment(conn, key, FOLD_SECONDS * 2)  # counted only when a row is added


def _folded_into(conn: Connection, entry: AuditRecord, bucket: int, columns: tuple[Any, ...]) -> bool:
    """True when this minute already has a row with these columns (now one request more)."""
    return bool(conn.execute(FOLD, (entry.at, entry.duration_ms, bucket, *columns)).rowcount)


def iso(at: float) -> str:
    """An audit time as `audit` prints it (milliseconds)."""
    return iso_utc(at, "milliseconds")


def as_dict(row: Row) -> dict[str, Any]:
    """A record as `webhook-server audit --json` prints it (the contract's keys, then the fold's)."""
    return {
        "time": iso(row["at"]),
        "source": row["source"] or None,
        "client": row["client"] or None,
        "status": row["status"],
        "reason": row["reason"] or None,
        "duration_ms": round(row["total_ms"] / row["count"], 2),
        "event_id": str(row["event_id"]) if row["event_id"] is not None else None,
        "key": row["key"] or None,
        "count": row["count"],
        "last_time": iso(row["last_at"]),
    }


def first_id_since(conn: Connection, at: float) -> int:
    """About the first id whose record began at `at` or later (one past the newest when none did).

    Rows are added in time order, give or take the milliseconds a commit waits, so a binary
    search over ids finds it in a few dozen primary-key lookups; an index on the time would cost
    every accepted event's commit a page.
    """
    low, high = conn.execute("SELECT COALESCE(MIN(id), 1), COALESCE(MAX(id), 0) + 1 FROM audit").fetchone()
    while low < high:
        middle = (low + high) // 2
        row = conn.execute("SELECT id, at FROM audit WHERE id >= ? ORDER BY id LIMIT 1", (middle,)).fetchone()
        if row is None or row[1] >= at:
            high = middle
        else:
            low = row[0] + 1
    return int(low)


def records(
    conn: Connection, source: str | None, status: int | None, since: float | None, limit: int
) -> list[dict[str, Any]]:
    """Audit records, newest first: of one source, with one status, whose last request is since `since`."""
    clauses, params = ["1 = 1"], []
    # A folded row began at most FOLD_SECONDS before its last request.
    start = first_id_since(conn, since - FOLD_SECONDS) if since is not None else None
    for clause, value in (("source = ?", source), ("status = ?", status), ("id >= ?", start), ("last_at >= ?", since)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    rows = conn.execute(
        f"SELECT * FROM audit WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?",  # noqa: S608
        (*params, limit),
    ).fetchall()
    return [as_dict(row) for row in rows]


USES_BY_KEY = (
    "SELECT source, key, SUM(count) AS matches, MAX(last_at) AS last_match FROM audit"
    " WHERE id > ? AND id <= ? AND key != '' GROUP BY source, key"
)


def rolled_up_through(conn: Connection) -> int:
    """The last audit id that `secret_uses` counts (0: none yet)."""
    row = conn.execute("SELECT through_id FROM audit_rollup WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def roll_up(conn: Connection, now: float) -> int:
    """Add to `secret_uses` the audit rows that can no longer change (their minute of folding
    is over); returns the new `through_id`. Runs in the delivery worker, in its transaction."""
    through = rolled_up_through(conn)
    settled = first_id_since(conn, now - 2 * FOLD_SECONDS) - 1
    if settled <= through:
        return through
    conn.execute(
        f"INSERT INTO secret_uses (source, key, matches, last_match) {USES_BY_KEY}"
        " ON CONFLICT (source, key) DO UPDATE SET matches = secret_uses.matches + excluded.matches,"
        " last_match = GREATEST(secret_uses.last_match, excluded.last_match)",
        (through, settled),
    )
    conn.execute(
        "INSERT INTO audit_rollup (id, through_id) VALUES (1, ?)"
        " ON CONFLICT (id) DO UPDATE SET through_id = excluded.through_id",
        (settled,),
    )
    return settled


def secret_uses(conn: Connection) -> dict[tuple[str, str], tuple[int, float]]:
    """(source, fingerprint) -> (matches, time of the last match): what is rolled up, plus the
    audit rows since (a few minutes' worth while a worker runs)."""
    uses = {
        (row[0], row[1]): (int(row[2]), float(row[3]))
        for row in conn.execute("SELECT source, key, matches, last_match FROM secret_uses")
    }
    for row in conn.execute(USES_BY_KEY, (rolled_up_through(conn), 2**63 - 1)):
        matches, last = uses.get((row[0], row[1]), (0, 0.0))
        uses[(row[0], row[1])] = (matches + int(row[2]), max(last, float(row[3])))
    return uses
