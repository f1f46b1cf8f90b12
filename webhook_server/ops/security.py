"""Security headers on every response, and which proxies to believe."""

from __future__ import annotations

from flask import Flask, Response, request
from werkzeug.middleware.proxy_fix import ProxyFix

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
HSTS = "max-age=63072000; includeSubDomains"


def add_headers(response: Response) -> Response:
    headers = response.headers
    present = {name.lower() for name, _ in headers}
    # One pass over the few headers there are, not a scan per header (Headers.setdefault).
    headers.extend([(name, value) for name, value in HEADERS.items() if name.lower() not in present])
    if request.is_secure and "strict-transport-security" not in present:
        headers.add("Strict-Transport-Security", HSTS)
    return response


def init_app(app: Flask, trusted_proxies: int) -> None:
    # X-Forwarded-For and -Proto are believed only from the configured number of proxies;
    # without any, a client could claim any address and dodge its rate limit.
    if trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=trusted_proxies, x_proto=trusted_proxies)  # type: ignore[method-assign]
    app.after_request(add_headers)
