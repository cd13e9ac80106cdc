"""`tspro-relay run`: web and worker together, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

import captured_logs
from support import SmtpServer, cli, free_port, relay_env, wait_until


def test_run_serves_delivers_and_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data", RELAY_WORKER_THREADS="2")
    port = free_port()
    with SmtpServer("none") as server:
        server.behaviour.delay = 1.0  # a delivery is in flight when Ctrl-C arrives
        cli(env, "config", "set", *server.settings(), cwd=tmp_path)
        key = cli(env, "api-key", "show", cwd=tmp_path).stdout.strip()
        # A new session stands in for the terminal's foreground process group.
        proc = subprocess.Popen([sys.executable, "-m", "relay_cli", "run", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                try:
                    return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, timeout=30, what="the relay to answer")
            response = httpx.post(f"{url}/api/send", headers={"Authorization": f"Bearer {key}"},
                                  json={"from_email": "a@example.org", "to": ["b@example.com"], "subject": "s",
                                        "text": "t"})
            assert response.status_code == 202
            wait_until(lambda: server.handler.attempt_times, what="the delivery to start")
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
            output, _ = proc.communicate(timeout=40)
            captured_logs.keep("tspro-relay run", output.decode(errors="replace"))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 0, output.decode()
        assert len(server.received) == 1  # the in-flight delivery finished before the worker exited
        conn = sqlite3.connect(str(tmp_path / "data" / "relay.db"))
        assert conn.execute("SELECT status FROM messages").fetchall() == [("sent",)]
        conn.close()
    leftovers = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


def test_a_stop_as_soon_as_run_answers_stops_the_worker_it_is_starting(tmp_path: Path) -> None:
    """The worker starts once the web serves; a SIGTERM right then must reach it too (it hung)."""
    env = relay_env(tmp_path / "data")
    cli(env, "config", "show", cwd=tmp_path)  # the first boot, done: this is a restart
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "relay_cli", "run", "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            def answers() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(answers, timeout=30, interval=0.01, what="the relay to answer")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
