"""Who may subscribe to what: SUBSCRIBER_TOKENS, compared in constant time, and the channels asked.

A token comes as `Authorization: Bearer <token>` or `?token=` (browsers cannot set headers on
WebSocket or EventSource). Only subscriber tokens count: a source's secret never opens a stream.
`*` in the path is literal: every channel the token allows; a comma list names channels.
"""

from __future__ import annotations

import hmac

from werkzeug.exceptions import Forbidden, NotFound

from webhook_server.auth import Headers, bearer_token
from webhook_server.errors import BadCredentials

ALL = "*"
MAX_CHANNELS = 64


def token_of(headers: Headers, query_token: str | None) -> str | None:
    return bearer_token(headers) or (query_token.strip() if query_token and query_token.strip() else None)


def allowed_channels(tokens: dict[str, frozenset[str]], given: str | None) -> frozenset[str]:
    """The channels `given` opens; 401 without a token that is one of `tokens`.

    Every configured token is compared, without stopping at a match, so the time taken says
    nothing about which one matched or how much of it did.
    """
    if not given:
        raise BadCredentials("no subscriber token")
    channels: frozenset[str] = frozenset()
    matched = False
    for token, opens in tokens.items():
        if hmac.compare_digest(given.encode(), token.encode()):
            matched, channels = True, channels | opens
    if not matched:
        raise BadCredentials("not a subscriber token")
    return channels


def resolve(asked: str, allowed: frozenset[str], sources: frozenset[str]) -> frozenset[str]:
    """The sources a path's channel part subscribes to: 404 for an unknown one, 403 for one not allowed."""
    everything = sources if ALL in allowed else allowed & sources
    if asked == ALL:
        if not everything:
            raise Forbidden("This token opens no channel.")
        return everything
    names = [name.strip() for name in asked.split(",")]
    if not names or len(names) > MAX_CHANNELS or any(name not in sources for name in names):
        raise NotFound("No such channel: channels are the names of enabled sources, or *.")
    if any(name not in everything for name in names):
        raise Forbidden("This token does not open that channel.")
    return frozenset(names)
