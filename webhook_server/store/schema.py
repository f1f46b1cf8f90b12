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
-- Retention deletes events with their deliveries: without it every event deleted made SQLite scan
-- all of `deliveries` for the foreign key (a 500-event batch took 701 ms instead of 17 ms).
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_id);
-- A forwarding target's pending deliveries in event order: an ordered target sends its oldest first.
CREATE INDEX IF NOT EXISTS deliveries_forward ON deliveries(recipient, id)
    WHERE status = 'pending' AND channel = 'http';

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

-- One row per request to a webhook endpoint (store.audit). Identical refusals (same source,
-- client, status, reason and key) in one minute (`bucket`) fold into one row with a count, so
-- a flood cannot grow the table faster than its distinct refusals. '' stands for "none" in the
-- folded columns: a unique index treats NULLs as all different.
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,               -- the (first) request's time, seconds since the epoch
    last_at REAL NOT NULL,          -- the last request folded into this row
    source TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '',
    status INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    total_ms REAL NOT NULL,         -- handling time, summed over the requests folded here
    event_id INTEGER,
    key TEXT NOT NULL DEFAULT '',   -- the fingerprint of the secret that matched
    count INTEGER NOT NULL DEFAULT 1,
    bucket INTEGER                  -- refusals only: the minute they fold in
);
-- No index on the times: ids follow time (`store.audit.first_id_since` finds one by binary search),
-- and one more index was one more page written by every accepted event's commit (3% of ingest).
CREATE UNIQUE INDEX IF NOT EXISTS audit_fold ON audit(bucket, source, client, status, reason, key)
    WHERE bucket IS NOT NULL;

-- Each secret's use, by fingerprint, for rotation (`webhook-server sources`): the audit rows up to
-- `audit_rollup.through_id`, summed by the delivery worker (store.audit.roll_up), so the counts
-- outlive AUDIT_RETENTION_DAYS and the way in writes nothing more than its audit row.
CREATE TABLE IF NOT EXISTS secret_uses (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    matches INTEGER NOT NULL,
    last_match REAL NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_rollup (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through_id INTEGER NOT NULL
);
"""

# Columns added after the first release: (table, column, declaration). `migrate` adds the ones
# an older database lacks (CREATE TABLE IF NOT EXISTS leaves an existing table as it was).
ADDED_COLUMNS = (
    ("events", "body", "BLOB"),
    ("events", "content_type", "TEXT"),
    ("events", "headers", "TEXT"),
)

# The same tables in PostgreSQL (store.postgres), one script per schema version, applied in order
# and recorded in `schema_version`. Never edit a released script: add the next one. Times are
# DOUBLE PRECISION (REAL is 4 bytes there), ids BIGINT, and `received_at` compares bytewise
# (COLLATE "C") as in SQLite, so text order is time order whatever the database's locale.
POSTGRES_MIGRATIONS = (
    """
CREATE TABLE events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    source TEXT NOT NULL,
    dedupe_key TEXT,
    received_at TEXT COLLATE "C" NOT NULL,
    event TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL DEFAULT '',
    client_ip TEXT,
    payload TEXT NOT NULL,
    dispatched INTEGER NOT NULL DEFAULT 0,
    body BYTEA,
    content_type TEXT,
    headers TEXT
);
CREATE UNIQUE INDEX events_dedupe ON events(source, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX events_undispatched ON events(id) WHERE dispatched = 0;

CREATE TABLE deliveries (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id BIGINT NOT NULL REFERENCES events(id),
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    recipient TEXT NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    window_start DOUBLE PRECISION,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION
);
CREATE INDEX deliveries_due ON deliveries(next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_dead ON deliveries(id) WHERE status = 'dead';
CREATE INDEX deliveries_event ON deliveries(event_id);
CREATE INDEX deliveries_forward ON deliveries(recipient, id) WHERE status = 'pending' AND channel = 'http';

CREATE TABLE counters (
    key TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE cooldowns (
    source TEXT NOT NULL,
    event TEXT NOT NULL,
    device TEXT NOT NULL,
    opened_at DOUBLE PRECISION NOT NULL,
    closes_at DOUBLE PRECISION NOT NULL,
    first_event_id BIGINT NOT NULL,
    last_event_id BIGINT NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, event, device)
);

CREATE TABLE audit (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    last_at DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '',
    status INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    total_ms DOUBLE PRECISION NOT NULL,
    event_id BIGINT,
    key TEXT NOT NULL DEFAULT '',
    count INTEGER NOT NULL DEFAULT 1,
    bucket BIGINT
);
CREATE UNIQUE INDEX audit_fold ON audit(bucket, source, client, status, reason, key) WHERE bucket IS NOT NULL;

CREATE TABLE secret_uses (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    matches BIGINT NOT NULL,
    last_match DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE audit_rollup (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through_id BIGINT NOT NULL
);
""",
)
