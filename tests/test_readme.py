"""The README a new operator follows stays true to the code (issue 6)."""

from __future__ import annotations

import re

from relay_core.cli import build_parser
from relay_core.options import OPTION_NAMES
from support import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_the_readme_points_at_no_document_outside_the_repository() -> None:
    assert "ARCHITECTURE" not in README


def test_every_setting_is_in_the_settings_table() -> None:
    table = section("Connect it to your mail server")
    named = set(re.findall(r"`([a-z_]+)`", "\n".join(line for line in table.splitlines() if line.startswith("|"))))
    assert set(OPTION_NAMES) <= named, sorted(set(OPTION_NAMES) - named)


def test_every_command_is_in_the_command_table() -> None:
    table = section("Command line")
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"tspro-relay {name}" in table or f"/ `{name}`" in table or f"/ {name}" in table, name
    assert "127.0.0.1:8000" in table and "0.0.0.0:8000" not in README


def test_the_message_states_table_has_partial() -> None:
    assert re.search(r"^\| `partial` \| some recipients accepted it", README, re.MULTILINE)
