"""The settings table is the one list of settings: the README, `.env.example` and `init` follow it."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner
from dotenv import dotenv_values

from webhook_server.cli import main
from webhook_server.settings import SETTINGS, load_settings

ROOT = Path(__file__).resolve().parent.parent


def readme_settings_table() -> dict[str, str]:
    """NAME -> its default cell, from the README's configuration table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Configuration") : text.index("\n### ", text.index("\n## Configuration"))]
    return {m[1]: m[2] for m in re.finditer(r"^\| `([A-Z][A-Z0-9_]*)` \| ([^|]*) \|", section, flags=re.M)}


def shown(default: object) -> str:
    """A default as the README writes it: 60 for 60.0, ./data for Path("./data")."""
    if isinstance(default, float):
        return f"{default:g}"
    return f"./{default}" if isinstance(default, Path) else str(default)


def test_the_readme_table_lists_exactly_the_settings_table() -> None:
    assert sorted(readme_settings_table()) == sorted(setting.name for setting in SETTINGS)


def test_the_readme_shows_each_simple_default() -> None:
    table = readme_settings_table()
    for setting in SETTINGS:
        if isinstance(setting.default, str | int | float | Path) and not isinstance(setting.default, bool):
            assert shown(setting.default) in table[setting.name], setting.name
        elif isinstance(setting.default, bool):
            assert str(setting.default).lower() in table[setting.name], setting.name


def test_every_setting_has_help_and_a_parser_message() -> None:
    for setting in SETTINGS:
        assert setting.help and not setting.help.endswith("."), setting.name
        assert setting.parse is None or setting.parse is Path or setting.expects, setting.name


def test_init_writes_every_init_setting_and_the_result_loads(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    assert CliRunner().invoke(main, ["init", "--path", str(path)]).exit_code == 0
    written = dotenv_values(path)
    for setting in SETTINGS:
        if setting.init in ("secret", "value"):
            assert written.get(setting.name), setting.name
        if setting.init == "value":
            assert written[setting.name] == (setting.example or str(setting.default)), setting.name
        if setting.init == "comment":
            assert setting.name not in written and f"# {setting.name}=" in path.read_text(), setting.name
    settings = load_settings({k: v for k, v in written.items() if v is not None})
    assert set(settings.sources) == {"particle", "generic"}
    assert settings.flask_secret_key == written["FLASK_SECRET_KEY"]
