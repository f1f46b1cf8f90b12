"""Proof of who sent a webhook: the registry of sign-in schemes, constant-time compares only.

`SCHEMES` holds one entry per scheme: how to verify a request, how its sender signs one (for
`webhook-server send` and the tests), which headers carry the credential, its OpenAPI
security entry, and where its sender puts a delivery id and a timestamp. Adding a scheme is
adding an entry here.

Every verifier takes the source's keys, the request headers and the raw body, and returns which
of the source's secrets matched (its index, for the audit's fingerprint) or raises `Refused` with
a reason for the server's log; the web side answers every refusal with the same
401, so a caller learns nothing about which part was wrong. Nothing here needs the web
framework: the delivery worker reads the registry too. Each accepts any of the source's secrets,
so secrets can be rotated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, overload

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Headers(Protocol):
    """A request's headers: werkzeug's (case-insensitive), or a plain mapping as tests pass."""

    @overload
    def get(self, key: str) -> str | None: ...

    @overload
    def get(self, key: str, default: str) -> str: ...

    def __getitem__(self, key: str) -> str: ...


class Refused(Exception):
    """The credentials are missing or wrong; `reason` says which part, for the log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Keys(Protocol):
    """What a verifier needs of a source."""

    @property
    def scheme(self) -> str: ...

    @property
    def secrets(self) -> tuple[str, ...]: ...

    @property
    def signature_header(self) -> str | None: ...


# (keys, headers, raw body) -> the index of the secret that matched; raises Refused
Verifier = Callable[[Keys, Headers, bytes], int]
# (keys, the secret to sign with, the raw body) -> the headers its sender would add
Signer = Callable[[Keys, str, bytes], dict[str, str]]

# Senders that timestamp their signatures are refused outside this window (replay protection).
TIMESTAMP_TOLERANCE_SECONDS = 300


def _equal(given: str | bytes, expected: str | bytes) -> bool:
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def _matching(given: Iterable[str | bytes], expected: Iterable[str | bytes]) -> int | None:
    """The index of the first expected value that a given one equals, or None. Every pair is
    compared, without stopping early, so timing says nothing about which one matched."""
    matched: int | None = None
    for index, candidate in enumerate(expected):
        for value in given:
            if _equal(value, candidate) and matched is None:
                matched = index
    return matched


