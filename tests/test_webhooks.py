"""The ways in, through the Flask test client: parsing, validation, errors, limits, headers.

Authentication itself is in test_auth.py; here it is the step that must pass (or fail) in
the contract's order: 404, 405, 413, 401, 415, 400, 422.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.conftest import CORE_ID, assert_accepted, assert_error, bearer, particle_event, signed_headers
from webhook_server.ingest.events import EVENT_HEADERS

pytestmark = pytest.mark.usefixtures("each_store")

FORM = "application/x-www-form-urlencoded"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
HSTS = "Strict-Transport-Security"


def post_particle_json(client: FlaskClient, document: Any, **headers: str) -> TestResponse:
    return client.post(
        "/webhook/particle",
        data=json.dumps(document),
        headers={**bearer(), "Content-Type": "application/json", **headers},
    )


def post_particle_form(client: FlaskClient, fields: dict[str, str] | str | bytes) -> TestResponse:
    body = fields if isinstance(fields, str | bytes) else urlencode(fields)
    return client.post("/webhook/particle", data=body, headers={**bearer(), "Content-Type": FORM})


def post_generic(client: FlaskClient, body: bytes, **extra: str) -> TestResponse:
    return client.post("/webhook", data=body, headers=signed_headers(body, **extra))


def particle_form_fields(**fields: Any) -> dict[str, str]:
    """Particle's default body: every field it sends, as form text."""
    event = particle_event(fw_version="3", public="false", userid="5f1a2b3c4d5e6f7a8b9c0d1e")
    event.update(fields)
    return {k: v for k, v in event.items() if v is not ...}


# --------------------------------------------------------------------------- Particle


def test_particle_form_body_with_every_field_is_accepted(client: FlaskClient) -> None:
    assert_accepted(post_particle_form(client, particle_form_fields()))


def test_particle_json_body_is_accepted(client: FlaskClient) -> None:
    assert_accepted(post_particle_json(client, particle_event()))


def test_particle_json_option_sends_every_value_as_a_string(client: FlaskClient) -> None:
    document = particle_event(fw_version="3", public="true", userid="someone")
    assert_accepted(post_particle_json(client, document))


@pytest.mark.parametrize("encoding", ["form", "json"])
@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"data": ""}, id="data-empty"),
        pytest.param({"data": ...}, id="data-missing"),
        pytest.param({"coreid": "api"}, id="coreid-api"),
        pytest.param({"coreid": CORE_ID.upper()}, id="coreid-uppercase-hex"),
        pytest.param({"published_at": "2026-11-23T18:02:11Z"}, id="published-at-no-fraction"),
        pytest.param({"published_at": "2026-11-23T19:02:11.5+01:00"}, id="published-at-offset"),
        pytest.param({"event": "e" * 64}, id="event-64-chars"),
        pytest.param({"data": "ünïcödé ✓ \U0001f6a8"}, id="data-unicode"),
    ],
)
def test_particle_accepts_valid_variants(client: FlaskClient, encoding: str, fields: dict[str, Any]) -> None:
    if encoding == "form":
        assert_accepted(post_particle_form(client, particle_form_fields(**fields)))
    else:
        assert_accepted(post_particle_json(client, particle_event(**fields)))


# Bodies Particle really sends: its console's test event, dotted firmware versions, `public` as
# text or a JSON boolean, and whatever a user's JSON template adds. None may be refused.
PARTICLE_OPTIONAL_FIELDS = [
    pytest.param({"fw_version": ""}, id="fw-version-empty"),
    pytest.param({"fw_version": "3.3.1"}, id="fw-version-dotted"),
    pytest.param({"fw_version": "6.2.0-rc.1"}, id="fw-version-prerelease"),
    pytest.param({"fw_version": ...}, id="fw-version-absent"),
    pytest.param({"public": "true"}, id="public-text-true"),
    pytest.param({"public": "maybe"}, id="public-other-text"),
    pytest.param({"userid": "u" * 300}, id="userid-long"),
    pytest.param({"coreid": "api", "fw_version": "", "data": "null"}, id="console-test-event"),
    pytest.param({"my_template_field": "{{{SOME_VAR}}}", "zone": "3"}, id="template-extras"),
]


@pytest.mark.parametrize("fields", PARTICLE_OPTIONAL_FIELDS)
def test_particle_form_optional_fields_never_refuse(client: FlaskClient, fields: dict[str, Any]) -> None:
    assert_accepted(post_particle_form(client, particle_form_fields(**fields)))


@pytest.mark.parametrize(
    "fields",
    [
        *PARTICLE_OPTIONAL_FIELDS,
        pytest.param({"public": True}, id="public-boolean-true"),
        pytest.param({"public": False}, id="public-boolean-false"),
        pytest.param({"fw_version": 42}, id="fw-version-number"),
        pytest.param({"fw_version": None, "public": None, "userid": None}, id="optional-null"),
        pytest.param({"extra": {"nested": [1, 2, {"deep": True}]}}, id="template-nested-object"),
    ],
)
def test_particle_json_optional_fields_never_refuse(client: FlaskClient, fields: dict[str, Any]) -> None:
    assert_accepted(post_particle_json(client, particle_event(**fields)))


