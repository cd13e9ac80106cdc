"""The repository's docker-compose.yml in a real engine, as an operator uses it.

A fresh directory holding a copy of the repository and an `.env`, no ./data:
`docker compose up -d` builds the image and starts the web and a worker;
SMTP is configured with `docker compose exec web tspro-relay config set`; the
portal's sends go through the API to an aiosmtpd server on 127.0.0.1. The
services run on the host network (the engine here has no bridge), which a
small override file arranges; nothing else about the compose file changes.

The tests run in file order on one project: bring-up, a send, scaling to
three workers, and last `docker compose stop` during a slow delivery.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from engine import RELAY_UID, Engine, Project, copy_repository, web_override
from support import SmtpServer, free_port, wait_until

pytestmark = pytest.mark.slow


class Relay:
    def __init__(self, project: Project, port: int, healthy_after: float) -> None:
        self.project = project
        self.url = f"http://127.0.0.1:{port}"
        self.healthy_after = healthy_after
        self.key = project.exec("web", "tspro-relay", "api-key", "show").stdout.strip()
        self.http = httpx.Client(base_url=self.url, timeout=30,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def send(self, to: str, subject: str) -> str:
        response = self.http.post("/api/send", json={"from_email": "noreply@example.org", "to": [to],
                                                     "subject": subject, "text": "hello from a container"})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def answers(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def status(self, message_id: str) -> str:
        return str(self.http.get(f"/api/messages/{message_id}").json()["status"])


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer("none") as server:
        yield server


@pytest.fixture(scope="module")
def relay(engine: Engine, tmp_path_factory: pytest.TempPathFactory, smtp: SmtpServer) -> Iterator[Relay]:
    directory = copy_repository(tmp_path_factory.mktemp("compose"))
    assert not (directory / "data").exists()
    # As on a new host: no image yet, so `up -d` must build it (never try to pull it).
    engine.docker("image", "rm", "--force", "tspro-relay:local", check=False)
    port = free_port()
    # The image's own health-check timing (a first check after 30 s), as an operator gets it.
    project = Project(engine, directory, "docker-compose.yml", web_override(port, fast_health=False))
    try:
        project.compose("up", "-d")  # builds the image, then starts the containers
        healthy_after = project.wait_healthy(2, timeout=60)  # the promise: within a minute
        relay = Relay(project, port, healthy_after)
        yield relay
        relay.http.close()
    finally:
        project.down()


def data_copy(relay: Relay, tmp_path: Path) -> sqlite3.Connection:
    """relay.db as the containers left it, opened from a copy (never leave root's files in ./data)."""
    target = tmp_path / "copy"
    shutil.copytree(relay.project.directory / "data", target)
    return sqlite3.connect(str(target / "relay.db"))


def test_a_fresh_directory_comes_up_healthy_within_a_minute_as_the_relay_user(relay: Relay) -> None:
    print(f"web and worker healthy {relay.healthy_after:.1f} s after `up -d`")
    data = relay.project.directory / "data"
    assert data.stat().st_uid == RELAY_UID  # Docker created it as root; the entrypoint handed it over
    assert {p.stat().st_uid for p in data.iterdir()} == {RELAY_UID}
    for service in ("web", "worker"):
        status = relay.project.exec(service, "cat", "/proc/1/status").stdout
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(RELAY_UID)] * 4, (service, uid_line)
    assert "Traceback" not in relay.project.logs()


def test_each_role_has_its_own_health_check(relay: Relay) -> None:
    for service in ("web", "worker"):
        container = relay.project.containers(service)[0]["Name"]
        health = relay.project.inspect(container)["State"]["Health"]
        assert health["Status"] == "healthy" and health["Log"][-1]["ExitCode"] == 0
    # The worker's check reads its own heartbeat from the store: it passes with the web stopped.
    relay.project.compose("stop", "web")
    try:
        assert relay.project.exec("worker", "tspro-relay", "healthcheck", "--worker").returncode == 0
        assert relay.project.exec("worker", "tspro-relay", "healthcheck", "--auto").returncode == 0
    finally:
        relay.project.compose("start", "web")
        wait_until(relay.answers, timeout=30, what="the web to answer again")


