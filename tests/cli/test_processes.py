"""The relay's processes from the command line: where `web` and `run` listen, a busy port,
`healthcheck`, `backup`, a wrong secret that refuses to start, and reading the log and a message
without the web process (`log`, `status`, `log --follow`). Real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import captured_logs
from relay_core.health import Unhealthy, main_process_role
from cli_helpers import configured, only_line
from support import REPO, RelayProcess, cli, free_port, relay_env, wait_until


# -- where it listens ------------------------------------------------------------------------------
def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_web_listens_on_127_0_0_1_by_default(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "relay_cli", "web", "--port", str(port)], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: listening_addresses(port), timeout=30, what="web to listen") == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_the_container_files_pass_host_0_0_0_0_explicitly() -> None:
    compose = (REPO / "docker-compose.yml").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert '"web", "--host", "0.0.0.0"' in compose
    assert '"--host", "0.0.0.0"' in dockerfile.split("CMD", 1)[1]


@pytest.mark.parametrize("command", ["run", "web"])
def test_a_busy_port_is_refused_before_anything_starts(env: dict[str, str], tmp_path: Path, command: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(env, command, "--port", str(port), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"port {port} is in use; pass --port" in result.stderr
    assert "running on" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # no store opened, so no worker either


# -- backup, healthcheck, a wrong secret -----------------------------------------------------------
def test_backup_is_a_sqlite_copy_with_the_messages(env: dict[str, str], tmp_path: Path) -> None:
    cli(env, "config", "set", "smtp_host=127.0.0.1", "default_from=relay@example.org", cwd=tmp_path)
    message_id = only_line(cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path).stdout)
    cli(env, "backup", "backup.db", cwd=tmp_path)
    backup = tmp_path / "backup.db"
    assert backup.read_bytes()[:16] == b"SQLite format 3\x00"
    conn = sqlite3.connect(backup)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"messages", "recipients", "settings", "api_keys", "log"} <= tables
        assert [r[0] for r in conn.execute("SELECT id FROM messages")] == [message_id]
    finally:
        conn.close()
    # A second backup to the same file is refused, the first one kept.
    before = backup.read_bytes()
    result = cli(env, "backup", "backup.db", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "already exists" in result.stderr
    assert backup.read_bytes() == before


def test_healthcheck_fails_when_nothing_answers(env: dict[str, str], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    result = cli(env, "healthcheck", "--url", url, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert url in only_line(result.stderr) and "Traceback" not in result.stderr


def test_healthcheck_worker_reads_this_workers_heartbeat_and_needs_no_web(env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    result = cli(env, "healthcheck", "--worker", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "there is no store at" in only_line(result.stderr)
    cli(env, "config", "show", cwd=tmp_path)
    result = cli(env, "healthcheck", "--worker", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "no worker has reported" in only_line(result.stderr)
    worker = RelayProcess("worker", env, tmp_path).start()
    db = tmp_path / "data" / "relay.db"
    try:
        wait_until(lambda: cli(env, "healthcheck", "--worker", cwd=tmp_path, check=False).returncode == 0,
                   timeout=30, what="the worker's first heartbeat")
        # Another container's worker on the same store reports; this one hangs.
        conn = sqlite3.connect(db, timeout=30)
        with conn:
            conn.execute("INSERT INTO workers (name, pid, host, started_at, heartbeat_at)"
                         " VALUES ('elsewhere:1:abc', 1, 'elsewhere', ?, ?)", (time.time(), time.time()))
        worker.signal(signal.SIGSTOP)
        try:
            with conn:
                conn.execute("UPDATE workers SET heartbeat_at = heartbeat_at - 120 WHERE host != 'elsewhere'")
            result = cli(env, "healthcheck", "--worker", cwd=tmp_path, check=False)
            assert result.returncode == 1
            assert "has not reported in the last 60 seconds" in only_line(result.stderr)
        finally:
            worker.signal(signal.SIGCONT)
        conn.close()
    finally:
        assert worker.stop() == 0
    # With no worker of this store running here, any worker's heartbeat answers.
    assert cli(env, "healthcheck", "--worker", cwd=tmp_path, check=False).returncode == 0


@pytest.mark.parametrize("cmdline,expected", [
    (["/usr/bin/python3", "/usr/local/bin/tspro-relay", "worker"], ("worker", 8000)),
    (["tspro-relay", "web", "--host", "0.0.0.0", "--port", "8123"], ("web", 8123)),
    (["python", "-m", "relay_cli", "run", "--port=9000"], ("run", 9000)),
    (["tini", "--", "tspro-relay", "run"], ("run", 8000)),
])
def test_healthcheck_auto_reads_the_role_of_the_main_process(cmdline: list[str],
                                                             expected: tuple[str, int]) -> None:
    assert main_process_role(cmdline) == expected


def test_healthcheck_auto_refuses_a_process_that_is_not_the_relay() -> None:
    with pytest.raises(Unhealthy, match="not a relay process"):
        main_process_role(["/bin/sh", "-c", "sleep 1"])



def test_a_different_secret_key_refuses_to_start_and_the_old_one_rescues(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    original = cli(env, "api-key", "show", cwd=tmp_path).stdout.strip()
    wrong = {**env, "RELAY_SECRET_KEY": "a-completely-different-secret-key-0123456789"}
    result = cli(wrong, "config", "show", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "not the key the data directory" in result.stderr and result.stderr.count("\n") == 1
    rotated = {**wrong, "RELAY_SECRET_KEY_OLD": env["RELAY_SECRET_KEY"]}
    assert cli(rotated, "api-key", "show", cwd=tmp_path).stdout.strip() == original


# -- reading the log and a message without the web process -----------------------------------------
def test_log_and_status_read_the_store_directly(env: dict[str, str], tmp_path: Path) -> None:
    configured(env, tmp_path)
    first = cli(env, "send-test", "--to", "ann@example.com", cwd=tmp_path).stdout.strip()
    second = cli(env, "send-test", "--to", "bob@example.com", cwd=tmp_path).stdout.strip()
    lines = cli(env, "log", cwd=tmp_path).stdout.splitlines()
    assert len(lines) == 2 and first in lines[0] and second in lines[1]  # oldest first
    assert "queued" in lines[0] and "ann@example.com" in lines[0] and "TS Pro Relay test email" in lines[0]
    assert cli(env, "log", "--limit", "1", cwd=tmp_path).stdout.splitlines() == lines[1:]
    assert cli(env, "log", "--status", "sent", cwd=tmp_path).stdout == ""
    assert len(cli(env, "log", "--status", "queued", cwd=tmp_path).stdout.splitlines()) == 2

    text = cli(env, "status", first, cwd=tmp_path).stdout
    assert f"id            {first}" in text and "status        queued" in text
    assert "ann@example.com (to)  pending" in text
    view = json.loads(cli(env, "status", first, "--json", cwd=tmp_path).stdout)
    assert view["id"] == first and view["recipients"][0]["address"] == "ann@example.com"
    missing = cli(env, "status", "0000nope", cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "0000nope" in missing.stderr and missing.stdout == ""
    refused = cli(env, "log", "--status", "bogus", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_log_follow_prints_new_rows_until_ctrl_c(env: dict[str, str], tmp_path: Path, signum: int) -> None:
    configured(env, tmp_path)
    cli(env, "send-test", "--to", "ann@example.com", cwd=tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "relay_cli", "log", "--follow", "--interval", "0.2"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "ann@example.com" in proc.stdout.readline()
        later = cli(env, "send-test", "--to", "later@example.com", cwd=tmp_path).stdout.strip()
        line = proc.stdout.readline()  # blocks until the follower prints it (the test's timeout bounds it)
        assert later in line and "later@example.com" in line
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        captured_logs.keep("tspro-relay log --follow", err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err


@pytest.mark.parametrize("args", [("config", "show"), ("log",), ("api-key", "list"), ("--help",)])
def test_a_closed_stdout_never_prints_a_traceback(env: dict[str, str], tmp_path: Path,
                                                  args: tuple[str, ...]) -> None:
    configured(env, tmp_path)
    for i in range(3):
        cli(env, "send-test", "--to", f"m{i}@example.com", cwd=tmp_path)
    # The reader is gone before the command writes a byte: what `| head -0` does.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "relay_cli", *args], env=env, cwd=tmp_path,
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr
