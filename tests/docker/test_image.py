"""The image itself: its metadata, its build context, and the data directory it is given."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from engine import RELAY_UID, Engine, copy_repository
from support import SECRET

pytestmark = pytest.mark.slow
TAG = "tspro-relay:image-test"


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    context = copy_repository(tmp_path_factory.mktemp("context"))
    engine.docker("build", "--network", "host", "-t", TAG, str(context), timeout=600)
    return dict(json.loads(engine.docker("image", "inspect", TAG).stdout)[0])


def run(engine: Engine, data: Path, *command: str, check: bool = False) -> Any:
    return engine.docker("run", "--rm", "--network", "host", "-e", f"RELAY_SECRET_KEY={SECRET}",
                         "-v", f"{data}:/data", TAG, *command, check=check, timeout=120)


def test_exec_form_unbuffered_with_a_health_check_and_a_graceful_stop(image: dict[str, Any]) -> None:
    config = image["Config"]
    assert config["Cmd"] == ["tspro-relay", "run", "--host", "0.0.0.0", "--port", "8000"]
    assert config["Entrypoint"] == ["tspro-relay-entrypoint"]
    assert "PYTHONUNBUFFERED=1" in config["Env"] and "RELAY_DATA_DIR=/data" in config["Env"]
    assert config["Healthcheck"]["Test"] == ["CMD", "tspro-relay", "healthcheck", "--auto"]
    assert config["StopSignal"] == "SIGINT"
    assert "8000/tcp" in config["ExposedPorts"]


def test_the_build_context_holds_no_data_secrets_or_history(engine: Engine, tmp_path: Path) -> None:
    context = copy_repository(tmp_path / "clone")
    for name in ("data/relay.db", ".env", ".git/HEAD", ".venv/pyvenv.cfg"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text("must not reach the image\n")
    # A Dockerfile that copies the whole context shows what the context holds.
    (tmp_path / "Dockerfile.probe").write_text("FROM python:3.11-slim\nCOPY . /context\n")
    engine.docker("build", "-q", "-f", str(tmp_path / "Dockerfile.probe"), "-t", "context-probe", str(context))
    listing = engine.docker("run", "--rm", "context-probe", "ls", "-A", "/context").stdout.split()
    engine.docker("rmi", "context-probe")
    assert {"relay_cli", "relay_core", "relay_web", "relay_worker", "pyproject.toml"} <= set(listing)
    assert not {"data", ".env", ".git", ".venv", "tests"} & set(listing), listing


def test_a_root_owned_data_directory_with_a_restored_database_is_handed_over(
        engine: Engine, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    run(engine, data, "tspro-relay", "api-key", "show", check=True)
    # An operator restores a copy as root: every file root's again.
    for path in [data, *data.iterdir()]:
        os.chown(path, 0, 0)
    key = run(engine, data, "api-key", "show", check=True).stdout.strip()  # a bare role means tspro-relay
    assert key.startswith("tsr_")
    assert {p.stat().st_uid for p in [data, *data.iterdir()]} == {RELAY_UID}
    conn = sqlite3.connect(f"file:{data / 'relay.db'}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


def test_a_data_directory_that_cannot_be_handed_over_is_refused_in_one_sentence(
        engine: Engine, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = engine.docker("run", "--rm", "--network", "host", "-e", f"RELAY_SECRET_KEY={SECRET}",
                           "-v", f"{data}:/data:ro", TAG, "worker", check=False, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "chown -R 10001:10001 ./data" in result.stderr and "Traceback" not in result.stderr


def test_as_another_user_an_unwritable_data_directory_is_refused_in_one_sentence(
        engine: Engine, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)  # root's, and not writable by uid 20000
    result = engine.docker("run", "--rm", "--network", "host", "--user", "20000", "-e",
                           f"RELAY_SECRET_KEY={SECRET}", "-v", f"{data}:/data", TAG, "worker",
                           check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot be written by this user (uid 20000)" in result.stderr
    assert "Traceback" not in result.stderr
