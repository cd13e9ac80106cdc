"""Memory of the containers as `docker stats` shows it: the guide's one container and the two-service
compose file, idle and after 1,000 deliveries; and the guide's container's start-up to its first answer.

    python bench/bench_docker_footprint.py [--deliveries N] [--startup-rounds N]

Uses the tests' Docker engine (tests/docker/setup.sh: Debian's dockerd with host networking and a
local python:3.11-slim built from Debian's packages, cached under /var/cache/tspro-relay-ci) and the
tests' compose overrides, so everything listens on 127.0.0.1. Needs root, docker.io and debootstrap.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import HERE, portal_message

sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "docker")]
from engine import Engine, Project, copy_repository, web_override  # noqa: E402
from support import SmtpServer, free_port, wait_until  # noqa: E402
from test_guide import GUIDE_FILE, guide_override  # noqa: E402


def stats(project: Project) -> str:
    names = [c["Name"] for c in project.containers()]
    out = project.engine.docker("stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *names).stdout
    return "; ".join(line.split(" / ")[0] for line in sorted(out.strip().splitlines()))


def deliver(project: Project, service: str, port: int, smtp: SmtpServer, count: int) -> None:
    project.exec(service, "tspro-relay", "config", "set", "smtp_host=127.0.0.1", f"smtp_port={smtp.port}",
                 "smtp_security=none", "allowed_from=example.org")
    key = project.exec(service, "tspro-relay", "api-key", "show").stdout.strip()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(count):
            assert http.post("/api/send", json=portal_message(i)).status_code == 202
    wait_until(lambda: len(smtp.received) >= count, timeout=300, what=f"{count} deliveries")


def measure(project: Project, service: str, port: int, healthy: int, deliveries: int) -> None:
    project.compose("up", "-d", "--build")
    project.wait_healthy(healthy, timeout=120)
    time.sleep(5)
    print(f"  idle:                      {stats(project)}")
    with SmtpServer("none") as smtp:
        deliver(project, service, port, smtp, deliveries)
    time.sleep(3)
    print(f"  after {deliveries} deliveries: {stats(project)}")


def first_answer(project: Project, port: int, rounds: int) -> None:
    """`docker compose stop`, then from `docker compose start` to the first 200 of /healthz."""
    times = []
    for _ in range(rounds):
        project.compose("stop")
        started = time.monotonic()
        project.compose("start")
        while time.monotonic() - started < 60:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        times.append(time.monotonic() - started)
    print(f"  start-up to the first /healthz answer: median {sorted(times)[len(times) // 2]:.2f} s "
          f"(rounds: {', '.join(f'{t:.2f}' for t in times)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--startup-rounds", type=int, default=5)
    args = parser.parse_args()
    engine = Engine.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            clone = copy_repository(Path(tmp) / "guide")
            (clone / "docker-compose.yml").write_text(GUIDE_FILE.read_text().replace(
                "    image: viibeware/tspro-relay:latest\n", "    build: .\n"))
            port = free_port()
            project = Project(engine, clone, "docker-compose.yml", guide_override(port))
            print("The guide's one container (`tspro-relay run`)")
            try:
                measure(project, "relay", port, 1, args.deliveries)
                first_answer(project, port, args.startup_rounds)
            finally:
                project.down()

            clone = copy_repository(Path(tmp) / "split")
            port = free_port()
            project = Project(engine, clone, "docker-compose.yml", web_override(port))
            print("docker-compose.yml (web + worker)")
            try:
                measure(project, "web", port, 2, args.deliveries)
            finally:
                project.down()
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