def test_smtp_configured_with_exec_and_a_send_delivered(relay: Relay, smtp: SmtpServer) -> None:
    relay.project.exec("web", "tspro-relay", "config", "set", "smtp_host=127.0.0.1", f"smtp_port={smtp.port}",
                       "smtp_security=none", "retry_base_seconds=1", "retry_max_seconds=2")
    shown = relay.project.exec("web", "tspro-relay", "config", "show").stdout
    assert f"smtp_port = {smtp.port}" in shown
    message_id = relay.send("ann@example.com", "from the container")
    wait_until(lambda: relay.status(message_id) == "sent", timeout=30, what="the send to be delivered")
    assert [r.message["Subject"] for r in smtp.received] == ["from the container"]
    assert smtp.received[0].rcpt_tos == ["ann@example.com"]
    # Files the root `exec` touched still belong to the relay user.
    assert {p.stat().st_uid for p in (relay.project.directory / "data").iterdir()} == {RELAY_UID}


def test_three_workers_deliver_300_messages_exactly_once(relay: Relay, smtp: SmtpServer,
                                                         tmp_path: Path) -> None:
    relay.project.compose("up", "-d", "--scale", "worker=3")
    assert len(relay.project.containers("worker")) == 3
    before = len(smtp.received)
    ids = [relay.send(f"user{i}@example.com", f"burst {i}") for i in range(300)]
    wait_until(lambda: len(smtp.received) - before >= 300, timeout=120, interval=0.2,
               what="300 deliveries")
    wait_until(lambda: all(relay.status(i) == "sent" for i in ids[-5:]), timeout=30, what="the last outcomes")
    time.sleep(2)  # a duplicate would arrive now, if any worker delivered a message twice
    received = [r.message["Message-ID"] for r in smtp.received[before:]]
    assert len(received) == 300
    assert sorted(received) == sorted(f"<{i}@example.org>" for i in ids)
    conn = data_copy(relay, tmp_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM messages WHERE status = 'sent'").fetchone()[0] == 301
        assert conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 3
    finally:
        conn.close()


def test_a_backup_while_running_and_no_restore_while_any_container_runs(relay: Relay) -> None:
    made = relay.project.exec("web", "tspro-relay", "backup", "/data/backup.db")
    assert "Backed up" in made.stdout
    backup = relay.project.directory / "data" / "backup.db"
    assert backup.stat().st_uid == RELAY_UID and backup.stat().st_mode & 0o777 == 0o600
    # The web container is stopped; the three worker containers still hold the data directory.
    relay.project.compose("stop", "web")
    try:
        refused = relay.project.compose("run", "--rm", "--no-deps", "web", "tspro-relay", "restore",
                                        "/data/backup.db", check=False)
        assert refused.returncode == 2
        assert "is using /data/relay.db" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        relay.project.compose("start", "web")
        wait_until(relay.answers, timeout=30, what="the web to answer again")


def test_stop_during_a_slow_delivery_exits_0_with_the_message_recorded(relay: Relay, smtp: SmtpServer,
                                                                       tmp_path: Path) -> None:
    smtp.behaviour.delay = 8.0
    began = len(smtp.handler.attempt_times)
    message_id = relay.send("slow@example.com", "a slow one")
    wait_until(lambda: len(smtp.handler.attempt_times) > began, timeout=30, what="the slow DATA to begin")
    stopped = relay.project.compose("stop", check=False, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    for container in relay.project.containers():
        state = relay.project.inspect(container["Name"])["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), (container["Name"], state)
    assert [r.message["Subject"] for r in smtp.received].count("a slow one") == 1
    conn = data_copy(relay, tmp_path)
    try:
        row = conn.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
        assert row == ("sent",)
        outcome = conn.execute("SELECT status FROM log WHERE message_id = ? AND event = 'attempt'",
                               (message_id,)).fetchall()
        assert outcome == [("sent",)]
    finally:
        conn.close()


def test_restore_with_every_container_stopped(relay: Relay) -> None:
    restored = relay.project.compose("run", "--rm", "--no-deps", "web", "tspro-relay", "restore",
                                     "/data/backup.db")
    assert "Restored /data/relay.db" in restored.stdout
    data = relay.project.directory / "data"
    assert {p.stat().st_uid for p in data.iterdir()} == {RELAY_UID}
    assert list(data.glob("relay.db.pre-restore-*"))
