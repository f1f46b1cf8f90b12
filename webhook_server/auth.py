"""Proof of who sent a webhook: one verifier per scheme, constant-time compares only.

Every verifier takes the source, the request headers and the raw body, and raises
`BadCredentials` (one message for every failure, so a caller learns nothing about which
part was wrong). Each accepts any of the source's secrets, so secrets can be rotated.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Callable, Iterable, Mapping

from standardwebhooks.webhooks import Webhook
from werkzeug.datastructures import Headers as WerkzeugHeaders

from .errors import BadCredentials
from .sources import Source

# A request's headers (werkzeug's, case-insensitive) or a plain mapping, as tests may pass.
Headers = Mapping[str, str] | WerkzeugHeaders
Verifier = Callable[[Source, Headers, bytes], None]

# Senders that timestamp their signatures are refused outside this window (replay protection).
TIMESTAMP_TOLERANCE_SECONDS = 300


def _equal(given: str | bytes, expected: str | bytes) -> bool:
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def _any_equal(given: Iterable[str | bytes], expected: Iterable[str | bytes]) -> bool:
    """Compare every pair, without stopping early, so timing says nothing about which matched."""
    matched = False
    for candidate in expected:
        for value in given:
            matched |= _equal(value, candidate)
    return matched


def _digest(algorithm: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, algorithm).digest()


def _require(condition: bool, reason: str) -> None:
    """Refuse with `reason` (for the server's log; the response never says which check failed)."""
    if not condition:
        raise BadCredentials(reason)


def _authorization(headers: Headers, kind: str) -> str:
    value = headers.get("Authorization", "")
    prefix, _, credentials = value.partition(" ")
    _require(bool(value), "no Authorization header")
    _require(prefix.lower() == kind and bool(credentials.strip()), f"the Authorization header is not {kind.title()}")
    return credentials.strip()


def verify_bearer(source: Source, headers: Headers, body: bytes) -> None:
    """`Authorization: Bearer <secret>` (Particle)."""
    token = _authorization(headers, "bearer")
    _require(_any_equal([token], source.secrets), "wrong bearer token")


def verify_basic(source: Source, headers: Headers, body: bytes) -> None:
    """`Authorization: Basic base64(user:password)`; a secret is `user:password`."""
    encoded = _authorization(headers, "basic")
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadCredentials("the Basic credentials are not base64") from None
    _require(_any_equal([decoded], [s.encode() for s in source.secrets]), "wrong user or password")


def _hub_signature(algorithm: str, default_header: str) -> Verifier:
    """GitHub style: `<header>: <algorithm>=<hex HMAC of the raw body>`."""

    def verify(source: Source, headers: Headers, body: bytes) -> None:
        header = source.signature_header or default_header
        value = headers.get(header, "")
        prefix, _, signature = value.partition("=")
        _require(bool(value), f"no {header} header")
        _require(prefix == algorithm and bool(signature), f"{header} is not {algorithm}=<hex digest>")
        expected = [_digest(algorithm, s.encode(), body).hex() for s in source.secrets]
        _require(_any_equal([signature.strip().lower()], expected), f"{header} does not match the body")

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


def verify_standard_webhooks(source: Source, headers: Headers, body: bytes) -> None:
    """Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`."""
    wanted = {k: headers.get(k, "") for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    matched = False
    reason = "no matching webhook-signature"
    for secret in source.secrets:
        try:
            Webhook(secret).verify(body, wanted, json_parse=False)
            matched = True
        # The library raises several types on hostile input (bad base64, missing commas, bad UTF-8);
        # its messages ("Message timestamp too old", "Missing required headers") name no secret.
        except Exception as exc:
            reason = f"standard webhooks: {str(exc)[:100] or type(exc).__name__}"
    _require(matched, reason)


def verify_stripe(source: Source, headers: Headers, body: bytes) -> None:
    """Stripe: `Stripe-Signature: t=<ts>,v1=<hex>` over `<ts>.<body>`, keyed by the whsec_ string."""
    parts = [p.partition("=") for p in headers.get("Stripe-Signature", "").split(",")]
    timestamps = [v.strip() for k, _, v in parts if k.strip() == "t"]
    signatures = [v.strip() for k, _, v in parts if k.strip() == "v1"]
    _require(len(timestamps) == 1 and bool(signatures), "Stripe-Signature is missing or not t=...,v1=...")
    _require(_fresh(timestamps[0]), "Stripe-Signature timestamp is not within five minutes")
    message = timestamps[0].encode() + b"." + body
    expected = [_digest("sha256", s.encode(), message).hex() for s in source.secrets]
    _require(_any_equal(signatures, expected), "Stripe-Signature does not match the body")


def verify_slack(source: Source, headers: Headers, body: bytes) -> None:
    """Slack: `X-Slack-Signature: v0=<hex>` over `v0:<X-Slack-Request-Timestamp>:<body>`."""
    timestamp = headers.get("X-Slack-Request-Timestamp", "")
    _require(_fresh(timestamp), "X-Slack-Request-Timestamp is missing or not within five minutes")
    message = b"v0:" + timestamp.encode() + b":" + body
    expected = ["v0=" + _digest("sha256", s.encode(), message).hex() for s in source.secrets]
    given = headers.get("X-Slack-Signature", "")
    _require(given.startswith("v0="), "X-Slack-Signature is missing or not v0=<hex>")
    _require(_any_equal([given], expected), "X-Slack-Signature does not match the body")


def verify_shopify(source: Source, headers: Headers, body: bytes) -> None:
    """Shopify: `X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256 of the body>`."""
    expected = [base64.b64encode(_digest("sha256", s.encode(), body)) for s in source.secrets]
    given = headers.get("X-Shopify-Hmac-Sha256", "")
    _require(bool(given), "no X-Shopify-Hmac-Sha256 header")
    _require(_any_equal([given.encode()], expected), "X-Shopify-Hmac-Sha256 does not match the body")


VERIFIERS: dict[str, Verifier] = {
    "bearer": verify_bearer,
    "basic": verify_basic,
    "hmac-sha256": verify_hmac_sha256,
    "hmac-sha1": verify_hmac_sha1,
    "hmac-sha512": verify_hmac_sha512,
    "standard-webhooks": verify_standard_webhooks,
    "stripe": verify_stripe,
    "slack": verify_slack,
    "shopify": verify_shopify,
}


def authenticate(source: Source, headers: Headers, body: bytes) -> None:
    """Raise `BadCredentials` unless the request carries a valid credential for `source`."""
    VERIFIERS[source.scheme](source, headers, body)


# Headers in which senders put their own delivery id, used to recognise a redelivery.
DELIVERY_ID_HEADERS = (
    "X-GitHub-Delivery",
    "webhook-id",
    "X-Shopify-Webhook-Id",
    "X-Gitlab-Event-UUID",
    "X-Delivery-Id",
)


def sign_hub(secret: str, body: bytes, algorithm: str = "sha256") -> str:
    """The signature header value a GitHub-style sender would send (used by `send` and tests)."""
    return f"{algorithm}=" + _digest(algorithm, secret.encode(), body).hex()
