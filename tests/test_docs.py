"""The README's examples work as written: what a new user copies must run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from flask import Flask

from webhook_server.ingest.send import build_request

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
GITHUB_SECRET = "github-secret-for-the-readme-0123"


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    return README[start : README.index("\n## ", start + 1)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_the_sources_example_in_the_readme_is_the_shipped_file() -> None:
    (toml,) = code_blocks(section("More sources (`SOURCES_FILE`)"), "toml")
    assert toml == (ROOT / "examples" / "sources.toml").read_text(encoding="utf-8")


@pytest.fixture
def github_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(SOURCES_FILE=str(ROOT / "examples" / "sources.toml"), GITHUB_SECRET=GITHUB_SECRET)


def _send(app: Flask, document: object) -> tuple[int, dict[str, object]]:
    request = build_request(app.config["SETTINGS"].sources["github"], "http://localhost", document)
    response = app.test_client().post(
        urlsplit(request.full_url).path, data=request.data, headers=dict(request.header_items())
    )
    return response.status_code, response.get_json()


def test_the_readme_send_command_for_github_is_accepted(github_app: Flask) -> None:
    block = next(b for b in code_blocks(section("More sources (`SOURCES_FILE`)"), "sh") if "send --source" in b)
    line = next(line for line in block.splitlines() if "send --source github" in line)
    document = json.loads(shlex.split(line)[-1])
    status, body = _send(github_app, document)
    assert (status, body["status"]) == (202, "accepted")


def test_the_example_schema_takes_github_ping_and_push_and_refuses_a_body_without_sender(github_app: Flask) -> None:
    ping = {"zen": "Design for failure.", "hook_id": 12, "hook": {"type": "Repository"}, "sender": {"login": "o"}}
    push = {
        "ref": "refs/heads/main",
        "before": "0" * 40,
        "after": "a" * 40,
        "repository": {"full_name": "octo/hello"},
        "pusher": {"name": "o"},
        "sender": {"login": "o"},
    }
    assert _send(github_app, ping)[0] == 202
    assert _send(github_app, push)[0] == 202
    status, body = _send(github_app, {"repository": {"full_name": "octo/hello"}})
    assert (status, body["fields"]) == (422, ["/sender"])


def test_the_readme_config_mount_command_turns_on_the_mount(tmp_path: Path) -> None:
    block = next(b for b in code_blocks(README, "sh") if "./config:/config:ro" in b)
    (sed,) = [line for line in block.splitlines() if line.startswith("sed ")]
    compose = tmp_path / "docker-compose.yml"
    compose.write_text((ROOT / "docker-compose.yml").read_text(encoding="utf-8"), encoding="utf-8")
    subprocess.run(["bash", "-c", re.sub(r"\s+# or uncomment.*$", "", sed)], cwd=tmp_path, check=True)
    services = yaml.safe_load(compose.read_text(encoding="utf-8"))["services"]
    for name in ("web", "worker"):
        assert "./config:/config:ro" in services[name]["volumes"], name
