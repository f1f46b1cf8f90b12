"""The tables of the embedded store, created at start (CREATE ... IF NOT EXISTS), and the columns
added since, which `store.sqlite.create_schema` adds to an older database."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    dedupe_key TEXT,
    received_at TEXT NOT NULL,
    event TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL DEFAULT '',
    client_ip TEXT,
    payload TEXT NOT NULL,
    dispatched INTEGER NOT NULL DEFAULT 0,
    body BLOB,             -- the raw body as received (NULL for events stored before it was kept)
    content_type TEXT,
    headers TEXT           -- the kept sender headers, a JSON list of [name, value] pairs
);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events(source, dedupe_key)
    WHERE dedupe_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_undispatched ON events(id) WHERE dispatched = 0;

CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL REFERENCES events(id),
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    recipient TEXT NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    window_start REAL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries(id) WHERE status = 'dead';

-- Rate-limit windows (ratelimit.SQLiteStorage), here so that an accepted event is counted in
-- the transaction that stores it.
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    expires_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS cooldowns (
    source TEXT NOT NULL,
    event TEXT NOT NULL,
    device TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closes_at REAL NOT NULL,
    first_event_id INTEGER NOT NULL,
    last_event_id INTEGER NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, event, device)
);
"""

# Columns added after the first release: (table, column, declaration). `migrate` adds the ones
# an older database lacks (CREATE TABLE IF NOT EXISTS leaves an existing table as it was).
ADDED_COLUMNS = (
    ("events", "body", "BLOB"),
    ("events", "content_type", "TEXT"),
    ("events", "headers", "TEXT"),
)
