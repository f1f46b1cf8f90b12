"""Sign and send a test event as each kind of sender would (`webhook-server send`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from standardwebhooks.webhooks import Webhook

from .auth import sign_hub
from .sources import Source

Signer = Callable[[str, bytes], dict[str, str]]


def _hub(algorithm: str, header: str) -> Callable[[Source], Signer]:
    return lambda source: lambda secret, body: {source.signature_header or header: sign_hub(secret, body, algorithm)}


def _stripe(secret: str, body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={stamp},v1={digest}"}


def _slack(secret: str, body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}"}


def _standard(secret: str, body: bytes) -> dict[str, str]:
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, now, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}


def _shopify(secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return {"X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(), "X-Shopify-Webhook-Id": str(uuid.uuid4())}


SIGNERS: dict[str, Callable[[Source], Signer]] = {
    "bearer": lambda source: lambda secret, body: {"Authorization": f"Bearer {secret}"},
    "basic": lambda source: (
        lambda secret, body: {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}
    ),
    "hmac-sha256": _hub("sha256", "X-Hub-Signature-256"),
    "hmac-sha1": _hub("sha1", "X-Hub-Signature"),
    "hmac-sha512": _hub("sha512", "X-Hub-Signature-512"),
    "standard-webhooks": lambda source: _standard,
    "stripe": lambda source: _stripe,
    "slack": lambda source: _slack,
    "shopify": lambda source: _shopify,
}


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
        if source.scheme == "hmac-sha256":
            headers["X-GitHub-Delivery"] = str(uuid.uuid4())
    headers.update(SIGNERS[source.scheme](source)(source.secrets[0], body))
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
