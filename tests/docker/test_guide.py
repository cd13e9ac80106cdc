"""The user guide's own compose file (Part 1.2), built from source as the guide says.

The file is kept verbatim in guide-compose.yml; "Building from source
instead?" says to clone the repository and replace the `image:` line with
`build: .`, and that is the only change made to it. A host-network override
(this engine has no bridge) moves the port to a free one on 127.0.0.1 and
points the guide's python-urllib health check there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from engine import GUIDE_FILE, RELAY_UID, Engine, Project, copy_repository, guide_override
from support import SECRET, SmtpServer, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def guide_project(engine: Engine, tmp_path: Path) -> Iterator[tuple[Project, int]]:
    clone = copy_repository(tmp_path / "tspro-relay")
    text = GUIDE_FILE.read_text()
    assert "    image: viibeware/tspro-relay:latest\n" in text
    (clone / "docker-compose.yml").write_text(text.replace("    image: viibeware/tspro-relay:latest\n",
                                                           "    build: .\n"))
    port = free_port()
    # The guide's .env: the secret and the first-boot admin login.
    project = Project(engine, clone, "docker-compose.yml", guide_override(port),
                      env_file={"RELAY_SECRET_KEY": SECRET, "RELAY_ADMIN_USER": "admin",
                                "RELAY_ADMIN_PASSWORD": "change-me-on-first-login"})
    try:
        yield project, port
    finally:
        project.down()


def test_the_guides_single_container_comes_up_and_delivers(guide_project: tuple[Project, int]) -> None:
    project, port = guide_project
    assert not (project.directory / "data").exists()
    project.compose("up", "-d", "--build")
    project.wait_healthy(1, timeout=60)
    assert (project.directory / "data" / "relay.db").stat().st_uid == RELAY_UID
    # The image's own check, for this container's `run` (web and worker): both must answer.
    assert project.exec("relay", "tspro-relay", "healthcheck", "--auto").returncode == 0
    assert "Traceback" not in project.logs()

    with SmtpServer("none") as smtp:
        project.exec("relay", "tspro-relay", "config", "set", "smtp_host=127.0.0.1", f"smtp_port={smtp.port}",
                     "smtp_security=none")
        key = project.exec("relay", "tspro-relay", "api-key", "show").stdout.strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            answer = http.post("/api/send", json={"from_email": "noreply@example.org", "from_name": "",
                                                  "to": ["ann@example.com"], "subject": "guide setup",
                                                  "text": "sent through the guide's container"})
            assert answer.status_code == 202, answer.text
            message_id = answer.json()["id"]
            wait_until(lambda: http.get(f"/api/messages/{message_id}").json()["status"] == "sent",
                       timeout=30, what="the guide's container to deliver")
            health = http.get("/api/health").json()
            assert health["worker_alive"] is True
        assert [r.message["Subject"] for r in smtp.received] == ["guide setup"]

    # Stopped as `docker compose down` would: both processes end cleanly.
    stopped = project.compose("stop", check=False, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    container = project.containers("relay")[0]["Name"]
    assert project.inspect(container)["State"]["ExitCode"] == 0
