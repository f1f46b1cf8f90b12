"""Proof of sender, through the Flask test client: every scheme, right and wrong.

A failure is always 401 with one body and a `WWW-Authenticate` header, whatever part was
wrong, so a caller learns nothing about which part failed.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from standardwebhooks.webhooks import Webhook
from werkzeug.datastructures import Headers
from werkzeug.test import TestResponse

from tests.conftest import (
    PARTICLE_SECRET,
    WEBHOOK_SECRET,
    assert_accepted,
    assert_unauthorized,
    bearer,
    hub_signature,
    particle_event,
    signed_headers,
)
from webhook_server.auth import sign_hub
from webhook_server.ingest.send import build_request
from webhook_server.ingest.sources import Source

GITHUB_TEST_BODY = b"Hello, World!"
GITHUB_TEST_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


# --------------------------------------------------------------------------- Particle (bearer)

PARTICLE_BODY = json.dumps(particle_event()).encode()

BAD_BEARER = [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": ""}, id="empty-header"),
    pytest.param({"Authorization": "Bearer"}, id="scheme-only"),
    pytest.param({"Authorization": "Bearer "}, id="empty-token"),
    pytest.param({"Authorization": "Bearer    "}, id="blank-token"),
    pytest.param({"Authorization": PARTICLE_SECRET}, id="no-scheme"),
    pytest.param(
        {"Authorization": "Basic " + base64.b64encode(f"particle:{PARTICLE_SECRET}".encode()).decode()},
        id="basic-scheme",
    ),
    pytest.param({"Authorization": f"Basic {PARTICLE_SECRET}"}, id="basic-scheme-raw-token"),
    pytest.param({"Authorization": f"Token {PARTICLE_SECRET}"}, id="token-scheme"),
    pytest.param({"Authorization": f"Bearer{PARTICLE_SECRET}"}, id="no-space"),
    pytest.param(bearer("wrong-secret-0123456789abc"), id="wrong-token"),
    pytest.param(bearer(PARTICLE_SECRET + "x"), id="extra-char-after"),
    pytest.param(bearer("x" + PARTICLE_SECRET), id="extra-char-before"),
    pytest.param(bearer(PARTICLE_SECRET[:-1]), id="one-char-short"),
    pytest.param(bearer(PARTICLE_SECRET.upper()), id="wrong-case"),
    pytest.param(bearer(f"{PARTICLE_SECRET} {PARTICLE_SECRET}"), id="token-twice"),
    pytest.param(bearer(WEBHOOK_SECRET), id="the-other-sources-secret"),
    pytest.param(bearer("pärticle-secret-0123456789"), id="non-ascii"),
    pytest.param({"X-Authorization": f"Bearer {PARTICLE_SECRET}"}, id="wrong-header"),
]


@pytest.mark.parametrize("headers", BAD_BEARER)
def test_particle_bad_bearer_is_401(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.post(
        "/webhook/particle", data=PARTICLE_BODY, headers={"Content-Type": "application/json", **headers}
    )
    assert_unauthorized(response)


def test_particle_every_401_is_identical(client: FlaskClient) -> None:
    bodies = set()
    for param in BAD_BEARER:
        headers = param.values[0]
        response = client.post(
            "/webhook/particle", data=PARTICLE_BODY, headers={"Content-Type": "application/json", **headers}
        )
        bodies.add((assert_unauthorized(response), response.headers["WWW-Authenticate"]))
    assert len(bodies) == 1


def test_particle_token_in_query_string_is_not_accepted(client: FlaskClient) -> None:
    response = client.post(f"/webhook/particle?access_token={PARTICLE_SECRET}", json=particle_event())
    assert_unauthorized(response)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_particle_bearer_scheme_is_case_insensitive(client: FlaskClient, scheme: str) -> None:
    response = client.post(
        "/webhook/particle", json=particle_event(), headers={"Authorization": f"{scheme} {PARTICLE_SECRET}"}
    )
    assert_accepted(response)


# --------------------------------------------------------------------------- generic (X-Hub-Signature-256)


def test_github_published_test_vector() -> None:
    assert WEBHOOK_SECRET == "It's a Secret to Everybody"
    assert hub_signature(GITHUB_TEST_BODY) == GITHUB_TEST_SIGNATURE
    assert sign_hub(WEBHOOK_SECRET, GITHUB_TEST_BODY) == GITHUB_TEST_SIGNATURE


def test_server_accepts_the_github_test_vector_signature(client: FlaskClient) -> None:
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": GITHUB_TEST_SIGNATURE}
    response = client.post("/webhook", data=GITHUB_TEST_BODY, headers=headers)
    # Auth passed; "Hello, World!" is not JSON, so the answer is 400, not 401.
    assert response.status_code == 400
    assert response.get_json()["error"] == "malformed_body"
    wrong = {**headers, "X-Hub-Signature-256": "sha256=" + "0" * 64}
    assert_unauthorized(client.post("/webhook", data=GITHUB_TEST_BODY, headers=wrong))


BODY = b'{"event": "deploy", "ok": true}'
GOOD_HEX = hmac.new(WEBHOOK_SECRET.encode(), BODY, hashlib.sha256).hexdigest()

BAD_SIGNATURES = [
    pytest.param({}, id="missing"),
    pytest.param({"X-Hub-Signature-256": ""}, id="empty"),
    pytest.param({"X-Hub-Signature-256": "sha256="}, id="prefix-only"),
    pytest.param({"X-Hub-Signature-256": GOOD_HEX}, id="no-prefix"),
    pytest.param({"X-Hub-Signature-256": "SHA256=" + GOOD_HEX}, id="uppercase-prefix"),
    pytest.param({"X-Hub-Signature-256": "sha256:" + GOOD_HEX}, id="colon"),
    pytest.param({"X-Hub-Signature-256": "sha256 =" + GOOD_HEX}, id="space-before-equals"),
    pytest.param({"X-Hub-Signature-256": "sha256=" + "0" * 64}, id="zeros"),
    pytest.param({"X-Hub-Signature-256": "sha256=" + GOOD_HEX[:-1]}, id="one-digit-short"),
    pytest.param({"X-Hub-Signature-256": "sha256=" + GOOD_HEX + "0"}, id="one-digit-long"),
    pytest.param({"X-Hub-Signature-256": "sha256=" + GOOD_HEX[::-1]}, id="reversed"),
    pytest.param({"X-Hub-Signature-256": "sha256=zz" + GOOD_HEX[2:]}, id="non-hex"),
    pytest.param({"X-Hub-Signature-256": "sha256=é" + GOOD_HEX[1:]}, id="non-ascii"),
    pytest.param({"X-Hub-Signature-256": hub_signature(BODY, "another-secret-0123456789")}, id="other-secret"),
    pytest.param({"X-Hub-Signature-256": hub_signature(BODY + b" ")}, id="other-body"),
    pytest.param({"X-Hub-Signature-256": hub_signature(BODY, algorithm="sha1")}, id="sha1-in-256-header"),
    pytest.param({"X-Hub-Signature": hub_signature(BODY, algorithm="sha1")}, id="sha1-header"),
    pytest.param({"X-Hub-Signature-256": hub_signature(BODY, algorithm="sha512")}, id="sha512"),
    pytest.param({"Authorization": f"Bearer {WEBHOOK_SECRET}"}, id="bearer-instead"),
]


@pytest.mark.parametrize("headers", BAD_SIGNATURES)
def test_generic_bad_signature_is_401(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.post("/webhook", data=BODY, headers={"Content-Type": "application/json", **headers})
    assert_unauthorized(response)


def test_generic_good_signature_is_accepted(client: FlaskClient) -> None:
    assert_accepted(client.post("/webhook", data=BODY, headers=signed_headers(BODY)))


def test_generic_signature_covers_the_raw_bytes(client: FlaskClient) -> None:
    # The same document, serialised differently: only the signed bytes pass.
    other = json.dumps(json.loads(BODY), separators=(",", ":")).encode()
    assert other != BODY
    assert_unauthorized(client.post("/webhook", data=other, headers=signed_headers(BODY)))


def test_generic_form_option_signature_covers_the_form_body(client: FlaskClient) -> None:
    form = b"payload=" + b"%7B%22a%22%3A1%7D"
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Hub-Signature-256": hub_signature(form)}
    assert_accepted(client.post("/webhook", data=form, headers=headers))
    # Signed over the JSON inside instead of the body sent: refused.
    headers["X-Hub-Signature-256"] = hub_signature(b'{"a":1}')
    assert_unauthorized(client.post("/webhook", data=form, headers=headers))


# --------------------------------------------------------------------------- SOURCES_FILE schemes

SECRETS = {
    "bearer": ("bearer-secret-one-0123456789", "bearer-secret-two-0123456789"),
    "basic": ("alice:correct-horse-battery", "alice:staple-horse-battery2"),
    "hmac-sha256": ("hmac256-secret-one-01234567", "hmac256-secret-two-01234567"),
    "hmac-sha1": ("hmac1-secret-one-0123456789", "hmac1-secret-two-0123456789"),
    "hmac-sha512": ("hmac512-secret-one-01234567", "hmac512-secret-two-01234567"),
    "standard-webhooks": (
        "whsec_" + base64.b64encode(b"standard-webhooks-key-one-32byte").decode(),
        "whsec_" + base64.b64encode(b"standard-webhooks-key-two-32byte").decode(),
    ),
    "stripe": ("whsec_stripe_secret_one_0123456789", "whsec_stripe_secret_two_0123456789"),
    "slack": ("8f742231b10e8888abcd99yyyzzz85a5", "9e853342c21f9999bcde00zzzaaa96b6"),
    "shopify": ("shpss_0123456789abcdef0123456789ab", "shpss_fedcba9876543210fedcba987654"),
}
WRONG = {
    "standard-webhooks": "whsec_" + base64.b64encode(b"some-other-key-entirely-32-bytes").decode(),
    "basic": "alice:wrong-password-000000",
}
SCHEMES = list(SECRETS)


def _variable(scheme: str, index: int) -> str:
    return f"SRC_{scheme.upper().replace('-', '_')}_{index}"


@pytest.fixture
def sources_app(make_app: Callable[..., Flask], tmp_path: Path) -> Flask:
    """One source per scheme, named after it, each with two secrets (a rotation)."""
    lines = []
    for scheme in SCHEMES:
        lines += [
            f"[sources.{scheme}]",
            f'scheme = "{scheme}"',
            f'secrets = ["{_variable(scheme, 0)}", "{_variable(scheme, 1)}"]',
            "",
        ]
    path = tmp_path / "sources.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    env = {_variable(s, i): secret for s, pair in SECRETS.items() for i, secret in enumerate(pair)}
    return make_app(SOURCES_FILE=str(path), **env)


def _source(app: Flask, name: str) -> Source:
    source: Source = app.config["SETTINGS"].sources[name]
    return source


def _signed(app: Flask, scheme: str, secret: str | None = None, document: Any = None) -> tuple[str, bytes, Headers]:
    """(path, body, headers) as the scheme's sender would send them, via senders.build_request."""
    source = _source(app, scheme)
    if secret is not None:
        source = dataclasses.replace(source, secrets=(secret,))
    request = build_request(
        source, "http://localhost", document if document is not None else {"event": "test", "n": uuid.uuid4().hex}
    )
    assert isinstance(request.data, bytes)
    return urlsplit(request.full_url).path, request.data, Headers(request.header_items())


