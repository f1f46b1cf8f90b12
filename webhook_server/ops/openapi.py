"""The OpenAPI 3.1 description of the public HTTP endpoints, served at `GET /openapi.json`.

Built here rather than kept as a static file so that it shares the Particle JSON Schema with
the validator (`schemas/particle.json`) and the statuses with the contract in one place. The
tests validate it with openapi-spec-validator and fuzz a real server against it with
schemathesis.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from flask import Blueprint, Response, jsonify

from webhook_server import __version__
from webhook_server.auth import SCHEMES
from webhook_server.errors import STATUSES, WEBHOOK_REFUSALS
from webhook_server.ingest.validators import packaged_schema

bp = Blueprint("openapi", __name__)

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
METRICS_MEDIA_TYPE = "text/plain"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def particle_schema() -> dict[str, Any]:
    """The packaged Particle JSON Schema, without the keywords that only make sense standalone."""
    schema = copy.deepcopy(packaged_schema("particle.json"))
    for key in ("$schema", "$id"):
        schema.pop(key, None)
    # The server also checks that the date exists (parsing.validate): say so, so that clients
    # and generators produce real dates, not just the pattern's digits.
    schema["properties"]["published_at"].setdefault("format", "date-time")
    return schema


def particle_form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Particle's default form-encoded body: the same fields, every value a string."""
    properties = {
        "event": schema["properties"]["event"],
        "data": {"type": "string", "description": "May be empty."},
        "coreid": schema["properties"]["coreid"],
        "published_at": schema["properties"]["published_at"],
        # Optional fields are never refused, whatever their text (see schemas/particle.json).
        "fw_version": {"type": "string", **schema["properties"]["fw_version"]},
        "public": {"type": "string", **schema["properties"]["public"]},
        "userid": {"type": "string", **schema["properties"]["userid"]},
    }
    return {
        "title": "Particle webhook event (form-encoded)",
        "type": "object",
        "required": list(schema["required"]),
        "properties": copy.deepcopy(properties),
        "additionalProperties": {"type": "string"},
    }


GENERIC_DESCRIPTION = (
    "`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`, keyed with WEBHOOK_SECRET."
    " Off (404) unless WEBHOOK_SECRET is set."
)
SOURCE_DESCRIPTION = (
    "Authenticated with the source's scheme (one of the security alternatives), validated"
    " against its schema when it has one. 404 for a name that is not an enabled source."
)
HEALTH_DESCRIPTION = "More fields only when system info is enabled (DISABLE_SYSTEM_INFO=false)."
METRICS_DESCRIPTION = (
    "Prometheus text format. When METRICS_TOKEN is set it is required as a bearer token (401"
    " without it). DISABLE_SYSTEM_INFO=true hides the endpoint (404) unless METRICS_TOKEN is"
    " set and presented."
)
BEARER_DESCRIPTION = (
    "`Authorization: Bearer <secret>`: PARTICLE_WEBHOOK_SECRET, a bearer source's secret, METRICS_TOKEN,"
    " or a SUBSCRIBER_TOKENS token (for the live stream)."
)


def _error_response(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": STATUSES[int(status)].description,
        "content": {JSON: {"schema": _ref("schemas", "SchemaViolation" if status == "422" else "Error")}},
    }
    if status in ("429", "503"):
        response["headers"] = {"Retry-After": _ref("headers", "RetryAfter")}
    if status == "401":
        response["headers"] = {"WWW-Authenticate": _ref("headers", "WWWAuthenticate")}
    return response


def _webhook_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": _ref("responses", "Duplicate"),
        "202": _ref("responses", "Accepted"),
    }
    responses.update({str(status): _ref("responses", f"Error{status}") for status in DOCUMENTED})
    return responses


def _any_json_body(description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {
            JSON: {"schema": {}},
            FORM: {
                "schema": {
                    "type": "object",
                    "description": "GitHub's form option: the JSON document in a `payload` field.",
                    "required": ["payload"],
                    "properties": {"payload": {"type": "string", "contentMediaType": JSON}},
                    "additionalProperties": False,
                }
            },
        },
    }


