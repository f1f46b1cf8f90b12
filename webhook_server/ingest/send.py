"""Send a test event signed as each kind of sender would (`webhook-server send`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from webhook_server.auth import SCHEMES
from webhook_server.ingest.sources import Source


def particle_form(document: dict[str, Any]) -> dict[str, str]:
    """Particle's default webhook body: form fields, with what a device would add filled in."""
    fields = {
        "event": "test-event",
        "data": "",
        "coreid": "api",
        "published_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "fw_version": "",  # as the console's test event sends it
        "public": "false",
    }
    fields.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in document.items()})
    return fields


def build_request(source: Source, base_url: str, document: Any) -> urllib.request.Request:
    """The request that source's sender would make for `document`."""
    path = {"particle": "/webhook/particle", "generic": "/webhook"}.get(source.name, f"/webhook/{source.name}")
    headers = {"User-Agent": "webhook-server-send"}
    if source.parser == "particle" and isinstance(document, dict):
        body = urlencode(particle_form(document)).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        body = json.dumps(document).encode()
        headers["Content-Type"] = "application/json"
    headers.update(SCHEMES[source.scheme].sign(source, source.secrets[0], body))
    return urllib.request.Request(base_url.rstrip("/") + path, data=body, headers=headers, method="POST")  # noqa: S310


def send_test_event(source: Source, base_url: str, document: Any, timeout: float = 10.0) -> tuple[int, str]:
    """POST it; returns (status, response text). Connection errors come back as status 0."""
    request = build_request(source, base_url, document)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, f"cannot reach {base_url}: {exc}"