def _post(client: FlaskClient, path: str, body: bytes, headers: Headers | dict[str, str]) -> TestResponse:
    return client.post(path, data=body, headers=headers)


def test_every_scheme_is_configured(sources_app: Flask) -> None:
    for scheme in SCHEMES:
        source = _source(sources_app, scheme)
        assert source.scheme == scheme
        assert source.secrets == SECRETS[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_correctly_signed_is_accepted(sources_app: Flask, scheme: str) -> None:
    path, body, headers = _signed(sources_app, scheme)
    assert path == f"/webhook/{scheme}"
    assert_accepted(_post(sources_app.test_client(), path, body, headers))


@pytest.mark.parametrize("index", [0, 1], ids=["first-secret", "second-secret"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_accepts_each_secret_while_rotating(sources_app: Flask, scheme: str, index: int) -> None:
    path, body, headers = _signed(sources_app, scheme, SECRETS[scheme][index])
    assert_accepted(_post(sources_app.test_client(), path, body, headers))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_wrong_secret_is_401(sources_app: Flask, scheme: str) -> None:
    path, body, headers = _signed(sources_app, scheme, WRONG.get(scheme, "wrong-secret-0123456789abcdef"))
    assert_unauthorized(_post(sources_app.test_client(), path, body, headers))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_without_credentials_is_401(sources_app: Flask, scheme: str) -> None:
    path, body, _ = _signed(sources_app, scheme)
    assert_unauthorized(_post(sources_app.test_client(), path, body, {"Content-Type": "application/json"}))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s not in ("bearer", "basic")])
def test_scheme_tampered_body_is_401(sources_app: Flask, scheme: str) -> None:
    path, body, headers = _signed(sources_app, scheme)
    tampered = body.replace(b'"test"', b'"tset"')
    assert tampered != body
    assert_unauthorized(_post(sources_app.test_client(), path, tampered, headers))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_signature_of_another_scheme_is_401(sources_app: Flask, scheme: str) -> None:
    """Credentials made for one source never open another (same secrets, wrong scheme)."""
    client = sources_app.test_client()
    for other in SCHEMES:
        if other == scheme:
            continue
        if other == "standard-webhooks" and scheme != other:
            continue  # its signer needs a whsec_ base64 secret; that pairing is covered below
        _, body, headers = _signed(sources_app, other, SECRETS[scheme][0])
        response = _post(client, f"/webhook/{scheme}", body, headers)
        assert response.status_code == 401, (scheme, other)


def test_every_scheme_fails_with_the_same_body(sources_app: Flask) -> None:
    client = sources_app.test_client()
    bodies = {
        assert_unauthorized(_post(client, f"/webhook/{s}", b"{}", {"Content-Type": "application/json"}))
        for s in SCHEMES
    }
    bodies.add(assert_unauthorized(client.post("/webhook/particle", json={})))
    bodies.add(assert_unauthorized(client.post("/webhook", json={})))
    assert len(bodies) == 1


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Basic " + base64.b64encode(b"alice:correct-horse-batter").decode(), id="short-password"),
        pytest.param("Basic " + base64.b64encode(b"bob:correct-horse-battery").decode(), id="other-user"),
        pytest.param("Basic " + base64.b64encode(b"alice").decode(), id="no-password"),
        pytest.param("Basic alice:correct-horse-battery", id="not-base64"),
        pytest.param("Basic !!!!", id="garbage"),
        pytest.param("Basic " + base64.b64encode(b"alice:correct-horse-battery").decode()[:-2], id="truncated"),
        pytest.param("Basic " + base64.b64encode("alice:corréct-horse-battery".encode()).decode(), id="non-ascii"),
        pytest.param("Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(), id="binary"),
        pytest.param("Bearer alice:correct-horse-battery", id="bearer-scheme"),
    ],
)
def test_basic_bad_credentials(sources_app: Flask, authorization: str) -> None:
    response = sources_app.test_client().post("/webhook/basic", json={}, headers={"Authorization": authorization})
    assert_unauthorized(response)


