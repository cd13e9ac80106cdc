"""A plain `pip install .` gives a relay that serves its pages: templates and static files ship in
the wheel and are found from the installed package, never from the current directory.

The wheel is built offline (hatchling is in the test extra) from a copy of the checkout, installed
into a directory of its own, and started from a working directory with no checkout in sight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from support import REPO, SECRET

SERVE_FROM_INSTALL = """
import sys
from starlette.testclient import TestClient
from relay_core.config import load_settings
import relay_web
assert relay_web.__file__.startswith(sys.argv[1]), relay_web.__file__
from relay_web.app import create_app
settings = load_settings({"RELAY_SECRET_KEY": sys.argv[2], "RELAY_DATA_DIR": "data"})
with TestClient(create_app(settings)) as client:
    page = client.get("/login")
    assert page.status_code == 200 and "Sign in" in page.text, page.status_code
    for asset in ("app.css", "app.js", "favicon.svg"):
        assert asset in page.text
        response = client.get("/static/" + asset)
        assert response.status_code == 200 and response.content, asset
print("served")
"""


def test_the_wheel_ships_templates_and_static_files_and_serves_them(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "data", "__pycache__", "artifacts",
                                                                ".pytest_cache", ".mypy_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (REPO / "templates").rglob("*"):
        if template.is_file():
            assert f"relay_core/templates/{template.relative_to(REPO / 'templates')}" in names
    for asset in (REPO / "relay_web" / "static").iterdir():
        assert f"relay_web/static/{asset.name}" in names

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(target)
    result = subprocess.run([sys.executable, "-c", SERVE_FROM_INSTALL, str(target), SECRET], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "served" in result.stdout, result.stderr
