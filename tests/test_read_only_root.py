"""A container with `read_only: true` and no tmpfs: the relay runs without a writable /tmp.

The relay is started inside a mount namespace (`unshare -m`, as root) where /tmp and
/var/tmp are read-only and the working directory is too, as in such a container
(whose /app belongs to root); only its data directory and /dev/shm (Docker mounts a
tmpfs there whatever read_only says) can be written. It once crash-looped: "No usable
temporary directory found".
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx

import captured_logs
from support import cli, free_port, relay_env, wait_until

MOUNT = "/mnt"  # where the test's data directory is seen inside the namespace (/tmp is covered)


def read_only(tmp_path: Path, command: list[str]) -> list[str]:
    # /tmp and /var/tmp stay visible but read-only (the checkout and its virtualenv may live under /tmp).
    read_only = " && ".join(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" for d in ("/tmp", "/var/tmp"))
    script = (f"mount --bind {shlex.quote(str(tmp_path))} {MOUNT} && {read_only}"
              f" && cd /var/tmp && exec {shlex.join(command)}")
    return ["unshare", "-m", "sh", "-c", script]


def test_run_and_its_health_checks_work_on_a_read_only_root(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data", RELAY_WORKER_THREADS="1")
    cli(env, "config", "set", "smtp_host=127.0.0.1", "smtp_port=2525", cwd=tmp_path)
    inside = {**env, "RELAY_DATA_DIR": f"{MOUNT}/data"}
    port = free_port()
    proc = subprocess.Popen(read_only(tmp_path, [sys.executable, "-m", "relay_cli", "run", "--host",
                                                 "127.0.0.1", "--port", str(port)]),
                            env=inside, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[0].decode(errors="replace"))
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=30, what="the relay to answer")
        check = [sys.executable, "-m", "relay_cli", "healthcheck", "--worker"]

        def worker_healthy() -> bool:
            return subprocess.run(read_only(tmp_path, check), env=inside, capture_output=True,
                                  timeout=60).returncode == 0

        wait_until(worker_healthy, timeout=30, interval=0.5, what="`healthcheck --worker` to pass")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        captured_logs.keep("tspro-relay run (read-only root)", output.decode(errors="replace"))
    assert "No usable temporary directory" not in output.decode(errors="replace")