@pytest.mark.parametrize(
    ("scheme", "header"),
    [("hmac-sha1", "X-Hub-Signature"), ("hmac-sha512", "X-Hub-Signature-512"), ("hmac-sha256", "X-Hub-Signature-256")],
)
def test_hmac_schemes_use_their_own_header_and_prefix(sources_app: Flask, scheme: str, header: str) -> None:
    client = sources_app.test_client()
    path, body, headers = _signed(sources_app, scheme)
    assert header in headers
    algorithm = scheme.removeprefix("hmac-")
    assert headers[header].startswith(f"{algorithm}=")
    for wrong in ("sha1", "sha256", "sha512"):
        if wrong == algorithm:
            continue
        forged = headers.copy()
        forged[header] = hub_signature(body, SECRETS[scheme][0], wrong)
        assert_unauthorized(_post(client, path, body, forged))


def test_hmac_source_with_its_own_signature_header(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    path = tmp_path / "sources.toml"
    path.write_text(
        '[sources.gitea]\nscheme = "hmac-sha256"\nsecrets = ["GITEA_SECRET"]\nsignature_header = "X-Gitea-Signature"\n',
        encoding="utf-8",
    )
    app = make_app(SOURCES_FILE=str(path), GITEA_SECRET="gitea-secret-0123456789")
    client = app.test_client()
    body = b'{"ref": "main"}'
    signature = hub_signature(body, "gitea-secret-0123456789")
    ok = client.post(
        "/webhook/gitea", data=body, headers={"Content-Type": "application/json", "X-Gitea-Signature": signature}
    )
    assert_accepted(ok)
    default_header = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
    assert_unauthorized(client.post("/webhook/gitea", data=body, headers=default_header))


# Timestamped schemes: a signature outside the 5-minute window is a replay.


def _stripe_headers(secret: str, body: bytes, stamp: int, extra: str = "") -> dict[str, str]:
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "Stripe-Signature": f"t={stamp},v1={digest}{extra}"}


