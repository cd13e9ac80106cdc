"""Setting the relay up from the command line, as a new operator does: help and version, `init` and
the secret, `.env`, the data directory's permissions, and the errors met before anything runs.
Real subprocesses and a real data directory.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest

from relay_core import __version__, crypto
from relay_core.config import load_settings, read_dotenv
from relay_core.options import OPTION_NAMES
from relay_core.store import Store
from cli_helpers import KEY_RE, config_json, configured, mode, only_line
from support import SECRET, Relay, cli, relay_env

# Every command and sub-command an operator can ask for help on.
COMMANDS = [("run",), ("web",), ("worker",), ("init",), ("config",), ("config", "show"), ("config", "set"),
            ("api-key",), ("api-key", "show"), ("api-key", "new"), ("api-key", "add"), ("api-key", "list"),
            ("api-key", "set"), ("api-key", "revoke"), ("send-test",), ("admin",), ("admin", "set-password"), ("backup",),
            ("healthcheck",), ("migrate-store",), ("restore",), ("rotate-secret",), ("log",), ("status",), ("pause",), ("resume",)]


# -- help and version ------------------------------------------------------------------------------
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


# -- init and the secret ---------------------------------------------------------------------------
def test_init_writes_a_private_env_file(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    del env["RELAY_SECRET_KEY"], env["RELAY_ADMIN_PASSWORD"]
    result = cli(env, "init", cwd=tmp_path)
    path = tmp_path / ".env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    values = read_dotenv(path)
    assert len(values["RELAY_SECRET_KEY"]) >= 32
    assert values["RELAY_ADMIN_USER"] == "admin" and len(values["RELAY_ADMIN_PASSWORD"]) >= 12
    assert values["RELAY_ADMIN_PASSWORD"] in result.stdout
    # The file is enough for every other command, and its password is the admin's.
    assert KEY_RE.fullmatch(only_line(cli(env, "api-key", "show", cwd=tmp_path).stdout))
    settings = load_settings({**values, "RELAY_DATA_DIR": str(tmp_path / "data")})
    store = Store(settings.db_path, crypto.derive_keys(settings))
    try:
        assert store.admin.check_password("admin", values["RELAY_ADMIN_PASSWORD"])
    finally:
        store.close()


def test_init_gives_a_fresh_secret_each_time(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cli(env, "init", cwd=tmp_path / "one")
    cli(env, "init", cwd=tmp_path / "two")
    first, second = (read_dotenv(tmp_path / d / ".env") for d in ("one", "two"))
    assert first["RELAY_SECRET_KEY"] != second["RELAY_SECRET_KEY"]
    assert first["RELAY_ADMIN_PASSWORD"] != second["RELAY_ADMIN_PASSWORD"]


def test_init_never_overwrites(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    path = tmp_path / ".env"
    path.write_text("RELAY_SECRET_KEY=keep-me-keep-me-keep-me-keep-me-keep-me\n")
    result = cli(env, "init", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert path.read_text() == "RELAY_SECRET_KEY=keep-me-keep-me-keep-me-keep-me-keep-me\n"


@pytest.mark.parametrize("args", [("config", "show"), ("api-key", "show"), ("send-test", "--to", "a@example.com"),
                                  ("backup", "copy.db"), ("healthcheck", "--worker"),
                                  ("admin", "set-password", "--password-stdin")])
def test_without_a_secret_every_command_exits_2_with_one_sentence(tmp_path: Path, args: tuple[str, ...]) -> None:
    env = relay_env(tmp_path / "data")
    del env["RELAY_SECRET_KEY"]
    result = cli(env, *args, cwd=tmp_path, check=False, input="whatever-password\n")
    assert result.returncode == 2
    line = only_line(result.stderr)
    assert "RELAY_SECRET_KEY" in line and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "data").exists() and not (tmp_path / "copy.db").exists()


def test_a_short_secret_exits_2(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data", RELAY_SECRET_KEY="short")
    result = cli(env, "config", "show", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "32" in only_line(result.stderr)


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "ignored")
    del env["RELAY_SECRET_KEY"], env["RELAY_DATA_DIR"]
    (tmp_path / ".env").write_text(f'# written by hand\nexport RELAY_SECRET_KEY="{SECRET}"\n'
                                   f"RELAY_DATA_DIR={tmp_path / 'from-dotenv'}\n")
    cli(env, "config", "set", "smtp_host=mail.example.org", cwd=tmp_path)
    assert (tmp_path / "from-dotenv" / "relay.db").exists()
    assert config_json(env, tmp_path)["smtp_host"] == "mail.example.org"


def test_the_environment_wins_over_dotenv(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "from-env", RELAY_WORKER_THREADS="2")
    (tmp_path / ".env").write_text(f"RELAY_SECRET_KEY=dotenv-secret-dotenv-secret-dotenv-secret\n"
                                   f"RELAY_DATA_DIR={tmp_path / 'from-dotenv'}\n"
                                   "RELAY_WORKER_THREADS=not-a-number\n")
    key = only_line(cli(env, "api-key", "show", cwd=tmp_path).stdout)
    assert (tmp_path / "from-env" / "relay.db").exists() and not (tmp_path / "from-dotenv").exists()
    # The key was encrypted with the environment's secret, not the .env's.
    settings = load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "from-env")})
    store = Store(settings.db_path, crypto.derive_keys(settings))
    try:
        assert store.api_keys.reveal() == key
    finally:
        store.close()


# -- the data directory ----------------------------------------------------------------------------
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


# -- error messages --------------------------------------------------------------------------------
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
        store.log.write(LogEntry("accepted", "queued", message_id="01abc", sender=HOSTILE_TEXT, subject=HOSTILE_TEXT,
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
