"""What `webhook-server audit` and `sources` read: the audit records, and each secret's use.

Read-only. `audit` prints the contract's keys (`time`, `source`, `client`, `status`, `reason`,
`duration_ms`, `event_id`, `key`) and, for folded refusals, `count` and `last_time`; `sources`
prints `name`, `scheme`, `path`, `secrets` (each `fingerprint`, `matches`, `last_match`, and
the `variable` it comes from) and `targets`.
"""

from __future__ import annotations

import time
from typing import Any

from webhook_server.auth import fingerprint
from webhook_server.ingest.sources import Source
from webhook_server.ingest.targets import Target
from webhook_server.ops.events import duration_seconds
from webhook_server.store import audit
from webhook_server.store.base import EventStore


def records(
    store: EventStore, source: str | None, status: int | None, since: str | None, limit: int, now: float | None = None
) -> list[dict[str, Any]]:
    """Audit records, newest first; `since` is a DURATION (90s, 15m, 2h, 7d); ValueError otherwise."""
    start = (time.time() if now is None else now) - duration_seconds(since) if since else None
    return audit.records(store.connection(), source, status, start, limit)


def source_path(name: str) -> str:
    return "/webhook" if name == "generic" else f"/webhook/{name}"


def targets_of(source: str, targets: dict[str, Target]) -> list[str]:
    """The sorted names of the targets that take `source`'s events, named or through "*"."""
    return sorted(name for name, target in targets.items() if "*" in target.sources or source in target.sources)


def describe_sources(
    sources: dict[str, Source], store: EventStore, targets: dict[str, Target] | None = None
) -> list[dict[str, Any]]:
    """Each source with its secrets by fingerprint (how often and when each last matched) and its targets."""
    uses = audit.secret_uses(store.connection())
    described = []
    for name, source in sorted(sources.items()):
        variables = source.secret_names
        secrets = []
        for index, secret in enumerate(source.secrets):
            key = fingerprint(secret)
            matches, last = uses.get((name, key), (0, None))
            secrets.append(
                {
                    "fingerprint": key,
                    "matches": matches,
                    "last_match": audit.iso(last) if last is not None else None,
                    "variable": variables[index] if index < len(variables) else None,
                }
            )
        described.append(
            {
                "name": name,
                "scheme": source.scheme,
                "path": source_path(name),
                "secrets": secrets,
                "targets": targets_of(name, targets or {}),
            }
        )
    return described