def _slack_headers(secret: str, body: bytes, stamp: int) -> dict[str, str]:
    digest = hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": str(stamp),
        "X-Slack-Signature": f"v0={digest}",
    }


def _standard_headers(secret: str, body: bytes, stamp: int) -> dict[str, str]:
    msg_id = f"msg_{uuid.uuid4().hex}"
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(stamp, UTC), body.decode())
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature,
    }


TIMESTAMPED: dict[str, Callable[[str, bytes, int], dict[str, str]]] = {
    "stripe": _stripe_headers,
    "slack": _slack_headers,
    "standard-webhooks": _standard_headers,
}


@pytest.mark.parametrize(
    ("age", "accepted"),
    [
        pytest.param(0, True, id="now"),
        pytest.param(60, True, id="1-minute-old"),
        pytest.param(-60, True, id="1-minute-ahead"),
        pytest.param(600, False, id="10-minutes-old"),
        pytest.param(-600, False, id="10-minutes-ahead"),
        pytest.param(86_400 * 365, False, id="a-year-old"),
    ],
)
@pytest.mark.parametrize("scheme", list(TIMESTAMPED))
def test_timestamped_schemes_refuse_old_and_future_signatures(
    sources_app: Flask, scheme: str, age: int, accepted: bool
) -> None:
    body = json.dumps({"id": uuid.uuid4().hex, "type": "test"}).encode()
    headers = TIMESTAMPED[scheme](SECRETS[scheme][0], body, int(time.time()) - age)
    response = sources_app.test_client().post(f"/webhook/{scheme}", data=body, headers=headers)
    if accepted:
        assert_accepted(response)
    else:
        assert_unauthorized(response)


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param("", id="empty"),
        pytest.param("v1=abc", id="no-timestamp"),
        pytest.param("t=notanumber,v1=abc", id="bad-timestamp"),
        pytest.param("garbage", id="garbage"),
        pytest.param(",,,", id="commas"),
    ],
)
def test_stripe_malformed_signature_header(sources_app: Flask, signature: str) -> None:
    headers = {"Content-Type": "application/json", "Stripe-Signature": signature}
    assert_unauthorized(sources_app.test_client().post("/webhook/stripe", data=b"{}", headers=headers))


