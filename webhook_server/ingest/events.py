"""What an accepted payload is: its event name, its device, and what makes a redelivery."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from webhook_server.auth import SCHEMES, Headers
from webhook_server.ingest.sources import Source

MAX_NAME_LENGTH = 200


def describe(source: Source, headers: Headers, payload: Any) -> tuple[str, str, str | None]:
    """(event name, device, dedupe key) for this source's payload."""
    if source.parser == "particle":
        return str(payload["event"]), str(payload["coreid"]).lower(), particle_dedupe_key(payload)
    body = payload if isinstance(payload, dict) else {}
    event = headers.get("X-GitHub-Event") or _string(body.get("event")) or _string(body.get("type")) or ""
    device = _string(body.get("device")) or ""
    delivery_id = SCHEMES[source.scheme].delivery_id(headers, payload)
    key = f"d:{delivery_id[:MAX_NAME_LENGTH]}" if delivery_id else None
    return event[:MAX_NAME_LENGTH], device[:MAX_NAME_LENGTH], key


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def particle_dedupe_key(payload: dict[str, Any]) -> str:
    """The same event, data, coreid and published_at is a redelivery, whatever the encoding."""
    data = payload.get("data")
    if data is None:
        data = ""
    elif not isinstance(data, str):
        data = json.dumps(data, sort_keys=True, separators=(",", ":"))
    identity = [payload["event"], data, str(payload["coreid"]).lower(), payload["published_at"]]
    return "p:" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()
