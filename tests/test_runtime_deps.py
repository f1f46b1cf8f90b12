"""Every third-party module the package imports comes with its runtime dependencies, not only
with the dev tools (`websockets` once was a dev dependency only: `serve` failed in a fresh clone)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "webhook_server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("webhook_server", "__future__")}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def runtime_closure() -> set[str]:
    """The runtime dependencies and everything they require, by distribution name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    todo = [requirement_name(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # an optional one (hiredis) not installed
            continue
        for requirement in requirements:
            if "extra ==" not in requirement or "redis" in requirement:  # limits[redis] is asked for
                todo.append(requirement_name(requirement))
    return seen


def test_every_imported_package_is_a_runtime_dependency() -> None:
    providers = importlib.metadata.packages_distributions()
    closure = runtime_closure()
    missing = {}
    for module in imported_top_levels():
        distributions = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not distributions & closure:
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not a runtime dependency (pyproject.toml [project] dependencies): {missing}"