def test_stripe_signature_is_over_timestamp_and_body(sources_app: Flask) -> None:
    client = sources_app.test_client()
    body = b'{"id": "evt_1", "type": "charge.succeeded"}'
    now = int(time.time())
    headers = _stripe_headers(SECRETS["stripe"][0], body, now)
    # The signature for `now` presented with another timestamp: refused.
    moved = headers["Stripe-Signature"].replace(f"t={now}", f"t={now - 1}")
    assert_unauthorized(client.post("/webhook/stripe", data=body, headers={**headers, "Stripe-Signature": moved}))
    # Two t= values: refused, whichever is right.
    doubled = f"t={now - 1}," + headers["Stripe-Signature"]
    assert_unauthorized(client.post("/webhook/stripe", data=body, headers={**headers, "Stripe-Signature": doubled}))
    # Several v1 signatures (Stripe sends one per active secret): any that matches will do.
    several = _stripe_headers(SECRETS["stripe"][0], body, now, extra=",v1=" + "0" * 64)
    assert_accepted(client.post("/webhook/stripe", data=body, headers=several))


def test_stripe_redelivery_by_event_id(sources_app: Flask) -> None:
    client = sources_app.test_client()
    body = b'{"id": "evt_123", "type": "charge.succeeded"}'
    first = assert_accepted(
        client.post("/webhook/stripe", data=body, headers=_stripe_headers(SECRETS["stripe"][0], body, int(time.time())))
    )
    again = client.post(
        "/webhook/stripe", data=body, headers=_stripe_headers(SECRETS["stripe"][1], body, int(time.time()))
    )
    assert again.status_code == 200
    assert again.get_json() == {"status": "duplicate", "id": first}