def fingerprint(secret: str) -> str:
    """How the audit and `sources` name a secret: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def _digest(algorithm: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, algorithm).digest()


def _require(condition: bool, reason: str) -> None:
    """Refuse with `reason` (for the server's log; the response never says which check failed)."""
    if not condition:
        raise Refused(reason)


def _matched(index: int | None, reason: str) -> int:
    """`index`, or refuse with `reason` when no secret matched."""
    if index is None:
        raise Refused(reason)
    return index


def _authorization(headers: Headers, kind: str) -> str:
    value = headers.get("Authorization", "")
    prefix, _, credentials = value.partition(" ")
    _require(bool(value), "no Authorization header")
    _require(prefix.lower() == kind and bool(credentials.strip()), f"the Authorization header is not {kind.title()}")
    return credentials.strip()


def verify_bearer(source: Keys, headers: Headers, body: bytes) -> int:
    """`Authorization: Bearer <secret>` (Particle)."""
    token = _authorization(headers, "bearer")
    return _matched(_matching([token], source.secrets), "wrong bearer token")


def verify_basic(source: Keys, headers: Headers, body: bytes) -> int:
    """`Authorization: Basic base64(user:password)`; a secret is `user:password`."""
    encoded = _authorization(headers, "basic")
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("the Basic credentials are not base64") from None
    return _matched(_matching([decoded], [s.encode() for s in source.secrets]), "wrong user or password")


def _hub_signature(algorithm: str, default_header: str) -> Verifier:
    """GitHub style: `<header>: <algorithm>=<hex HMAC of the raw body>`."""

    def verify(source: Keys, headers: Headers, body: bytes) -> int:
        header = source.signature_header or default_header
        value = headers.get(header, "")
        prefix, _, signature = value.partition("=")
        _require(bool(value), f"no {header} header")
        _require(prefix == algorithm and bool(signature), f"{header} is not {algorithm}=<hex digest>")
        expected = [_digest(algorithm, s.encode(), body).hex() for s in source.secrets]
        return _matched(_matching([signature.strip().lower()], expected), f"{header} does not match the body")

    verify.__name__ = f"verify_hmac_{algorithm}"
    verify.__doc__ = f"`{default_header}: {algorithm}=<hex>` over the raw body."
    return verify


verify_hmac_sha256 = _hub_signature("sha256", "X-Hub-Signature-256")
verify_hmac_sha1 = _hub_signature("sha1", "X-Hub-Signature")
verify_hmac_sha512 = _hub_signature("sha512", "X-Hub-Signature-512")


def _fresh(timestamp: str) -> bool:
    try:
        return abs(time.time() - int(timestamp)) <= TIMESTAMP_TOLERANCE_SECONDS
    except ValueError:
        return False


STANDARD_WEBHOOKS_REASONS = frozenset(
    {
        "Missing required headers",
        "No matching signature found",
        "Invalid Signature Headers",
        "Message timestamp too old",
        "Message timestamp too new",
    }
)


def verify_standard_webhooks(source: Keys, headers: Headers, body: bytes) -> int:
    """Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`."""
    wanted = {k: headers.get(k, "") for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    matched: int | None = None
    reason = "no matching webhook-signature"
    for index, secret in enumerate(source.secrets):
        try:
            Webhook(secret).verify(body, wanted, json_parse=False)
            matched = index if matched is None else matched
        # The library raises several types on hostile input (bad base64, missing commas, bad UTF-8).
        # Only its own fixed messages are kept: others quote the sender's bytes or lengths, and a
        # reason per request would give each refusal an audit row of its own.
        except Exception as exc:
            known = isinstance(exc, WebhookVerificationError) and str(exc) in STANDARD_WEBHOOKS_REASONS
            reason = f"standard webhooks: {exc if known else type(exc).__name__}"
    return _matched(matched, reason)


def verify_stripe(source: Keys, headers: Headers, body: bytes) -> int:
    """Stripe: `Stripe-Signature: t=<ts>,v1=<hex>` over `<ts>.<body>`, keyed by the whsec_ string."""
    parts = [p.partition("=") for p in headers.get("Stripe-Signature", "").split(",")]
    timestamps = [v.strip() for k, _, v in parts if k.strip() == "t"]
    signatures = [v.strip() for k, _, v in parts if k.strip() == "v1"]
    _require(len(timestamps) == 1 and bool(signatures), "Stripe-Signature is missing or not t=...,v1=...")
    _require(_fresh(timestamps[0]), "Stripe-Signature timestamp is not within five minutes")
    message = timestamps[0].encode() + b"." + body
    expected = [_digest("sha256", s.encode(), message).hex() for s in source.secrets]
    return _matched(_matching(signatures, expected), "Stripe-Signature does not match the body")


def verify_slack(source: Keys, headers: Headers, body: bytes) -> int:
    """Slack: `X-Slack-Signature: v0=<hex>` over `v0:<X-Slack-Request-Timestamp>:<body>`."""
    timestamp = headers.get("X-Slack-Request-Timestamp", "")
    _require(_fresh(timestamp), "X-Slack-Request-Timestamp is missing or not within five minutes")
    message = b"v0:" + timestamp.encode() + b":" + body
    expected = ["v0=" + _digest("sha256", s.encode(), message).hex() for s in source.secrets]
    given = headers.get("X-Slack-Signature", "")
    _require(given.startswith("v0="), "X-Slack-Signature is missing or not v0=<hex>")
    return _matched(_matching([given], expected), "X-Slack-Signature does not match the body")


def verify_shopify(source: Keys, headers: Headers, body: bytes) -> int:
    """Shopify: `X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256 of the body>`."""
    expected = [base64.b64encode(_digest("sha256", s.encode(), body)) for s in source.secrets]
    given = headers.get("X-Shopify-Hmac-Sha256", "")
    _require(bool(given), "no X-Shopify-Hmac-Sha256 header")
    return _matched(_matching([given.encode()], expected), "X-Shopify-Hmac-Sha256 does not match the body")


def sign_hub(secret: str, body: bytes, algorithm: str = "sha256") -> str:
    """The signature header value a GitHub-style sender would send."""
    return f"{algorithm}=" + _digest(algorithm, secret.encode(), body).hex()


def _sign_hub(algorithm: str, default_header: str) -> Signer:
    def sign(keys: Keys, secret: str, body: bytes) -> dict[str, str]:
        headers = {keys.signature_header or default_header: sign_hub(secret, body, algorithm)}
        if algorithm == "sha256":
            headers["X-GitHub-Delivery"] = str(uuid.uuid4())
        return headers

    return sign


def _sign_bearer(keys: Keys, secret: str, body: bytes) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _sign_basic(keys: Keys, secret: str, body: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def _sign_stripe(keys: Keys, secret: str, body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={stamp},v1={digest}"}


def _sign_slack(keys: Keys, secret: str, body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}"}


def _sign_standard(keys: Keys, secret: str, body: bytes) -> dict[str, str]:
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, now, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}


def _sign_shopify(keys: Keys, secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return {"X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(), "X-Shopify-Webhook-Id": str(uuid.uuid4())}


# -- where a sender says "this is a redelivery" --------------------------------------------------

# Headers in which senders put their own delivery id, honoured for every scheme.
DELIVERY_ID_HEADERS = (
    "X-GitHub-Delivery",
    "webhook-id",
    "X-Shopify-Webhook-Id",
    "X-Gitlab-Event-UUID",
    "X-Delivery-Id",
)


def header_delivery_id(headers: Headers, payload: Any) -> str | None:
    return next((headers[h] for h in DELIVERY_ID_HEADERS if headers.get(h)), None)


def stripe_delivery_id(headers: Headers, payload: Any) -> str | None:
    """Stripe sends no delivery header; its event id (`evt_...`) names the event."""
    given = payload.get("id") if isinstance(payload, dict) else None
    return header_delivery_id(headers, payload) or (given if isinstance(given, str) and given else None)


def standard_webhooks_secret_problem(value: str) -> str | None:
    """`whsec_<base64>`: anything else would be decoded into some other key and never match."""
    encoded = value.removeprefix("whsec_")
    try:
        if base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True):
            return None
    except (binascii.Error, ValueError):
        pass
    return "whsec_ followed by base64"


# -- the registry --------------------------------------------------------------------------------


def _header_key(name: str, description: str) -> dict[str, str]:
    return {"type": "apiKey", "in": "header", "name": name, "description": description}


@dataclass(frozen=True)
class Scheme:
    name: str
    verify: Verifier
    sign: Signer
    headers: tuple[str, ...]  # the request headers that carry the credential
    security: dict[str, dict[str, str]]  # its OpenAPI security schemes, all required together
    delivery_id: Callable[[Headers, Any], str | None] = header_delivery_id
    timestamp_header: str | None = None  # where its sender puts the signed time, if anywhere
    secret_problem: Callable[[str], str | None] = field(default=lambda value: None)
    carries_secret: bool = False  # its credential headers hold the secret itself (never kept)


def _hub(algorithm: str, header: str, key: str) -> Scheme:
    return Scheme(
        f"hmac-{algorithm}",
        _hub_signature(algorithm, header),
        _sign_hub(algorithm, header),
        (header,),
        {key: _header_key(header, f"`{algorithm}=<hex HMAC-{algorithm.upper()} of the raw body>`.")},
    )


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme(
            "bearer",
            verify_bearer,
            _sign_bearer,
            ("Authorization",),
            {"bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <secret>`."}},
            carries_secret=True,
        ),
        Scheme(
            "basic",
            verify_basic,
            _sign_basic,
            ("Authorization",),
            {"basic": {"type": "http", "scheme": "basic", "description": "A `basic` source's user:password."}},
            carries_secret=True,
        ),
        _hub("sha256", "X-Hub-Signature-256", "hubSignature256"),
        _hub("sha1", "X-Hub-Signature", "hubSignature"),
        _hub("sha512", "X-Hub-Signature-512", "hubSignature512"),
        Scheme(
            "standard-webhooks",
            verify_standard_webhooks,
            _sign_standard,
            ("webhook-signature",),
            {
                "webhookId": _header_key("webhook-id", "Standard Webhooks message id."),
                "webhookTimestamp": _header_key("webhook-timestamp", "Standard Webhooks timestamp (Unix seconds)."),
                "webhookSignature": _header_key("webhook-signature", "Standard Webhooks `v1,<base64>` signatures."),
            },
            timestamp_header="webhook-timestamp",
            secret_problem=standard_webhooks_secret_problem,
        ),
        Scheme(
            "stripe",
            verify_stripe,
            _sign_stripe,
            ("Stripe-Signature",),
            {"stripeSignature": _header_key("Stripe-Signature", "`t=<timestamp>,v1=<hex>`.")},
            delivery_id=stripe_delivery_id,
            timestamp_header="Stripe-Signature",
        ),
        Scheme(
            "slack",
            verify_slack,
            _sign_slack,
            ("X-Slack-Signature",),
            {
                "slackSignature": _header_key("X-Slack-Signature", "`v0=<hex>`."),
                "slackTimestamp": _header_key("X-Slack-Request-Timestamp", "Unix seconds."),
            },
            timestamp_header="X-Slack-Request-Timestamp",
        ),
        Scheme(
            "shopify",
            verify_shopify,
            _sign_shopify,
            ("X-Shopify-Hmac-Sha256",),
            {"shopifyHmac": _header_key("X-Shopify-Hmac-Sha256", "Base64 HMAC-SHA256 of the raw body.")},
        ),
    )
}


def authenticate(source: Keys, headers: Headers, body: bytes) -> str:
    """The fingerprint of the secret the request proves; `Refused` unless it carries a valid one."""
    return fingerprint(source.secrets[SCHEMES[source.scheme].verify(source, headers, body)])


def bearer_token(headers: Headers) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None (for /metrics)."""
    try:
        return _authorization(headers, "bearer")
    except Refused:
        return None