def test_particle_openapi_form_schema_accepts_what_the_server_accepts(client: FlaskClient) -> None:
    """The published form schema must not promise refusals the server does not make."""
    from jsonschema import Draft202012Validator

    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["ParticleForm"]
    validator = Draft202012Validator(schema)
    for fields in ({"fw_version": ""}, {"fw_version": "3.3.1"}, {"public": "maybe"}, {"coreid": "api"}):
        assert list(validator.iter_errors(particle_form_fields(**fields))) == [], fields


def test_particle_json_data_may_be_null(client: FlaskClient) -> None:
    assert_accepted(post_particle_json(client, particle_event(data=None)))


BAD_COREIDS = [
    pytest.param("0123456789abcdef0123456", id="23-chars"),
    pytest.param("0123456789abcdef012345678", id="25-chars"),
    pytest.param("0123456789abcdefg1234567", id="non-hex"),
    pytest.param("", id="empty"),
    pytest.param("API", id="api-uppercase"),
    pytest.param("api ", id="api-trailing-space"),
    pytest.param(" " + CORE_ID, id="leading-space"),
    pytest.param(CORE_ID + "\n", id="trailing-newline"),
]


@pytest.mark.parametrize("coreid", BAD_COREIDS)
@pytest.mark.parametrize("encoding", ["form", "json"])
def test_particle_bad_coreid_is_422_naming_coreid(client: FlaskClient, encoding: str, coreid: str) -> None:
    if encoding == "form":
        response = post_particle_form(client, particle_form_fields(coreid=coreid))
    else:
        response = post_particle_json(client, particle_event(coreid=coreid))
    body = assert_error(response, 422)
    assert body["fields"] == ["/coreid"]


@pytest.mark.parametrize("coreid", [123, None, ["api"], {"id": CORE_ID}, True])
def test_particle_coreid_of_the_wrong_type_is_422(client: FlaskClient, coreid: Any) -> None:
    body = assert_error(post_particle_json(client, particle_event(coreid=coreid)), 422)
    assert body["fields"] == ["/coreid"]


@pytest.mark.parametrize("encoding", ["form", "json"])
def test_particle_missing_event_is_422_with_exactly_that_field(client: FlaskClient, encoding: str) -> None:
    if encoding == "form":
        response = post_particle_form(client, particle_form_fields(event=...))
    else:
        response = post_particle_json(client, particle_event(event=...))
    assert assert_error(response, 422)["fields"] == ["/event"]


@pytest.mark.parametrize(
    ("fields", "pointers"),
    [
        pytest.param({"event": ""}, ["/event"], id="event-empty"),
        pytest.param({"event": "e" * 65}, ["/event"], id="event-too-long"),
        pytest.param({"event": 7}, ["/event"], id="event-number"),
        pytest.param({"published_at": ...}, ["/published_at"], id="published-at-missing"),
        pytest.param({"coreid": ...}, ["/coreid"], id="coreid-missing"),
        pytest.param(
            {"event": ..., "coreid": ..., "published_at": ...},
            ["/coreid", "/event", "/published_at"],
            id="all-missing",
        ),
        pytest.param({"event": "", "coreid": "xyz"}, ["/coreid", "/event"], id="two-bad"),
    ],
)
def test_particle_schema_violations_list_every_failing_field(
    client: FlaskClient, fields: dict[str, Any], pointers: list[str]
) -> None:
    body = assert_error(post_particle_json(client, particle_event(**fields)), 422)
    assert sorted(body["fields"]) == pointers


BAD_PUBLISHED_AT = [
    pytest.param("yesterday", id="words"),
    pytest.param("", id="empty"),
    pytest.param("2026-11-23", id="date-only"),
    pytest.param("18:02:11", id="time-only"),
    pytest.param("2026-11-23 18:02:11Z", id="space-separator"),
    pytest.param("2026-11-23T18:02:11", id="no-zone"),
    pytest.param("1764000000", id="epoch-seconds"),
    pytest.param("2026-13-45T18:02:11Z", id="month-13"),
    pytest.param("2026-02-30T18:02:11Z", id="february-30"),
    pytest.param("2026-11-23T24:61:11Z", id="hour-24"),
]


@pytest.mark.parametrize("published_at", BAD_PUBLISHED_AT)
@pytest.mark.parametrize("encoding", ["form", "json"])
def test_particle_bad_published_at_is_422(client: FlaskClient, encoding: str, published_at: str) -> None:
    if encoding == "form":
        response = post_particle_form(client, particle_form_fields(published_at=published_at))
    else:
        response = post_particle_json(client, particle_event(published_at=published_at))
    assert assert_error(response, 422)["fields"] == ["/published_at"]


@pytest.mark.parametrize("published_at", [1764000000, None, True, ["2026-11-23T18:02:11Z"]])
def test_particle_published_at_of_the_wrong_type_is_422(client: FlaskClient, published_at: Any) -> None:
    body = assert_error(post_particle_json(client, particle_event(published_at=published_at)), 422)
    assert body["fields"] == ["/published_at"]


def test_particle_redelivery_is_200_duplicate_with_the_first_id(client: FlaskClient) -> None:
    first = assert_accepted(post_particle_json(client, particle_event()))
    again = post_particle_json(client, particle_event())
    assert again.status_code == 200
    assert again.get_json() == {"status": "duplicate", "id": first}