# Each scheme's security schemes, all required together; a source takes one of the alternatives.
SOURCE_SECURITY: list[dict[str, list[str]]] = [{name: [] for name in scheme.security} for scheme in SCHEMES.values()]
# 405 is described in the document's summary (every POST endpoint answers it with Allow: POST).
DOCUMENTED = tuple(sorted(status for status in WEBHOOK_REFUSALS if status != 405))


def security_schemes() -> dict[str, Any]:
    """Every scheme's entries from the registry; `bearer` also serves METRICS_TOKEN."""
    schemes: dict[str, Any] = {name: entry for scheme in SCHEMES.values() for name, entry in scheme.security.items()}
    schemes["bearer"] = {**schemes["bearer"], "description": BEARER_DESCRIPTION}
    schemes["subscriberToken"] = {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "A SUBSCRIBER_TOKENS token.",
    }
    return schemes


LIVE_DESCRIPTION = (
    "Accepted events of a channel (a source's name, `*` for every channel the token opens, or a comma"
    " list), from the store after the cursor, then live. 404 when SUBSCRIBER_TOKENS is unset."
)
LIVE_PARAMETERS: list[dict[str, Any]] = [
    {"name": "channel", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "since", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    {"name": "raw", "in": "query", "schema": {"enum": ["1"]}},
    {"name": "poll", "in": "query", "schema": {"enum": ["1"]}},
]


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; treat it as read-only)."""
    particle = particle_schema()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "webhook-server",
            "version": __version__,
            "summary": "Self-hosted webhook alert receiver.",
            "description": (
                "Receives Particle and signed webhooks, stores them durably and answers at once; "
                "notifications go out in the background. Every error is JSON "
                '`{"error": "<code>", "message": "<text>"}`. A request that fails several checks '
                "gets the first of 404, 405, 413, 401, 415, 400, 422. Every POST endpoint "
                "answers 405 (with `Allow: POST`) to other methods."
            ),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": {
            "/webhook/particle": {
                "post": {
                    "operationId": "receiveParticle",
                    "summary": "A Particle cloud webhook event",
                    "description": "Off (404) unless PARTICLE_WEBHOOK_SECRET is set.",
                    "tags": ["webhooks"],
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {"schema": _ref("schemas", "ParticleEvent")},
                            FORM: {"schema": _ref("schemas", "ParticleForm")},
                        },
                    },
                    "responses": _webhook_responses(),
                }
            },
            "/webhook": {
                "post": {
                    "operationId": "receiveGeneric",
                    "summary": "A generic signed event (GitHub style)",
                    "description": GENERIC_DESCRIPTION,
                    "tags": ["webhooks"],
                    "security": [{"hubSignature256": []}],
                    "requestBody": _any_json_body("Any JSON document."),
                    "responses": _webhook_responses(),
                }
            },
            "/webhook/{source}": {
                "post": {
                    "operationId": "receiveSource",
                    "summary": "An event for a source declared in SOURCES_FILE",
                    "description": SOURCE_DESCRIPTION,
                    "tags": ["webhooks"],
                    "parameters": [
                        {
                            "name": "source",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"},
                        }
                    ],
                    "security": SOURCE_SECURITY,
                    "requestBody": _any_json_body("Any JSON document, unless the source has a schema."),
                    "responses": _webhook_responses(),
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness",
                    "description": HEALTH_DESCRIPTION,
                    "tags": ["operations"],
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Healthy.",
                            "content": {JSON: {"schema": _ref("schemas", "Health")}},
                        },
                        "503": {
                            "description": "The event store does not answer.",
                            "content": {JSON: {"schema": _ref("schemas", "Health")}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "description": METRICS_DESCRIPTION,
                    "tags": ["operations"],
                    "security": [{}, {"bearer": []}],
                    "responses": {
                        "200": {
                            "description": "Prometheus text format, version 0.0.4.",
                            "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}},
                        },
                        "401": _ref("responses", "Error401"),
                        "404": _ref("responses", "Error404"),
                    },
                }
            },
            "/events/{channel}": {
                "get": {
                    "operationId": "liveEvents",
                    "summary": "The live stream as Server-Sent Events",
                    "description": LIVE_DESCRIPTION,
                    "tags": ["live"],
                    "parameters": LIVE_PARAMETERS,
                    "security": [{"bearer": []}, {"subscriberToken": []}],
                    "responses": {
                        "200": {
                            "description": "`id:`, `event:` (message, reset, overflow) and `data:` lines; comments"
                            " (`: heartbeat`, `: live` once the backlog is sent).",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **{str(status): _ref("responses", f"Error{status}") for status in (400, 401, 403, 404, 503)},
                    },
                }
            },
            "/ws/{channel}": {
                "get": {
                    "operationId": "liveWebSocket",
                    "summary": "The live stream over WebSocket",
                    "description": LIVE_DESCRIPTION + " Answers 101 to a WebSocket upgrade, 426 to a plain GET.",
                    "tags": ["live"],
                    "parameters": LIVE_PARAMETERS,
                    "security": [{"bearer": []}, {"subscriberToken": []}],
                    "responses": {
                        "101": {"description": "Switching to WebSocket: one text message per event (the event JSON)."},
                        "426": {
                            "description": "Not a WebSocket upgrade.",
                            "content": {JSON: {"schema": _ref("schemas", "Error")}},
                        },
                        **{str(status): _ref("responses", f"Error{status}") for status in (400, 401, 403, 404, 503)},
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "tags": ["operations"],
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 document.",
                            "content": {JSON: {"schema": {"type": "object", "required": ["openapi", "paths"]}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": security_schemes(),
            "schemas": {
                "ParticleEvent": particle,
                "ParticleForm": particle_form_schema(particle),
                "Accepted": {
                    "type": "object",
                    "required": ["status", "id"],
                    "properties": {
                        "status": {"const": "accepted"},
                        "id": {
                            "type": "string",
                            "pattern": "^[0-9]+$",
                            "description": "The event id.",
                        },
                    },
                },
                "Duplicate": {
                    "type": "object",
                    "required": ["status", "id"],
                    "properties": {
                        "status": {"const": "duplicate"},
                        "id": {
                            "type": "string",
                            "pattern": "^[0-9]+$",
                            "description": "The first delivery's id.",
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string", "description": "A machine-readable code."},
                        "message": {"type": "string", "description": "Human text."},
                    },
                },
                "SchemaViolation": {
                    "allOf": [
                        _ref("schemas", "Error"),
                        {
                            "type": "object",
                            "required": ["fields"],
                            "properties": {
                                "fields": {
                                    "type": "array",
                                    "items": {
                                        "type": "string",
                                        "description": "A JSON Pointer, such as /coreid.",
                                    },
                                }
                            },
                        },
                    ]
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "timestamp"],
                    "properties": {
                        "status": {"enum": ["healthy", "unhealthy"]},
                        "timestamp": {"type": "string", "format": "date-time"},
                        "version": {"type": "string"},
                        "pid": {"type": "integer"},
                        "uptime_seconds": {"type": "number"},
                        "sources": {"type": "array", "items": {"type": "string"}},
                        "notifications": {"type": "string"},
                        "store": {"enum": ["sqlite"], "description": "Where events, deliveries and the audit live."},
                        "rate_limit_storage": {"type": "string"},
                        "redis": {
                            "enum": ["reachable", "unreachable", "not configured"],
                            "description": "REDIS_URL's state; unreachable degrades rate limits and live fan-out only.",
                        },
                        "events_accepted": {"type": "integer"},
                        "deliveries_pending": {"type": "integer"},
                        "dead_letters": {"type": "integer"},
                    },
                },
            },
            "responses": {
                "Accepted": {
                    "description": "Stored durably; notifications follow in the background.",
                    "content": {JSON: {"schema": _ref("schemas", "Accepted")}},
                },
                "Duplicate": {
                    "description": "A redelivery of an event already accepted.",
                    "content": {JSON: {"schema": _ref("schemas", "Duplicate")}},
                },
                **{f"Error{status}": _error_response(str(status)) for status in DOCUMENTED},
            },
            "headers": {
                "RetryAfter": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 1},
                },
                "WWWAuthenticate": {
                    "description": "The authentication scheme.",
                    "schema": {"type": "string"},
                },
            },
        },
        "tags": [
            {"name": "webhooks", "description": "The ways in."},
            {"name": "operations", "description": "Health, metrics and this document."},
            {"name": "live", "description": "The live stream of accepted events."},
        ],
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(document())
