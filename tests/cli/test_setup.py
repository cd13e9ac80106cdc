"""What a new operator meets on the command line (issue 6), run as real subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import captured_logs
from relay_core import __version__
from relay_core.options import OPTION_NAMES
from support import REPO, Relay, cli, free_port, relay_env, wait_until

# Every command and sub-command an operator can ask for help on.
COMMANDS = [("run",), ("web",), ("worker",), ("init",), ("config",), ("config", "show"), ("config", "set"),
            ("api-key",), ("api-key", "show"), ("api-key", "new"), ("api-key", "add"), ("api-key", "list"),
            ("api-key", "set"), ("api-key", "revoke"), ("send-test",), ("admin",), ("admin", "set-password"), ("backup",),
            ("healthcheck",), ("migrate-store",), ("restore",), ("rotate-secret",), ("log",), ("status",), ("pause",), ("resume",)]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return relay_env(tmp_path / "data")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def config_json(env: dict[str, str], cwd: Path) -> dict[str, object]:
    return json.loads(cli(env, "config", "show", "--json", cwd=cwd).stdout)


# -- help and version -----------------------------------------------------------------------------------------
def test_version(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "--version", cwd=tmp_path)
    assert result.stdout.strip() == f"tspro-relay {__version__}"


def test_top_level_help_lists_every_command_and_says_where_dotenv_is_read(env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    text = " ".join(cli(env, "--help", cwd=tmp_path).stdout.split())
    for (name,) in [c for c in COMMANDS if len(c) == 1]:
        assert re.search(rf"\b{name} \w", text), name  # listed with a summary
    assert ".env in the working directory" in text and str(tmp_path / ".env") in text


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_a_description_in_its_help(env: dict[str, str], tmp_path: Path,
                                                     command: tuple[str, ...]) -> None:
    out = cli(env, *command, "--help", cwd=tmp_path).stdout
    paragraphs = out.split("\n\n")
    assert paragraphs[0].startswith("usage: tspro-relay")
    description = paragraphs[1].strip()
    assert description and not description.startswith(("positional", "options")), out
    assert ".env in the working directory" in " ".join(out.split())


@pytest.mark.parametrize("command,defaults", [
    (("run",), ["(default: 127.0.0.1)", "(default: 8000)"]),
    (("web",), ["(default: 127.0.0.1)", "(default: 8000)"]),
    (("log",), ["(default: 50)"]),
    (("init",), ["(default: .env)"]),
    (("healthcheck",), ["(default: http://127.0.0.1:8000/healthz)"]),
])
def test_help_shows_the_defaults(env: dict[str, str], tmp_path: Path, command: tuple[str, ...],
                                 defaults: list[str]) -> None:
    out = " ".join(cli(env, *command, "--help", cwd=tmp_path).stdout.split())
    for default in defaults:
        assert default in out


def test_config_set_help_lists_every_key_with_a_line(env: dict[str, str], tmp_path: Path) -> None:
    lines = cli(env, "config", "set", "--help", cwd=tmp_path).stdout.splitlines()
    for name in OPTION_NAMES:
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert len(line.split()) > 2, line  # the key, then what it means and its default


# -- where it listens -----------------------------------------------------------------------------------------------
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


# -- reading the log and a message without the web process -----------------------------------------------------
def configured(env: dict[str, str], tmp_path: Path) -> None:
    cli(env, "config", "set", "smtp_host=127.0.0.1", "smtp_port=2525", "smtp_security=none",
        "default_from=relay@example.org", cwd=tmp_path)


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


# -- settings the operator types -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["tls", "plain", "", "SSL/TLS", "starttls ssl"])
def test_smtp_security_accepts_only_three_words_and_saves_nothing_else(env: dict[str, str], tmp_path: Path,
                                                                       value: str) -> None:
    cli(env, "config", "set", "smtp_security=ssl", cwd=tmp_path)
    result = cli(env, "config", "set", "smtp_host=mail.example.org", f"smtp_security={value}", cwd=tmp_path,
                 check=False)
    assert result.returncode != 0
    assert "did you mean starttls (port 587) or ssl (port 465)?" in result.stderr
    shown = config_json(env, tmp_path)
    assert (shown["smtp_security"], shown["smtp_host"]) == ("ssl", "")


@pytest.mark.parametrize("value", ["starttls", "ssl", "none", "STARTTLS"])
def test_smtp_security_takes_the_three_modes(env: dict[str, str], tmp_path: Path, value: str) -> None:
    cli(env, "config", "set", f"smtp_security={value}", cwd=tmp_path)
    assert config_json(env, tmp_path)["smtp_security"] == value.lower()


def test_new_settings_are_set_and_checked(env: dict[str, str], tmp_path: Path) -> None:
    shown = config_json(env, tmp_path)
    assert (shown["delivery_paused"], shown["smtp_helo_name"]) == (False, "")
    cli(env, "config", "set", "delivery_paused=true", "smtp_helo_name=relay.example.org", cwd=tmp_path)
    shown = config_json(env, tmp_path)
    assert (shown["delivery_paused"], shown["smtp_helo_name"]) == (True, "relay.example.org")
    for bad in ("192.0.2.1", "[127.0.0.1]", "bad_name.example.org", "-x.example.org", "a..b"):
        result = cli(env, "config", "set", f"smtp_helo_name={bad}", cwd=tmp_path, check=False)
        assert result.returncode != 0 and "host name" in result.stderr
    assert config_json(env, tmp_path)["smtp_helo_name"] == "relay.example.org"


def test_pause_and_resume_commands(env: dict[str, str], tmp_path: Path) -> None:
    assert "paused" in cli(env, "pause", cwd=tmp_path).stdout
    assert config_json(env, tmp_path)["delivery_paused"] is True
    result = cli(env, "resume", cwd=tmp_path)
    assert "resumed" in result.stdout and config_json(env, tmp_path)["delivery_paused"] is False


# -- the data directory --------------------------------------------------------------------------------------------
def private_files(data: Path) -> dict[str, int]:
    return {p.name: mode(p) for p in data.iterdir() if p.name.startswith(("relay.db", "queue.db"))}


def test_a_new_data_directory_is_0700_and_its_databases_0600(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    try:
        relay.configure("smtp_host=127.0.0.1", "smtp_port=2525", "smtp_security=none")
        relay.start_web()
        assert relay.send({"from_email": "a@example.org", "to": ["b@example.com"], "subject": "s",
                           "text": "t"}).status_code == 202
        files = private_files(relay.data_dir)  # while the web runs: -wal and -shm exist too
        assert {"relay.db", "relay.db-wal", "relay.db-shm", "queue.db"} <= set(files)
        assert files == {name: 0o600 for name in files}
        assert mode(relay.data_dir) == 0o700
    finally:
        relay.close()


def test_an_existing_directory_is_left_alone_but_old_files_are_made_private(tmp_path: Path) -> None:
    data = tmp_path / "mine"
    data.mkdir()
    os.chmod(data, 0o755)
    env = relay_env(data)
    cli(env, "config", "show", cwd=tmp_path)
    assert mode(data) == 0o755  # the operator's own directory
    assert private_files(data)["relay.db"] == 0o600
    os.chmod(data / "relay.db", 0o644)  # as an earlier version left it
    (data / "queue.db").touch(mode=0o644)
    os.chmod(data / "queue.db", 0o644)
    configured(env, tmp_path)
    cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path)
    files = private_files(data)
    assert files["relay.db"] == files["queue.db"] == 0o600 and set(files.values()) == {0o600}


# -- error messages -------------------------------------------------------------------------------------------------
def test_the_wrong_secret_error_quotes_the_data_directory(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    cli(env, "config", "show", cwd=tmp_path)
    wrong = {**env, "RELAY_SECRET_KEY": "another-secret-key-0123456789-abcdefghijklmnop"}
    result = cli(wrong, "config", "show", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert f"the data directory '{tmp_path / 'data'}' is encrypted with" in result.stderr


def test_the_missing_secret_error_names_where_dotenv_was_looked_for(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    del env["RELAY_SECRET_KEY"]
    result = cli(env, "config", "show", cwd=tmp_path, check=False)
    assert result.returncode == 2 and str(tmp_path / ".env") in result.stderr


def test_send_test_before_smtp_is_configured_names_the_command(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "tspro-relay config set smtp_host=" in result.stderr
    cli(env, "config", "set", "smtp_host=127.0.0.1", cwd=tmp_path)
    result = cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "tspro-relay config set default_from=" in result.stderr
    with sqlite3.connect(tmp_path / "data" / "relay.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    conn.close()


HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[2J\rFAKE\x9b31m\u202e"


def test_control_characters_are_escaped_in_cli_output(env: dict[str, str], tmp_path: Path) -> None:
    # An unknown JSON field name is written into the log row as sent: printed raw, its ESC, BEL and CR
    # would drive the operator's terminal.
    from relay_core import crypto
    from relay_core.config import load_settings
    from relay_core.store import LogEntry, Store

    configured(env, tmp_path)
    settings = load_settings({k: v for k, v in env.items() if k.startswith("RELAY_")})
    store = Store(settings.db_path, crypto.derive_keys(settings))
    try:
        store.log(LogEntry("accepted", "queued", message_id="01abc", sender=HOSTILE_TEXT, subject=HOSTILE_TEXT,
                           detail="1 recipient(s); ignored unknown field(s): " + HOSTILE_TEXT))
    finally:
        store.close()
    out = cli(env, "log", cwd=tmp_path).stdout
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", out), repr(out)
    assert "\\x1b]0;owned\\x07" in out and len(out.splitlines()) == 1


def test_control_characters_are_escaped_in_log_lines() -> None:
    import logging as stdlib_logging

    from relay_core.logs import JsonFormatter, TextFormatter
    record = stdlib_logging.LogRecord("relay.web", stdlib_logging.INFO, __file__, 1, "field %s\nFORGED LINE",
                                      (HOSTILE_TEXT,), None)
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", line), repr(line)


def test_outside_the_env_folder_the_cli_says_where_it_looked(tmp_path: Path) -> None:
    # Suggesting `tspro-relay init` there would make a second, empty relay beside the real one.
    env = {k: v for k, v in relay_env(tmp_path / "data").items() if k not in ("RELAY_SECRET_KEY", "RELAY_DATA_DIR")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli(env, "config", "show", cwd=elsewhere, check=False)
    assert result.returncode == 2
    assert f"{elsewhere / '.env'} (there is none)" in result.stderr
    assert "run the command from the folder that holds it" in result.stderr
    assert "a second, empty relay" in result.stderr