def test_stripe_key_is_the_whole_whsec_string(sources_app: Flask) -> None:
    """Stripe keys its HMAC with the `whsec_...` text itself, unlike Standard Webhooks."""
    body = b'{"id": "evt_2"}'
    stamp = int(time.time())
    client = sources_app.test_client()
    secret = SECRETS["stripe"][0]
    assert_accepted(client.post("/webhook/stripe", data=body, headers=_stripe_headers(secret, body, stamp)))
    without_prefix = _stripe_headers(secret.removeprefix("whsec_"), body, stamp)
    assert_unauthorized(client.post("/webhook/stripe", data=body, headers=without_prefix))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"webhook-id": "msg_other"}, id="other-id"),
        pytest.param({"webhook-signature": "v1a,AAAA"}, id="other-version"),
        pytest.param({"webhook-signature": "v1,not base64!"}, id="bad-base64"),
        pytest.param({"webhook-signature": "nocomma"}, id="no-comma"),
        pytest.param({"webhook-signature": ""}, id="empty"),
        pytest.param({"webhook-timestamp": "soon"}, id="bad-timestamp"),
        pytest.param({"webhook-id": ""}, id="empty-id"),
    ],
)
def test_standard_webhooks_malformed_headers(sources_app: Flask, change: dict[str, str]) -> None:
    body = b'{"type": "x"}'
    headers = {**_standard_headers(SECRETS["standard-webhooks"][0], body, int(time.time())), **change}
    assert_unauthorized(sources_app.test_client().post("/webhook/standard-webhooks", data=body, headers=headers))


def test_standard_webhooks_accepts_one_good_signature_among_several(sources_app: Flask) -> None:
    body = b'{"type": "x"}'
    headers = _standard_headers(SECRETS["standard-webhooks"][1], body, int(time.time()))
    headers["webhook-signature"] = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= " + headers["webhook-signature"]
    assert_accepted(sources_app.test_client().post("/webhook/standard-webhooks", data=body, headers=headers))


def test_standard_webhooks_redelivery_by_webhook_id(sources_app: Flask) -> None:
    client = sources_app.test_client()
    body = b'{"type": "x"}'
    headers = _standard_headers(SECRETS["standard-webhooks"][0], body, int(time.time()))
    first = assert_accepted(client.post("/webhook/standard-webhooks", data=body, headers=headers))
    again = client.post("/webhook/standard-webhooks", data=body, headers=headers)
    assert again.status_code == 200
    assert again.get_json() == {"status": "duplicate", "id": first}


