"""What an accepted payload is: its event name, its device, and what makes a redelivery."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from webhook_server.auth import SCHEMES, Headers
from webhook_server.ingest.sources import Source

MAX_NAME_LENGTH = 200
# Where senders name the event, before the body's `event` or `type` field.
EVENT_HEADERS = ("X-GitHub-Event", "X-Shopify-Topic", "X-Gitlab-Event", "X-Event-Key", "X-Event-Type")
# Never kept with an event: credentials, and what the transport or a proxy added rather than
# the sender (re-sending them would be wrong, and X-Forwarded-For is a client's address).
NOT_KEPT = frozenset(
    {
        *("authorization", "proxy-authorization", "cookie"),
        *("host", "content-length", "content-type", "connection", "keep-alive", "transfer-encoding"),
        *("te", "trailer", "upgrade", "expect", "forwarded", "x-real-ip"),
        *("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port"),
    }
)


def describe(source: Source, headers: Headers, payload: Any) -> tuple[str, str, str | None]:
    """(event name, device, dedupe key) for this source's payload."""
    if source.parser == "particle":
        return str(payload["event"]), str(payload["coreid"]).lower(), particle_dedupe_key(payload)
    body = payload if isinstance(payload, dict) else {}
    named = next((headers[h] for h in EVENT_HEADERS if headers.get(h)), None)
    event = named or _string(body.get("event")) or _string(body.get("type")) or ""
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


def kept_headers(source: Source, headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The sender's headers worth keeping: not credentials, nor what the transport added."""
    scheme = SCHEMES[source.scheme]
    secret = {name.lower() for name in scheme.headers} if scheme.carries_secret else set()
    return tuple((name, value) for name, value in headers if name.lower() not in NOT_KEPT | secret)