def test_particle_redelivery_is_recognised_across_encodings_and_key_order(client: FlaskClient) -> None:
    first = assert_accepted(post_particle_form(client, particle_form_fields()))
    reordered = dict(reversed(list(particle_event().items())))
    assert list(reordered) != list(particle_event())
    again = post_particle_json(client, reordered)
    assert again.status_code == 200
    assert again.get_json() == {"status": "duplicate", "id": first}
    # ... and the other way round, with Particle's extra fields left out.
    json_first = assert_accepted(post_particle_json(client, particle_event(data="back door")))
    form_again = post_particle_form(client, particle_form_fields(data="back door"))
    assert form_again.status_code == 200
    assert form_again.get_json() == {"status": "duplicate", "id": json_first}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"data": "back door"}, id="data"),
        pytest.param({"event": "door"}, id="event"),
        pytest.param({"coreid": "fedcba9876543210fedcba98"}, id="coreid"),
        pytest.param({"published_at": "2026-11-23T18:02:12.000Z"}, id="published-at"),
    ],
)
def test_particle_event_that_differs_in_one_field_is_new(client: FlaskClient, change: dict[str, str]) -> None:
    first = assert_accepted(post_particle_json(client, particle_event()))
    second = assert_accepted(post_particle_json(client, particle_event(**change)))
    assert second != first


def test_particle_empty_null_and_missing_data_are_one_event(client: FlaskClient) -> None:
    first = assert_accepted(post_particle_json(client, particle_event(data="")))
    for data in (None, ...):
        response = post_particle_json(client, particle_event(data=data))
        assert response.get_json() == {"status": "duplicate", "id": first}


def test_event_ids_are_digit_strings_that_increase(client: FlaskClient) -> None:
    ids = [assert_accepted(post_particle_json(client, particle_event(data=f"n{i}"))) for i in range(5)]
    ids.append(assert_accepted(post_generic(client, b'{"event": "push"}')))
    numbers = [int(i) for i in ids]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


# --------------------------------------------------------------------------- generic


def test_generic_signed_json_is_accepted(client: FlaskClient) -> None:
    assert_accepted(post_generic(client, b'{"event": "deploy", "ok": true}'))


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.github+json"],
)
def test_generic_json_media_types(client: FlaskClient, content_type: str) -> None:
    body = b'{"event": "deploy"}'
    assert_accepted(post_generic(client, body, **{"Content-Type": content_type}))


def test_generic_redelivery_by_github_delivery_id(client: FlaskClient) -> None:
    body = b'{"zen": "Keep it logically awesome."}'
    delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    first = assert_accepted(post_generic(client, body, **{"X-GitHub-Delivery": delivery}))
    again = post_generic(client, body, **{"X-GitHub-Delivery": delivery})
    assert again.status_code == 200
    assert again.get_json() == {"status": "duplicate", "id": first}
    other = post_generic(client, body, **{"X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0959"})
    assert assert_accepted(other) != first


def test_generic_without_delivery_id_is_never_a_duplicate(client: FlaskClient) -> None:
    body = b'{"event": "tick"}'
    assert assert_accepted(post_generic(client, body)) != assert_accepted(post_generic(client, body))


def test_generic_github_form_option_is_accepted(client: FlaskClient) -> None:
    body = urlencode({"payload": json.dumps({"zen": "Design for failure.", "hook_id": 1})}).encode()
    response = post_generic(client, body, **{"Content-Type": FORM, "X-GitHub-Event": "ping"})
    assert_accepted(response)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(urlencode({"payload": "{not json"}).encode(), id="payload-not-json"),
        pytest.param(urlencode({"data": "{}"}).encode(), id="no-payload-field"),
        pytest.param(urlencode({"payload": "{}", "extra": "1"}).encode(), id="extra-field"),
        pytest.param(b"payload=%7B%7D&payload=%7B%7D", id="payload-twice"),
        pytest.param(b"", id="empty"),
    ],
)
def test_generic_bad_form_bodies_are_400(client: FlaskClient, body: bytes) -> None:
    assert_error(post_generic(client, body, **{"Content-Type": FORM}), 400)


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"true", b"[1, 2]"])
def test_generic_top_level_non_object_is_422(client: FlaskClient, body: bytes) -> None:
    assert assert_error(post_generic(client, body), 422)["fields"] == [""]


# --------------------------------------------------------------------------- error order


def test_unknown_source_is_404_for_every_method(client: FlaskClient) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "FOO"):
        assert_error(client.open("/webhook/nope", method=method), 404)
    assert client.head("/webhook/nope").status_code == 404


def test_unknown_path_is_json_404(client: FlaskClient) -> None:
    assert_error(client.get("/no/such/page"), 404)


def test_generic_is_not_reachable_by_its_name(client: FlaskClient) -> None:
    body = b"{}"
    response = client.post("/webhook/generic", data=body, headers=signed_headers(body))
    assert_error(response, 404)


