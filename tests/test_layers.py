"""The packages' layers hold, checked by import-linter (the contracts are in pyproject.toml).

relay_cli starts and administers the relay; relay_web and relay_worker stand
beside each other on relay_core, which imports none of them and has no import
cycle inside. A contract that could not fail would prove nothing, so each is
also broken on purpose, in a copy of the packages, by one planted import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

PACKAGES = ("relay_cli", "relay_core", "relay_web", "relay_worker")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_hold() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("relay_core/config.py", "import relay_web.app",
     "relay_core imports neither relay_web, relay_worker nor relay_cli"),
    ("relay_core/options.py", "from relay_worker import sweeper",
     "relay_core imports neither relay_web, relay_worker nor relay_cli"),
    ("relay_web/api.py", "from relay_worker import sweeper",
     "relay_web and relay_worker do not import each other"),
    ("relay_worker/sweeper.py", "import relay_cli.main",
     "relay_web and relay_worker do not import relay_cli"),
    ("relay_core/options.py", "from . import store",
     "no import cycle inside relay_core"),
])
def test_a_planted_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as planted:
        planted.write(f"\n{line}  # planted by tests/test_layers.py\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = " ".join(result.stdout.split("Broken contracts", 1)[-1].split())
    assert contract in broken, result.stdout
