"""Throwaway PostgreSQL and Redis servers on loopback, for the tests and the benchmarks.

PostgreSQL comes from Debian's postgresql package: ``initdb`` and ``postgres``
in a temporary directory, on a free 127.0.0.1 port, with fsync on, run as an
unprivileged user (``nobody`` when we are root, as in CI: postgres refuses
to run as root). One cluster serves a whole test session; each test gets a
fresh database in it. Redis is Debian's redis-server with persistence off.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg


# Ports for the servers the tests start, below Linux's ephemeral range (32768-60999): an outgoing
# connection never takes one between its choice and the server's bind. Each pytest-xdist worker
# has a block of its own, so two workers never hand out the same port; a random start keeps two
# sessions on one machine apart too.
PORTS_LOW, PORTS_PER_WORKER, WORKER_BLOCKS = 17000, 1000, 15


def _ports() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3" in a worker, unset otherwise
    block = (int(worker[2:]) + 1) % WORKER_BLOCKS if worker[2:].isdigit() else 0
    first = PORTS_LOW + block * PORTS_PER_WORKER
    offset = random.randrange(PORTS_PER_WORKER)
    return itertools.cycle([*range(first + offset, first + PORTS_PER_WORKER), *range(first, first + offset)])


_port_lock = threading.Lock()
_next_ports: Iterator[int] | None = None


def free_port() -> int:
    """A loopback port that nothing holds now and that this process has not handed out lately."""
    global _next_ports
    with _port_lock:
        if _next_ports is None:
            _next_ports = _ports()
        for _ in range(PORTS_PER_WORKER):
            port = next(_next_ports)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue  # listening, or in TIME_WAIT: the next one
                return port
    raise RuntimeError(f"no free port in this worker's block of {PORTS_PER_WORKER}")


def _wait(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[Any],
          log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {timeout}s:\n{log.read_text(errors='replace')}")


def postgres_bindir() -> Path:
    """Debian's /usr/lib/postgresql/<version>/bin (the newest), where initdb lives."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL's initdb is not installed (apt-get install postgresql; .ci/run does this)")


class PostgresCluster:
    """initdb + postgres in a temporary directory; ``create_database()`` for each test."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "postgres.log"
        self._names = itertools.count(1)
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir), "LC_ALL": "C",
                    "LANG": "C"}

    def start(self) -> "PostgresCluster":
        """initdb (the first time), then run the server until ``halt`` or ``stop``."""
        data = self.dir / "data"
        if not (data / "PG_VERSION").exists():
            subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--locale=C", "--no-instructions"],
                           env=self.env, cwd=self.dir, check=True, capture_output=True, timeout=120,
                           **self._run_as)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.dir),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on", "-c", "synchronous_commit=on",
                 "-c", "max_connections=300", "-c", "shared_buffers=64MB", "-c", "log_min_messages=warning"],
                env=self.env, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, **self._run_as)
        _wait(self._accepts, 60, "postgres", self.proc, self.log)
        return self

    def _accepts(self) -> bool:
        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> tuple[str, str]:
        """A new empty database: its name and URL."""
        name = f"relay_{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0")
        return name, self.url(name)

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def halt(self) -> None:
        """Shut the server down (its data stays; ``start`` brings it back on the same port)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # postgres' "fast" shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does this)")
        self.dir = Path(tempfile.mkdtemp(prefix="relay-redis-"))
        self.port = free_port()
        self.log = self.dir / "redis.log"
        self._databases = itertools.cycle(range(16))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.dir)],
                                         stdout=log, stderr=subprocess.STDOUT)
        _wait(self._pings, 10, "redis-server", self.proc, self.log)

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def fresh_url(self) -> str:
        """The URL of one of the server's 16 databases, emptied: users in turn do not share a queue."""
        number = next(self._databases)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"SELECT {number}\r\nFLUSHDB\r\n".encode())
            answer = b""
            while answer.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
            if answer != b"+OK\r\n+OK\r\n":
                raise RuntimeError(f"redis-server refused FLUSHDB: {answer!r}")
        return f"redis://127.0.0.1:{self.port}/{number}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