@pytest.mark.parametrize("path", ["/webhook/particle", "/webhook"])
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "FOO"])
def test_other_methods_on_an_enabled_source_are_405(client: FlaskClient, path: str, method: str) -> None:
    response = client.open(path, method=method, headers=bearer())
    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        pytest.param({"PARTICLE_WEBHOOK_SECRET": None}, "/webhook/particle", id="particle-off"),
        pytest.param({"WEBHOOK_SECRET": None}, "/webhook", id="generic-off"),
    ],
)
def test_disabled_builtin_source_is_404(make_app: Callable[..., Flask], overrides: dict[str, Any], path: str) -> None:
    client = make_app(**overrides).test_client()
    body = json.dumps(particle_event()).encode()
    headers = {**bearer(), **signed_headers(body)}
    assert_error(client.post(path, data=body, headers=headers), 404)
    assert_error(client.get(path), 404)


GOOD_PARTICLE = json.dumps(particle_event()).encode()
SCHEMA_BAD_PARTICLE = json.dumps(particle_event(coreid="nope")).encode()
GOOD_GENERIC = b'{"event": "x"}'


def _particle(client: FlaskClient, body: bytes, auth: bool, content_type: str | None) -> TestResponse:
    headers = bearer() if auth else bearer("wrong-secret-0123456789")
    if content_type:
        headers["Content-Type"] = content_type
    return client.post("/webhook/particle", data=body, headers=headers)


def _generic(client: FlaskClient, body: bytes, auth: bool, content_type: str | None) -> TestResponse:
    headers = signed_headers(body) if auth else signed_headers(body, secret="wrong-secret-0123456789")
    if content_type:
        headers["Content-Type"] = content_type
    else:
        del headers["Content-Type"]
    return client.post("/webhook", data=body, headers=headers)


# (good credentials?, content type, body, expected status): each row fails the checks after
# the expected one too, so a wrong order shows up as the wrong status.
ORDER = [
    pytest.param(False, "text/plain", b"{nope", 401, id="bad-creds+bad-type+malformed"),
    pytest.param(False, "application/json", b"{nope", 401, id="bad-creds+malformed"),
    pytest.param(False, "application/json", b"[]", 401, id="bad-creds+schema"),
    pytest.param(False, None, b"", 401, id="bad-creds+no-type+empty"),
    pytest.param(True, "text/plain", b"{nope", 415, id="bad-type+malformed"),
    pytest.param(True, None, b"{nope", 415, id="no-type+malformed"),
    pytest.param(True, "multipart/form-data; boundary=x", b"{nope", 415, id="multipart"),
    pytest.param(True, "application/jsonx", b"{}", 415, id="not-quite-json"),
    pytest.param(True, "application/json", b"{nope", 400, id="malformed"),
    pytest.param(True, "application/json", b"", 400, id="empty"),
    pytest.param(True, "application/json", b"[]", 422, id="schema"),
]


@pytest.mark.parametrize(("auth", "content_type", "body", "status"), ORDER)
@pytest.mark.parametrize("post", [_particle, _generic], ids=["particle", "generic"])
def test_error_order(
    client: FlaskClient,
    post: Callable[[FlaskClient, bytes, bool, str | None], TestResponse],
    auth: bool,
    content_type: str | None,
    body: bytes,
    status: int,
) -> None:
    assert_error(post(client, body, auth, content_type), status)


def test_particle_schema_violation_with_good_credentials_is_422(client: FlaskClient) -> None:
    assert_error(_particle(client, SCHEMA_BAD_PARTICLE, True, "application/json"), 422)


def test_every_401_body_is_the_same(client: FlaskClient) -> None:
    bodies = {
        _particle(client, body, False, ctype).get_data()
        for body, ctype in [(GOOD_PARTICLE, "application/json"), (b"{nope", "text/plain"), (b"", None)]
    }
    bodies |= {_generic(client, GOOD_GENERIC, False, "application/json").get_data()}
    assert len(bodies) == 1


def test_oversize_without_credentials_is_413(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_PAYLOAD_BYTES="100").test_client()
    big = b"{" + b" " * 200 + b"}"
    assert_error(client.post("/webhook/particle", data=big, content_type="text/plain"), 413)
    assert_error(client.post("/webhook", data=big), 413)
    # ... but 404 and 405 come first.
    assert_error(client.open("/webhook/nope", method="POST", data=big), 404)
    assert_error(client.open("/webhook/particle", method="PUT", data=big), 405)


