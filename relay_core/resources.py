"""Where the shipped templates are: inside the installed package, or the checkout's."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def templates_dir() -> Path:
    """``relay_core/templates`` in a wheel (hatch force-include), else the repository's."""
    for candidate in (_PACKAGE / "templates", _PACKAGE.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the relay's templates directory is missing from this installation")


def read_template(name: str) -> str:
    return (templates_dir() / name).read_text(encoding="utf-8")
