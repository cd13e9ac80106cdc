"""Helpers shared by the benchmarks: processes, wrk, the relay's store, RSS."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
SECRET = "bench-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def portal_message(i: int = 0, size: int = 2048) -> dict[str, Any]:
    """A ~2 KB message shaped like the portal's password-reset mail."""
    base = {"from_email": "noreply@example.org", "from_name": "Trusted Servants Portal",
            "to": [f"member{i}@example.com"], "subject": "Reset your password",
            "text": "", "html": None, "reply_to": "help@example.org", "reply_to_name": "Help"}
    filler = len(json.dumps(base))
    base["text"] = ("Hello, follow the link to reset your password. " * 60)[: max(0, size - filler)]
    return base


class Relay:
    """A relay data directory plus its web and worker processes."""

    def __init__(self, workdir: Path | None = None, threads: int = 8, code: Path = HERE.parent, **env: str) -> None:
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        self.env.update({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(self.dir / "data"),
                         "RELAY_ADMIN_PASSWORD": "bench-admin", "RELAY_LOG_LEVEL": "WARNING",
                         "RELAY_WORKER_THREADS": str(threads), **env})
        # Measure this checkout (or ``code``), not whatever copy of the relay the venv has installed.
        self.env["PYTHONPATH"] = os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        self.web: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []
        self.port = free_port()

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "relay_cli", *args], env=self.env, cwd=self.dir,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    @property
    def key(self) -> str:
        return self.cli("api-key", "show")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _log(self, role: str) -> Any:
        """Each process writes its log to a file here, so ``leaks`` can read it afterwards."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{role}-{len(self.log_paths)}.log"
        self.log_paths.append(path)
        return open(path, "wb")

    def start_web(self) -> int:
        with self._log("web") as log:
            self.web = subprocess.Popen([sys.executable, "-m", "relay_cli", "web", "--host", "127.0.0.1",
                                         "--port", str(self.port)], env=self.env, cwd=self.dir, stdout=log,
                                        stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz")
        return serving_pid(self.web.pid)

    def start_worker(self) -> None:
        with self._log("worker") as log:
            self.workers.append(subprocess.Popen([sys.executable, "-m", "relay_cli", "worker"],
                                                 env=self.env, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT))

    def leaks(self, *secrets: str) -> list[str]:
        """Log files of this relay's processes holding any of ``secrets`` (an API key, a password)."""
        return [str(path) for path in self.log_paths
                if path.exists() and any(secret and secret in path.read_text(errors="replace") for secret in secrets)]

    def stop_workers(self) -> None:
        for proc in self.workers:
            stop(proc)
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        if self.web:
            stop(self.web)
            self.web = None

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the store directly: relay.db, or the PostgreSQL database of RELAY_DATABASE_URL."""
        url = self.env.get("RELAY_DATABASE_URL")
        if url:
            import psycopg
            with psycopg.connect(url, autocommit=True) as pg:
                return [tuple(r) for r in pg.execute(sql).fetchall()]  # type: ignore[arg-type]
        conn = sqlite3.connect(str(self.dir / "data" / "relay.db"), timeout=30)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, COUNT(*) FROM messages GROUP BY status"))  # type: ignore[arg-type]

    def finish_span(self) -> tuple[float, float]:
        """When the first and the last message finished."""
        first, last = self.query("SELECT MIN(finished_at), MAX(finished_at) FROM messages")[0]
        return first, last

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def serving_pid(supervisor: int) -> int:
    """The web process that `tspro-relay web` (a supervisor holding the socket) runs now."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == supervisor:
            return int(stat.parent.name)
    raise RuntimeError(f"process {supervisor} runs no web process")


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_sink(port: int, delay: float = 0.0, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(HERE / "sink.py"), str(port), str(delay), *extra],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, body: dict[str, Any], key: str, seconds: int = 10, connections: int = 16,
        threads: int = 2) -> dict[str, float]:
    """POST the same JSON with wrk; requests/s, p50 and p99 in ms, and non-2xx count."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    payload = json.dumps(body).replace("]]", "] ]")
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{payload}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    script.close()
    out = subprocess.run(["wrk", "--latency", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                          "-s", script.name, url], capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rate": rate, "p50": p50, "p99": p99, "non2xx": float(bad.group(1)) if bad else 0.0}


async def post_many(url: str, key: str, count: int, concurrency: int = 16) -> int:
    """Submit ``count`` portal messages; returns how many were accepted."""
    import asyncio

    accepted = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal accepted
        while not queue.empty():
            i = queue.get_nowait()
            response = await http.post("/api/send", json=portal_message(i),
                                       headers={"Authorization": f"Bearer {key}"})
            accepted += response.status_code == 202

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return accepted
