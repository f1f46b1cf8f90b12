"""Retention: events older than EVENT_RETENTION_DAYS go, with their deliveries, and audit rows
whose last request is older than AUDIT_RETENTION_DAYS; 0 keeps them forever.

The delivery worker calls `purge` from its housekeeping (about once a minute). Rows go in
batches of BATCH_ROWS, each its own short BEGIN IMMEDIATE transaction with a pause after it, so
a web process waiting to write gets the lock within one batch (a few ms, docs/benchmarks.md);
at most MAX_BATCHES a table per call, so a large backlog (the first run on an old store) is
worked off over several calls rather than in one long stall of the worker's loop.

Events go strictly oldest id first, and stop at the first one that must stay: one waiting to be
dispatched, one a cool-down window points at (its repeats become a summary on that window's
event), or one with a pending delivery (deleting it would lose that notification). So what is
kept is always every event from MIN(id) on, and `EventStore.id_bounds` tells a live-stream cursor
older than that it missed something. Such a hold lasts seconds to hours (a window, the retry
schedule), never for good.

No auto_vacuum, no `incremental_vacuum`: measured with `./dev bench retention` (20,000 events
a day, 3 days kept; docs/benchmarks.md), the file stops growing once the retention period is full,
because SQLite reuses freed pages for new rows: purged once a minute, it went from 240.0 to 240.3 MB
between day 5 and day 10 (freelist 17-36 pages after a purge); with an incremental vacuum after
every purge, 240.3 to 240.4 MB. Purged once a day, the freelist held a day of rows (21,800 pages) and the
vacuum gave 85 MB back, but the next day's rows took it again: the peak was 343 MB either way.
Returning pages only for the file to grow again buys nothing, costs a write-locked transaction per
vacuum (0.14 s for a day's pages), and an existing store would need a full VACUUM (a rewrite of the
whole file under the write lock) to switch auto_vacuum on at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from webhook_server.store.audit import first_id_since, roll_up, rolled_up_through
from webhook_server.store.base import Connection, EventStore
from webhook_server.store.records import iso_utc

BATCH_ROWS = 500
# And at most about this much of bodies: 500 events of 1 MB held the write lock for 3-5 s, and an
# ingest write waiting behind it gave up (503).
BATCH_BYTES = 4 * 1024 * 1024
MAX_BATCHES = 20  # a table, per call: 10,000 rows, well under a second of the worker's loop
PAUSE_SECONDS = 0.005  # between batches: long enough for waiting writers to take the lock
DAY_SECONDS = 86400

# The lowest event id that must be kept (NULL: none must). MIN ignores NULLs. `+event_id` keeps
# SQLite off deliveries_event (it walked every sent delivery, oldest first, looking for a pending
# one: 7 ms a call at 100,000 deliveries), so it reads the few pending rows (deliveries_due).
KEEP_FROM = """
SELECT MIN(id) FROM (
    SELECT MIN(id) AS id FROM events WHERE dispatched = 0
    UNION ALL SELECT MIN(first_event_id) FROM cooldowns
    UNION ALL SELECT MIN(last_event_id) FROM cooldowns
    UNION ALL SELECT MIN(+event_id) FROM deliveries WHERE status = 'pending'
) AS kept
"""


@dataclass(frozen=True)
class Purged:
    """What one `purge` removed; `more` when it stopped at its bound with old rows left."""

    events: int = 0
    deliveries: int = 0
    audit: int = 0
    more: bool = False

    @property
    def removed(self) -> bool:
        return bool(self.events or self.deliveries or self.audit)


def cutoff_seconds(now: float, days: int) -> float | None:
    """The epoch time before which rows are old, or None when nothing can be (0: forever)."""
    if days <= 0 or days * DAY_SECONDS >= now:
        return None
    return now - days * DAY_SECONDS


def event_batch(conn: Connection, before: str, limit: int) -> tuple[int, int]:
    """Delete up to `limit` of the oldest events received before `before`, with their
    deliveries, stopping at the first one that must be kept; returns (events, deliveries)."""
    keep_from = conn.execute(KEEP_FROM).fetchone()[0]
    rows = conn.execute(
        "SELECT id, received_at, COALESCE(length(body), 0) + length(payload) FROM events"
        " WHERE id < ? ORDER BY id LIMIT ?",
        (keep_from if keep_from is not None else 2**63 - 1, limit),
    )
    last, size = None, 0
    for row in rows:  # row by row: a pass with nothing old reads one row, not `limit`
        if row[1] >= before or size >= BATCH_BYTES:  # ids follow receipt: nothing after is older
            break
        last, size = row[0], size + row[2]
    if last is None:
        return 0, 0
    # The rows read are every event up to `last`, so ranges delete exactly them.
    deliveries = conn.execute("DELETE FROM deliveries WHERE event_id <= ?", (last,)).rowcount
    events = conn.execute("DELETE FROM events WHERE id <= ?", (last,)).rowcount
    return events, deliveries


def audit_batch(conn: Connection, before: float, limit: int) -> int:
    """Delete up to `limit` audit rows whose last request was before `before`, oldest first.

    Only rows that began before it can be old; ids follow time, so they are the ids below
    `first_id_since(before)` (found without an index on the time; see store.audit)."""
    # Never a row the secrets' counts do not include yet (see store.audit.roll_up).
    bound = min(first_id_since(conn, before), rolled_up_through(conn) + 1)
    return int(
        conn.execute(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE id < ? AND last_at < ? ORDER BY id LIMIT ?)",
            (bound, before, limit),
        ).rowcount
    )


def purge_events(store: EventStore, before: str, batch: int, max_batches: int, pause: float) -> tuple[int, int, bool]:
    """Event batches until none is full or `max_batches` ran; (events, deliveries, more left)."""
    events = deliveries = 0
    for number in range(max_batches):
        if number:
            time.sleep(pause)
        with store.transaction() as conn:
            # One worker at a time, on any host; another one's turn does this worker's part too.
            removed, dropped = event_batch(conn, before, batch) if store.take_turn(conn, "retention") else (0, 0)
        # A batch is about 2 MB of SQLite's WAL; on the worker's 0.5 s timer a pass grew it by 60 MB.
        store.checkpoint(force=True)
        events, deliveries = events + removed, deliveries + dropped
        if removed == 0:
            return events, deliveries, False
    return events, deliveries, True


def purge_audit(store: EventStore, before: float, batch: int, max_batches: int, pause: float) -> tuple[int, bool]:
    """Audit batches until none is full or `max_batches` ran; (rows, more left)."""
    removed = 0
    for number in range(max_batches):
        if number:
            time.sleep(pause)
        with store.transaction() as conn:
            rows = audit_batch(conn, before, batch) if store.take_turn(conn, "retention") else 0
        store.checkpoint()
        removed += rows
        if rows < batch:
            return removed, False
    return removed, True


def purge(
    store: EventStore,
    event_days: int,
    audit_days: int,
    now: float | None = None,
    batch: int = BATCH_ROWS,
    max_batches: int = MAX_BATCHES,
    pause: float = PAUSE_SECONDS,
) -> Purged:
    """Remove what is older than the retention periods at `now` (epoch seconds), a bounded amount."""
    now = time.time() if now is None else now
    with store.transaction() as conn:  # what the secrets' counts need of the audit, before it goes
        if store.take_turn(conn, "audit-rollup"):  # two workers would both add the same rows
            roll_up(conn, now)
    events = deliveries = audit = 0
    more_events = more_audit = False
    if (event_cutoff := cutoff_seconds(now, event_days)) is not None:
        events, deliveries, more_events = purge_events(store, iso_utc(event_cutoff), batch, max_batches, pause)
    if (audit_cutoff := cutoff_seconds(now, audit_days)) is not None:
        audit, more_audit = purge_audit(store, audit_cutoff, batch, max_batches, pause)
    return Purged(events, deliveries, audit, more_events or more_audit)
