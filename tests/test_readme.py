"""The README and docs/ stay true to the code, and every link in them leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay_cli.main import build_parser
from relay_core.options import OPTION_NAMES
from support import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(path: Path, title: str) -> str:
    text = read(path)
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def table_rows(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def anchors(path: Path) -> set[str]:
    """The ids GitHub gives the headings of a Markdown file (lower-cased, punctuation dropped)."""
    found: set[str] = set()
    for line in FENCE.sub("", read(path)).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            candidate, n = slug, 0
            while candidate in found:
                n += 1
                candidate = f"{slug}-{n}"
            found.add(candidate)
    return found


def test_the_docs_point_at_no_document_outside_the_repository() -> None:
    for path in DOCUMENTS:
        assert "ARCHITECTURE" not in read(path), path.name


def test_every_setting_is_in_the_settings_table() -> None:
    rows = table_rows(section(REPO / "docs" / "operating.md", "Settings"))
    named = set(re.findall(r"`([a-z_]+)`", rows))
    assert set(OPTION_NAMES) <= named, sorted(set(OPTION_NAMES) - named)


def test_every_environment_variable_the_relay_reads_is_in_the_environment_table() -> None:
    read_by_config = set(re.findall(r'"(RELAY_[A-Z_]+)"', read(REPO / "relay_core" / "config.py")))
    rows = table_rows(section(REPO / "docs" / "operating.md", "Environment"))
    assert read_by_config and all(name in rows for name in read_by_config), \
        sorted(name for name in read_by_config if name not in rows)


def test_every_command_is_in_the_command_table() -> None:
    table = section(REPO / "docs" / "operating.md", "Command line")
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"tspro-relay {name}" in table or f"/ `{name}`" in table or f"/ {name}" in table, name
    assert "127.0.0.1:8000" in table
    for path in DOCUMENTS:
        assert "0.0.0.0:8000" not in read(path), path.name


def test_the_message_states_table_has_partial() -> None:
    states = section(REPO / "docs" / "api.md", "A message's states")
    assert re.search(r"^\| `partial` \| some recipients accepted it", states, re.MULTILINE)


def test_every_doc_opens_by_saying_who_it_is_for() -> None:
    for path in DOCUMENTS[1:]:
        first_paragraph = read(path).split("\n\n")[1]
        assert first_paragraph.startswith("For "), path.name


def test_the_readme_stays_short() -> None:
    assert len(read(REPO / "README.md").splitlines()) <= 250


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", read(path))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not broken, broken


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section: here\n\n[ok](#a-section-here) [gone](#nowhere) [file](missing.md)\n",
                    encoding="utf-8")
    assert anchors(page) == {"title", "a-section-here"}
    with pytest.raises(AssertionError, match="nowhere.*missing.md"):
        test_every_relative_link_resolves(page)
