"""A Docker engine and compose projects for the container tests.

``Engine.start()`` runs the repository's ``tests/docker/setup.sh``: Debian's
dockerd with host networking only, and a local stand-in for python:3.11-slim
built from Debian's packages (cached between runs). ``Project`` is one
directory holding a copy of the repository, a compose file, an ``.env`` and an
override that puts every service on the host network, bound to 127.0.0.1 on
a free port: the tests only ever talk to 127.0.0.1.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from support import REPO, SECRET, wait_until

SETUP = REPO / "tests" / "docker" / "setup.sh"
GUIDE_FILE = Path(__file__).with_name("guide-compose.yml")  # the operating guide's compose file
CACHE = Path(os.environ.get("TSPRO_DOCKER_CACHE", "/var/cache/tspro-relay-ci"))
RELAY_UID = 10001


@dataclass
class Engine:
    """dockerd for this test session: the cached engine directory, or a private one."""

    directory: Path
    private: bool
    lock: TextIO | None
    env: dict[str, str] = field(default_factory=dict)
    setup_seconds: float = 0.0

    @classmethod
    def start(cls) -> "Engine":
        CACHE.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE / "engine.lock", "w")
        try:
            # The shared engine keeps its images and build cache between runs; a second
            # test session running at the same time gets an engine of its own.
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            engine = cls(CACHE / "e0", private=False, lock=lock)
        except BlockingIOError:
            lock.close()
            engine = cls(Path(tempfile.mkdtemp(prefix="e-", dir=CACHE)), private=True, lock=None)
        started = time.monotonic()
        result = subprocess.run(["bash", str(SETUP), "start", str(engine.directory), sys.executable],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            engine.stop()
            raise AssertionError(f"tests/docker/setup.sh failed ({result.returncode}):\n{result.stderr}")
        engine.setup_seconds = time.monotonic() - started
        line = result.stdout.strip().splitlines()[-1]
        assert line.startswith("DOCKER_HOST="), result.stdout
        engine.env = {**os.environ, "DOCKER_HOST": line.split("=", 1)[1]}
        # Leftovers of a session that was killed would hold ports and restart themselves.
        engine.remove_all_containers()
        return engine

    def docker(self, *args: str, check: bool = True, timeout: float = 300,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def remove_all_containers(self) -> None:
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids)

    def stop(self) -> None:
        if self.env:
            self.remove_all_containers()
            self.docker("image", "prune", "-f", check=False)
        subprocess.run(["bash", str(SETUP), "stop", str(self.directory)], timeout=120)
        if self.private:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self.lock is not None:
            self.lock.close()


def copy_repository(target: Path) -> Path:
    """What a clone of this checkout holds (tracked and new files, nothing git ignores)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (item.decode() for item in listed)):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the working tree
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)
    return target


class Project:
    """A compose project in ``directory``: the given compose file plus a host-network override."""

    def __init__(self, engine: Engine, directory: Path, compose_file: str, override: str,
                 env_file: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.directory = directory
        self.files = [compose_file, "compose.host-network.yml"]
        (directory / "compose.host-network.yml").write_text(override)
        values = env_file or {"RELAY_SECRET_KEY": SECRET, "RELAY_ADMIN_PASSWORD": "admin-pass-123"}
        (directory / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.name = f"relay{os.getpid()}{time.monotonic_ns() % 10**6}"

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        files = [arg for name in self.files for arg in ("-f", name)]
        return self.engine.docker("compose", "-p", self.name, *files, *args, check=check, timeout=timeout,
                                  cwd=self.directory)

    def exec(self, service: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *command, check=check)

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        out = self.compose("ps", "-a", "--format", "json", *([service] if service else [])).stdout
        text = out.strip()
        if not text:
            return []
        if text.startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.engine.docker("inspect", container).stdout)[0]

    def health(self) -> dict[str, str]:
        return {c["Name"]: str(c.get("Health") or c.get("State")) for c in self.containers()}

    def wait_healthy(self, count: int, timeout: float = 60) -> float:
        """Seconds until ``count`` containers report healthy (fails on an exited container)."""
        started = time.monotonic()

        def healthy() -> bool:
            states = self.containers()
            for container in states:
                if container.get("State") in ("exited", "dead"):
                    raise AssertionError(f"{container['Name']} exited:\n{self.logs()}")
            return sum(c.get("Health") == "healthy" for c in states) >= count

        wait_until(healthy, timeout=timeout, interval=0.5, what=f"{count} healthy containers")
        return time.monotonic() - started

    def logs(self) -> str:
        return self.compose("logs", "--no-color", check=False).stdout

    def down(self) -> None:
        self.compose("down", "--timeout", "10", check=False)


def web_override(port: int, fast_health: bool = True) -> str:
    """The repository's compose file on the host network: web on 127.0.0.1:port."""
    health = "    healthcheck: {interval: 2s}\n" if fast_health else ""
    return (
        "services:\n"
        "  web:\n"
        "    network_mode: host\n"
        "    ports: !reset []\n"
        "    build: {network: host}\n"
        f'    command: ["tspro-relay", "web", "--host", "127.0.0.1", "--port", "{port}"]\n'
        f"{health}"
        "  worker:\n"
        "    network_mode: host\n"
        f"{health}"
    )


def guide_override(port: int) -> str:
    """The guide's compose file (tests/docker/guide-compose.yml) on the host network: relay on 127.0.0.1:port."""
    check = ("import urllib.request,sys; sys.exit(0 if urllib.request.urlopen("
             f"'http://127.0.0.1:{port}/healthz',timeout=5).status==200 else 1)")
    return (
        "services:\n"
        "  relay:\n"
        "    network_mode: host\n"
        "    ports: !reset []\n"
        "    build: {network: host}\n"
        f'    command: ["tspro-relay", "run", "--host", "127.0.0.1", "--port", "{port}"]\n'
        "    healthcheck:\n"
        f'      test: ["CMD", "python", "-c", "{check}"]\n'
        "      interval: 2s\n"
    )
