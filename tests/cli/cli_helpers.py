"""What the command-line tests read back from the CLI and the data directory."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

from support import cli

KEY_RE = re.compile(r"tsr_[A-Za-z0-9_-]{43}")


def config_json(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    return json.loads(cli(env, "config", "show", "--json", cwd=cwd).stdout)


def only_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def configured(env: dict[str, str], tmp_path: Path) -> None:
    """SMTP and a default sender set, as `send-test` and the log tests need."""
    cli(env, "config", "set", "smtp_host=127.0.0.1", "smtp_port=2525", "smtp_security=none",
        "default_from=relay@example.org", cwd=tmp_path)