def test_oversize_is_refused_from_content_length_without_reading(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_PAYLOAD_BYTES="100").test_client()

    class Unreadable(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise AssertionError("the body was read")

    response = client.post(
        "/webhook/particle",
        input_stream=Unreadable(),
        headers={**bearer(), "Content-Type": "application/json"},
        environ_overrides={"CONTENT_LENGTH": "101"},
    )
    assert_error(response, 413)


def _body_of_length(length: int) -> bytes:
    """A valid Particle JSON body of exactly `length` bytes."""
    base = json.dumps(particle_event(data="")).encode()
    body = json.dumps(particle_event(data="x" * (length - len(base)))).encode()
    assert len(body) == length
    return body


def _chunked(client: FlaskClient, body: bytes | io.BytesIO) -> TestResponse:
    """As a server hands on a chunked request: no Content-Length, the stream ends at the end."""
    return client.post(
        "/webhook/particle",
        input_stream=body if isinstance(body, io.BytesIO) else io.BytesIO(body),
        headers={**bearer(), "Content-Type": "application/json"},
        environ_overrides={"wsgi.input_terminated": True},
    )


LIMIT = 300


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_exactly_at_the_limit_is_accepted(make_app: Callable[..., Flask], chunked: bool) -> None:
    client = make_app(MAX_PAYLOAD_BYTES=str(LIMIT)).test_client()
    body = _body_of_length(LIMIT)
    if chunked:
        response = _chunked(client, body)
    else:
        response = client.post("/webhook/particle", data=body, headers={**bearer(), "Content-Type": "application/json"})
    assert_accepted(response)


@pytest.mark.parametrize("extra", [1, 10_000])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(make_app: Callable[..., Flask], chunked: bool, extra: int) -> None:
    client = make_app(MAX_PAYLOAD_BYTES=str(LIMIT)).test_client()
    body = _body_of_length(LIMIT + extra)
    if chunked:
        response = _chunked(client, body)
    else:
        response = client.post("/webhook/particle", data=body, headers={**bearer(), "Content-Type": "application/json"})
    assert_error(response, 413)


def test_chunked_body_over_the_limit_without_credentials_is_413(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_PAYLOAD_BYTES=str(LIMIT)).test_client()
    response = client.post(
        "/webhook/particle",
        input_stream=io.BytesIO(b"x" * (LIMIT + 1)),
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_error(response, 413)


def test_chunked_body_is_read_whole_from_a_stream_that_returns_short_reads(make_app: Callable[..., Flask]) -> None:
    class Trickle(io.BytesIO):
        """Hands out at most 7 bytes per read, as a socket may."""

        def read(self, size: int | None = -1) -> bytes:
            return super().read(7 if size is None or size < 0 else min(7, size))

    client = make_app(MAX_PAYLOAD_BYTES=str(LIMIT)).test_client()
    assert_accepted(_chunked(client, Trickle(_body_of_length(LIMIT))))
    assert_error(_chunked(client, Trickle(_body_of_length(LIMIT + 1))), 413)


# --------------------------------------------------------------------------- hostile bodies


def _deep(opening: str, closing: str, depth: int, inner: str = "1") -> bytes:
    return (opening * depth + inner + closing * depth).encode()


HOSTILE_JSON = [
    pytest.param(random.Random(7).randbytes(2048), 400, id="random-bytes"),
    pytest.param(b'{"event": "\xff\xfe", "x": 1}', 400, id="invalid-utf8"),
    pytest.param(b'{"event": "motion", "data": "\\ud800"}', 400, id="lone-surrogate"),
    pytest.param(b'{"event": "motion", "\\udfff": "x"}', 400, id="lone-surrogate-key"),
    pytest.param(b'{"event": "mo\\u0000tion"}', 400, id="nul-in-string"),
    pytest.param(_deep("[", "]", 10_000), 400, id="deep-arrays"),
    pytest.param(_deep('{"a":', "}", 10_000), 400, id="deep-objects"),
    pytest.param(_deep("[", "]", 100), 400, id="100-deep-arrays"),
    pytest.param(b'{"event": "x", "n": NaN}', 400, id="nan"),
    pytest.param(b'{"event": "x", "n": Infinity}', 400, id="infinity"),
    pytest.param(b'{"event": "x", "n": -Infinity}', 400, id="minus-infinity"),
    pytest.param(b'{"event": "x", "n": 1e999}', 400, id="1e999"),
    pytest.param(b'{"event": "x", "n": -1e999}', 400, id="minus-1e999"),
    pytest.param(b'{"event": "x", "n": ' + b"9" * 5001 + b"}", 400, id="5000-digit-int"),
    pytest.param(b"", 400, id="empty"),
    pytest.param(b"   \n", 400, id="whitespace"),
    pytest.param(b'{"event": "x"} trailing', 400, id="trailing-garbage"),
    pytest.param(b'\xef\xbb\xbf{"event": "x"}', 400, id="utf8-bom"),
    pytest.param(b'{"event": "x",}', 400, id="trailing-comma"),
    pytest.param(b"{'event': 'x'}", 400, id="single-quotes"),
    pytest.param(b'\x00{"event": "x"}', 400, id="leading-nul"),
    pytest.param('{"event": "x"}'.encode("utf-16"), 400, id="utf-16"),
    pytest.param(b"[]", 422, id="top-level-array"),
    pytest.param(b"42", 422, id="top-level-number"),
    pytest.param(b'"motion"', 422, id="top-level-string"),
    pytest.param(b"null", 422, id="top-level-null"),
]


@pytest.mark.parametrize(("body", "status"), HOSTILE_JSON)
def test_hostile_json_to_particle(client: FlaskClient, body: bytes, status: int) -> None:
    response = client.post("/webhook/particle", data=body, headers={**bearer(), "Content-Type": "application/json"})
    assert_error(response, status)


@pytest.mark.parametrize(("body", "status"), HOSTILE_JSON)
def test_hostile_json_to_generic(client: FlaskClient, body: bytes, status: int) -> None:
    assert_error(post_generic(client, body), status)


def test_big_but_finite_numbers_and_deep_enough_json_are_accepted(client: FlaskClient) -> None:
    document = {"event": "x", "big": 10**4000, "float": 1.7976931348623157e308, "tiny": 1e-999}
    document["nest"] = json.loads(_deep("[", "]", 60))
    assert_accepted(post_generic(client, json.dumps(document).encode()))


def _form(**fields: str) -> bytes:
    return urlencode(particle_form_fields(**fields)).encode()


HOSTILE_FORMS = [
    pytest.param(_form() + b"&event=other", 400, id="duplicate-event"),
    pytest.param(_form() + b"&data=again", 400, id="duplicate-data"),
    pytest.param(_form() + b"&" + b"&".join(b"f%d=v" % i for i in range(10_000)), 400, id="10000-fields"),
    pytest.param(_form(data="\x00"), 400, id="nul-in-value"),
    pytest.param(_form() + b"&na%00me=x", 400, id="nul-in-name"),
    pytest.param(_form() + b"&x=%ff%fe", 400, id="invalid-utf8-escape"),
    pytest.param(_form() + b"&x=\xff", 400, id="invalid-utf8-raw"),
    pytest.param(_form() + b"&novalue", 400, id="field-without-equals"),
    pytest.param(random.Random(9).randbytes(1024), 400, id="random-bytes"),
    pytest.param(b"", 422, id="empty"),
    pytest.param(b"event=x&coreid=api", 422, id="missing-published-at"),
    pytest.param(_form() + b"&x=%ED%A0%80", 400, id="encoded-lone-surrogate"),
    pytest.param(_form(data="\U0001f6a8 siren"), 202, id="emoji-data"),
]


@pytest.mark.parametrize(("body", "status"), HOSTILE_FORMS)
def test_hostile_form_bodies_to_particle(client: FlaskClient, body: bytes, status: int) -> None:
    response = client.post("/webhook/particle", data=body, headers={**bearer(), "Content-Type": FORM})
    if status == 202:
        assert_accepted(response)
    else:
        assert_error(response, status)


def test_hostile_bodies_leave_the_server_working(client: FlaskClient) -> None:
    for param in [*HOSTILE_JSON, *HOSTILE_FORMS]:
        body = param.values[0]
        for content_type in ("application/json", FORM):
            response = client.post("/webhook/particle", data=body, headers={**bearer(), "Content-Type": content_type})
            assert response.status_code < 500
    assert_accepted(post_particle_json(client, particle_event(data="still alive")))


# --------------------------------------------------------------------------- SOURCES_FILE limits


def _sources_app(make_app: Callable[..., Flask], tmp_path: Path, toml: str, **overrides: Any) -> Flask:
    path = tmp_path / "sources.toml"
    path.write_text(toml, encoding="utf-8")
    return make_app(SOURCES_FILE=str(path), HOOK_SECRET="hook-secret-0123456789", **overrides)


def _bearer_source(extra: str) -> str:
    return f'[sources.hook]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n{extra}\n'


HOOK_AUTH = {"Authorization": "Bearer hook-secret-0123456789"}


def test_allow_list_refuses_other_addresses_with_403(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = _sources_app(make_app, tmp_path, _bearer_source('allow = ["10.0.0.0/8", "192.0.2.7"]'))
    client = app.test_client()
    assert_error(client.post("/webhook/hook", json={"a": 1}, headers=HOOK_AUTH), 403)
    # 403 needs no body and no credentials: it comes before 413 and 401.
    assert_error(client.post("/webhook/hook", data=b"x" * 5_000_000), 403)
    for address in ("10.1.2.3", "192.0.2.7"):
        response = client.post("/webhook/hook", json={"a": 1}, headers=HOOK_AUTH, environ_base={"REMOTE_ADDR": address})
        assert_accepted(response)
    assert_error(
        client.post("/webhook/hook", json={"a": 1}, headers=HOOK_AUTH, environ_base={"REMOTE_ADDR": "192.0.2.8"}),
        403,
    )


@pytest.mark.parametrize(("proxies", "status"), [("1", 202), ("0", 403)])
def test_allow_list_sees_x_forwarded_for_only_behind_trusted_proxies(
    make_app: Callable[..., Flask], tmp_path: Path, proxies: str, status: int
) -> None:
    app = _sources_app(make_app, tmp_path, _bearer_source('allow = ["10.0.0.0/8"]'), TRUSTED_PROXIES=proxies)
    response = app.test_client().post(
        "/webhook/hook", json={"a": 1}, headers={**HOOK_AUTH, "X-Forwarded-For": "10.9.8.7"}
    )
    if status == 202:
        assert_accepted(response)
    else:
        assert_error(response, status)


def test_trusted_proxy_count_takes_the_right_hop(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = _sources_app(make_app, tmp_path, _bearer_source('allow = ["10.0.0.0/8"]'), TRUSTED_PROXIES="1")
    client = app.test_client()
    # The client forged the first entry; the one proxy we trust appended the real address.
    spoofed = client.post("/webhook/hook", json={}, headers={**HOOK_AUTH, "X-Forwarded-For": "10.0.0.1, 203.0.113.9"})
    assert_error(spoofed, 403)


def test_source_rate_limit(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = _sources_app(make_app, tmp_path, _bearer_source('rate_limit = "2/minute"'))
    client = app.test_client()
    for _ in range(2):
        assert_accepted(client.post("/webhook/hook", json={"a": 1}, headers=HOOK_AUTH))
    response = client.post("/webhook/hook", json={"a": 1}, headers=HOOK_AUTH)
    assert_error(response, 429)
    assert int(response.headers["Retry-After"]) >= 1
    # Particle keeps the global limit (1000/second in tests).
    assert_accepted(post_particle_json(client, particle_event()))


def test_source_max_payload_bytes(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = _sources_app(make_app, tmp_path, _bearer_source("max_payload_bytes = 64"))
    client = app.test_client()
    assert_accepted(
        client.post(
            "/webhook/hook",
            data=b'{"a": "' + b"x" * 55 + b'"}',
            headers={**HOOK_AUTH, "Content-Type": "application/json"},
        )
    )
    assert_error(client.post("/webhook/hook", json={"a": "x" * 56}), 413)
    assert_error(client.post("/webhook/hook", json={"a": "x" * 56}, headers=HOOK_AUTH), 413)
    # The global limit still applies to the others.
    assert_accepted(post_particle_json(client, particle_event(data="x" * 100)))


def test_source_schema_file(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "required": ["level", "site"],
        "properties": {
            "level": {"enum": ["low", "high"]},
            "site": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "hook.json").write_text(json.dumps(schema), encoding="utf-8")
    app = _sources_app(make_app, tmp_path, _bearer_source('schema = "schemas/hook.json"'))
    client = app.test_client()
    assert_accepted(client.post("/webhook/hook", json={"level": "high", "site": "A"}, headers=HOOK_AUTH))
    body = assert_error(client.post("/webhook/hook", json={"level": "medium"}, headers=HOOK_AUTH), 422)
    assert body["fields"] == ["/level", "/site"]
    body = assert_error(
        client.post("/webhook/hook", json={"level": "low", "site": "A", "tags": ["a", 2]}, headers=HOOK_AUTH), 422
    )
    assert body["fields"] == ["/tags/1"]
    # Credentials first: a schema violation without them is 401.
    assert_error(client.post("/webhook/hook", json={"level": "medium"}), 401)


def test_schema_pattern_dollar_is_the_end_of_the_text(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    """JSON Schema's `$` (ECMA-262) does not match before a final newline, as Python's does."""
    schema = {"type": "object", "properties": {"site": {"type": "string", "pattern": "^[a-z]+$"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema), encoding="utf-8")
    client = _sources_app(make_app, tmp_path, _bearer_source('schema = "s.json"')).test_client()
    assert_accepted(client.post("/webhook/hook", json={"site": "abc"}, headers=HOOK_AUTH))
    for bad in ("abc\n", "abc\nd", "ab1"):
        assert assert_error(client.post("/webhook/hook", json={"site": bad}, headers=HOOK_AUTH), 422)["fields"] == [
            "/site"
        ]


def test_schema_pointer_escapes_slash_and_tilde(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"a/b": {"type": "string"}, "c~d": {"type": "string"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema), encoding="utf-8")
    app = _sources_app(make_app, tmp_path, _bearer_source('schema = "s.json"'))
    body = assert_error(app.test_client().post("/webhook/hook", json={"a/b": 1, "c~d": 2}, headers=HOOK_AUTH), 422)
    assert body["fields"] == ["/a~1b", "/c~0d"]


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_fourth_post_is_429_with_retry_after(make_app: Callable[..., Flask]) -> None:
    client = make_app(RATE_LIMIT="3/minute").test_client()
    for i in range(3):
        assert_accepted(post_particle_json(client, particle_event(data=f"n{i}")))
    response = post_particle_json(client, particle_event(data="n3"))
    assert_error(response, 429)
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 61
    for header, value in SECURITY_HEADERS.items():
        assert response.headers[header] == value


def test_rate_limit_never_applies_to_health(make_app: Callable[..., Flask]) -> None:
    client = make_app(RATE_LIMIT="3/minute").test_client()
    for _ in range(4):
        post_particle_json(client, particle_event())
    for _ in range(10):
        assert client.get("/health").status_code == 200


def test_rate_limit_counts_sources_separately(make_app: Callable[..., Flask]) -> None:
    client = make_app(RATE_LIMIT="3/minute").test_client()
    for i in range(3):
        assert_accepted(post_particle_json(client, particle_event(data=f"n{i}")))
    assert_error(post_particle_json(client, particle_event()), 429)
    for i in range(3):
        assert_accepted(post_generic(client, b'{"n": %d}' % i))
    assert_error(post_generic(client, b"{}"), 429)


def test_rate_limit_counts_client_addresses_separately(make_app: Callable[..., Flask]) -> None:
    client = make_app(RATE_LIMIT="2/minute").test_client()

    def post(address: str) -> TestResponse:
        return client.post(
            "/webhook/particle",
            json=particle_event(),
            headers=bearer(),
            environ_base={"REMOTE_ADDR": address},
        )

    assert [post("192.0.2.1").status_code for _ in range(3)] == [202, 200, 429]
    assert post("192.0.2.2").status_code == 200


def test_rate_limit_does_not_count_404_and_405(make_app: Callable[..., Flask]) -> None:
    client = make_app(RATE_LIMIT="2/minute").test_client()
    for _ in range(5):
        client.get("/webhook/particle")
        client.post("/webhook/nope")
    assert_accepted(post_particle_json(client, particle_event()))


@pytest.mark.parametrize(("proxies", "limited"), [("1", False), ("0", True)])
def test_rate_limit_key_uses_x_forwarded_for_only_behind_trusted_proxies(
    make_app: Callable[..., Flask], proxies: str, limited: bool
) -> None:
    client = make_app(RATE_LIMIT="1/minute", TRUSTED_PROXIES=proxies).test_client()
    statuses = [
        client.post(
            "/webhook/particle", json=particle_event(), headers={**bearer(), "X-Forwarded-For": f"198.51.100.{i}"}
        ).status_code
        for i in range(3)
    ]
    assert statuses == ([202, 429, 429] if limited else [202, 200, 200])


# --------------------------------------------------------------------------- security headers


def _assert_security_headers(response: TestResponse, https: bool = False) -> None:
    for header, value in SECURITY_HEADERS.items():
        assert response.headers.get(header) == value, header
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert (HSTS in response.headers) is https
    if https:
        assert "max-age=" in response.headers[HSTS]


def _responses(client: FlaskClient) -> dict[str, TestResponse]:
    return {
        "202": post_particle_json(client, particle_event()),
        "200": post_particle_json(client, particle_event()),
        "401": client.post("/webhook/particle", json=particle_event()),
        "404": client.get("/webhook/nope"),
        "404-path": client.get("/nothing/here"),
        "405": client.get("/webhook/particle"),
        "415": client.post("/webhook/particle", data="x", headers={**bearer(), "Content-Type": "text/plain"}),
        "400": client.post("/webhook/particle", data="{", headers={**bearer(), "Content-Type": "application/json"}),
        "422": post_particle_json(client, {}),
        "health": client.get("/health"),
    }


def test_security_headers_on_every_response_over_http(client: FlaskClient) -> None:
    for name, response in _responses(client).items():
        assert response.status_code < 500, name
        _assert_security_headers(response, https=False)


def test_hsts_only_over_https(client: FlaskClient) -> None:
    https = "https://localhost"
    for response in (
        client.get("/health", base_url=https),
        client.get("/webhook/nope", base_url=https),
        client.post("/webhook/particle", json=particle_event(), headers=bearer(), base_url=https),
        client.post("/webhook/particle", json=particle_event(), base_url=https),
    ):
        _assert_security_headers(response, https=True)
    _assert_security_headers(client.get("/health"), https=False)


def test_security_headers_on_413_and_429(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_PAYLOAD_BYTES="10", RATE_LIMIT="1/minute").test_client()
    too_large = client.post("/webhook/particle", data=b"x" * 11)
    assert too_large.status_code == 413
    _assert_security_headers(too_large)
    limited = client.post("/webhook/particle", data=b"x" * 11)
    assert limited.status_code == 429
    _assert_security_headers(limited)


@pytest.mark.parametrize(("proxies", "https"), [("1", True), ("0", False)])
def test_forwarded_proto_believed_only_behind_trusted_proxies(
    make_app: Callable[..., Flask], proxies: str, https: bool
) -> None:
    client = make_app(TRUSTED_PROXIES=proxies).test_client()
    response = client.get("/health", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"})
    _assert_security_headers(response, https=https)


# --------------------------------------------------------------------------- /health


def _assert_utc_timestamp(text: str) -> None:
    assert text.endswith(("Z", "+00:00"))
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60


def test_health_shows_detail_by_default(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["status"] == "healthy"
    _assert_utc_timestamp(body["timestamp"])
    assert set(body) > {"status", "timestamp"}
    assert body["sources"] == ["generic", "particle"]


def test_health_counts_accepted_events(client: FlaskClient) -> None:
    post_particle_json(client, particle_event())
    assert client.get("/health").get_json()["events_accepted"] == 1


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on"])
def test_health_without_system_info_is_status_and_timestamp_only(make_app: Callable[..., Flask], value: str) -> None:
    response = make_app(DISABLE_SYSTEM_INFO=value).test_client().get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"status", "timestamp"}
    assert body["status"] == "healthy"
    _assert_utc_timestamp(body["timestamp"])


def test_health_rejects_other_methods_as_json(client: FlaskClient) -> None:
    assert_error(client.post("/health"), 405)


def test_a_store_that_cannot_write_is_503_with_retry_after(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    import psycopg

    from webhook_server.store.base import EventStore

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(EventStore, "insert_event", broken)
    response = post_particle_json(client, particle_event())
    monkeypatch.setattr(EventStore, "insert_event", gone)
    assert_error(post_particle_json(client, particle_event(data="2")), 503, "unavailable")
    body = assert_error(response, 503, "unavailable")
    assert response.headers["Retry-After"] == "5"
    assert "disk" not in body["message"]


def test_a_senders_event_header_names_the_event_for_shopify_and_gitlab_too(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    for header, name in (("X-Shopify-Topic", "orders/create"), ("X-Gitlab-Event", "Push Hook")):
        body = b'{"type": "from-the-body"}'
        headers = signed_headers(body, **{header: name, "Content-Type": "application/json"})
        event_id = assert_accepted(client.post("/webhook", data=body, headers=headers))
        with client.application.app_context():
            stored = client.application.extensions["webhook_store"].get_event(event_id)
        assert stored is not None and stored.event == name
    assert EVENT_HEADERS[0] == "X-GitHub-Event"
