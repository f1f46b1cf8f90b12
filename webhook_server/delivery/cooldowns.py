"""Alert folding: the first alert of a kind (source, `event`, `device`) goes out at once and opens
a cool-down window; repeats inside it only count, and become one summary when it closes.

Windows live in the store (table `cooldowns`), so they survive restarts. Every function here
runs inside the caller's transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from webhook_server.settings import Settings
from webhook_server.store.base import Connection, Row

# add(conn, event_id, kind, recipients, repeats, window_start): the deliveries of one notice.
AddDeliveries = Callable[[Connection, int, str, tuple[str, ...] | None, int, float | None], int]


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Cooldowns:
    """What to send for each new event, and the summaries of windows that ended."""

    def __init__(self, settings: Settings, add: AddDeliveries) -> None:
        self.settings = settings
        self.add = add

    def _recipients(self, source_name: str) -> tuple[str, ...] | None:
        source = self.settings.sources.get(source_name)
        return source.recipients if source is not None else None

    def _window_seconds(self, source_name: str) -> float:
        """The source's own `cooldown_seconds` when it sets one, else ALERT_COOLDOWN_SECONDS."""
        source = self.settings.sources.get(source_name)
        if source is None or source.cooldown_seconds is None:
            return self.settings.alert_cooldown_seconds
        return float(source.cooldown_seconds)

    def admit(self, conn: Connection, row: Row) -> None:
        """A new event: an alert and a new window, or one more repeat in an open window."""
        source = self.settings.sources.get(row["source"])
        # notify = false or an `events` filter that leaves this name out: no delivery, and no
        # window opened or counted, so a filtered-out event cannot hold back a later alert.
        if source is not None and not source.notifies(row["event"]):
            return
        received = epoch(row["received_at"])
        key = (row["source"], row["event"], row["device"])
        window = conn.execute("SELECT * FROM cooldowns WHERE source = ? AND event = ? AND device = ?", key).fetchone()
        if window is not None and received < window["closes_at"]:
            conn.execute(
                "UPDATE cooldowns SET repeats = repeats + 1, last_event_id = ?"
                " WHERE source = ? AND event = ? AND device = ?",
                (row["id"], *key),
            )
            return
        if window is not None:
            self.close(conn, window)
        self.add(conn, row["id"], "alert", self._recipients(row["source"]), 0, None)
        seconds = self._window_seconds(row["source"])
        if seconds > 0:
            conn.execute(
                "INSERT INTO cooldowns (source, event, device, opened_at, closes_at, first_event_id,"
                " last_event_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*key, received, received + seconds, row["id"], row["id"]),
            )

    def close_ended(self, conn: Connection, now: float | None = None) -> int:
        """Close the windows that ended; returns how many."""
        now = time.time() if now is None else now
        # An event still waiting to be dispatched may be a repeat inside a window: close only
        # windows that ended before the oldest such event was received. Under steady load this
        # still closes windows, where "wait until nothing is pending" could wait forever.
        oldest = conn.execute("SELECT received_at FROM events WHERE dispatched = 0 ORDER BY id LIMIT 1").fetchone()
        cutoff = min(now, epoch(oldest[0])) if oldest is not None else now
        windows = conn.execute("SELECT * FROM cooldowns WHERE closes_at <= ?", (cutoff,)).fetchall()
        for window in windows:
            self.close(conn, window)
        return len(windows)

    def close(self, conn: Connection, window: Row) -> None:
        """End a window: its repeats, if any, become one summary."""
        conn.execute(
            "DELETE FROM cooldowns WHERE source = ? AND event = ? AND device = ?",
            (window["source"], window["event"], window["device"]),
        )
        if window["repeats"] > 0:
            recipients = self._recipients(window["source"])
            self.add(conn, window["last_event_id"], "summary", recipients, window["repeats"], window["opened_at"])
