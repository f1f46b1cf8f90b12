"""The baseline for bench/ingest: a Flask app that only answers 202.

Served by the same Gunicorn config as the receiver (`-c python:webhook_server.gunicorn_conf`), so
the difference between the two is what the receiver does per request, not the server around it:

    python -m gunicorn -c python:webhook_server.gunicorn_conf --bind 127.0.0.1:8001 \\
        --pythonpath bench 'bare_app:create_app()'
"""

from __future__ import annotations

from flask import Flask


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhook/<name>")
    def receive(name: str) -> tuple[str, int]:
        return "", 202

    @app.get("/health")
    def health() -> tuple[str, int]:
        return "", 200

    return app