def test_slack_signature_must_carry_v0_prefix(sources_app: Flask) -> None:
    body = b'{"type": "event_callback"}'
    headers = _slack_headers(SECRETS["slack"][0], body, int(time.time()))
    headers["X-Slack-Signature"] = headers["X-Slack-Signature"].removeprefix("v0=")
    assert_unauthorized(sources_app.test_client().post("/webhook/slack", data=body, headers=headers))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("not base64", id="garbage"),
        pytest.param(hmac.new(b"x", b"{}", hashlib.sha256).hexdigest(), id="hex-not-base64"),
    ],
)
def test_shopify_bad_header(sources_app: Flask, value: str) -> None:
    headers = {"Content-Type": "application/json", "X-Shopify-Hmac-Sha256": value}
    assert_unauthorized(sources_app.test_client().post("/webhook/shopify", data=b"{}", headers=headers))


def test_shopify_hex_digest_of_the_right_key_is_refused(sources_app: Flask) -> None:
    body = b"{}"
    digest = hmac.new(SECRETS["shopify"][0].encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Shopify-Hmac-Sha256": digest}
    assert_unauthorized(sources_app.test_client().post("/webhook/shopify", data=body, headers=headers))


# --------------------------------------------------------------------------- refusal reasons, log only


def _access_reason(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r for r in caplog.records if r.name == "webhook_server.access"]
    assert lines, "no access log line"
    return str(getattr(lines[-1], "reason", None))


REASONS = [
    pytest.param("particle", {}, "no Authorization header", id="bearer-missing"),
    pytest.param("particle", {"Authorization": f"Token {PARTICLE_SECRET}"}, "is not Bearer", id="bearer-scheme"),
    pytest.param("particle", bearer("wrong-secret-0123456789abc"), "wrong bearer token", id="bearer-wrong"),
    pytest.param("generic", {"X-Hub-Signature-256": "md5=abc"}, "is not sha256=<hex digest>", id="hub-format"),
    pytest.param("generic", {"X-Hub-Signature-256": "sha256=" + "0" * 64}, "does not match", id="hub-wrong"),
    pytest.param("generic", {}, "no X-Hub-Signature-256 header", id="hub-missing"),
]


@pytest.mark.parametrize(("source", "headers", "reason"), REASONS)
def test_each_refusal_logs_its_reason_and_the_response_does_not(
    client: FlaskClient, caplog: pytest.LogCaptureFixture, source: str, headers: dict[str, str], reason: str
) -> None:
    path = "/webhook/particle" if source == "particle" else "/webhook"
    with caplog.at_level("INFO", logger="webhook_server.access"):
        response = client.post(path, data=PARTICLE_BODY, headers={"Content-Type": "application/json", **headers})
    assert_unauthorized(response)
    logged = _access_reason(caplog)
    assert reason in logged
    assert PARTICLE_SECRET not in logged and WEBHOOK_SECRET not in logged
    assert reason not in response.get_data(as_text=True)


def test_a_stale_timestamp_and_a_bad_signature_log_different_reasons(
    sources_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"id": uuid.uuid4().hex, "type": "test"}).encode()
    client = sources_app.test_client()
    reasons = {}
    for name, stamp, secret in (
        ("stale", int(time.time()) - 3600, SECRETS["stripe"][0]),
        ("wrong", int(time.time()), "whsec_not-the-right-one-0000000"),
    ):
        with caplog.at_level("INFO", logger="webhook_server.access"):
            assert_unauthorized(client.post("/webhook/stripe", data=body, headers=_stripe_headers(secret, body, stamp)))
        reasons[name] = _access_reason(caplog)
    assert "timestamp" in reasons["stale"]
    assert "does not match" in reasons["wrong"]
    with caplog.at_level("INFO", logger="webhook_server.access"):
        headers = _standard_headers(SECRETS["standard-webhooks"][0], body, int(time.time()) - 3600)
        assert_unauthorized(client.post("/webhook/standard-webhooks", data=body, headers=headers))
    assert "timestamp too old" in _access_reason(caplog)


def test_a_schema_refusal_logs_the_fields_not_their_values(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps(particle_event(coreid="secret-looking-value-xyz")).encode()
    with caplog.at_level("INFO", logger="webhook_server.access"):
        response = client.post("/webhook/particle", data=body, headers={**bearer(), "Content-Type": "application/json"})
    assert response.status_code == 422
    logged = _access_reason(caplog)
    assert logged == "schema violation at /coreid"
