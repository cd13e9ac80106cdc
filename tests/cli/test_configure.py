"""`tspro-relay` as an operator runs it: real subprocesses, a real data directory.

Each test gets its own working directory and data directory; what the CLI
wrote is checked by running it again or by opening the store in-process.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from relay_core import crypto
from relay_core.config import load_settings, read_dotenv
from relay_core.health import Unhealthy, main_process_role
from relay_core.store import Store
from support import SECRET, RelayProcess, SmtpServer, cli, free_port, relay_env, wait_until

KEY_RE = re.compile(r"tsr_[A-Za-z0-9_-]{43}")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return relay_env(tmp_path / "data")


@pytest.fixture
def store_of(tmp_path: Path) -> Iterator[Any]:
    """Open the store the CLI wrote, in-process, after the commands ran."""
    opened: list[Store] = []

    def open_store(env: dict[str, str]) -> Store:
        settings = load_settings({k: v for k, v in env.items() if k.startswith("RELAY_")})
        store = Store(settings.db_path, crypto.derive_keys(settings))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def config_json(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    result = cli(env, "config", "show", "--json", cwd=cwd)
    return json.loads(result.stdout)


def only_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- init and the secret -------------------------------------------------------------------------
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
        assert store.check_admin("admin", values["RELAY_ADMIN_PASSWORD"])
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
        assert store.reveal_api_key() == key
    finally:
        store.close()


# -- config ------------------------------------------------------------------------------------------
def test_config_set_and_show(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "config", "set", "smtp_host=mail.example.org", "smtp_port=465", "smtp_security=SSL",
                 "default_from=noreply@example.org", "allowed_from=Example.org; boss@other.net",
                 "max_attach_mb=10", cwd=tmp_path)
    assert "Saved" in result.stdout
    shown = config_json(env, tmp_path)
    assert (shown["smtp_host"], shown["smtp_port"], shown["smtp_security"]) == ("mail.example.org", 465, "ssl")
    assert shown["default_from"] == "noreply@example.org"
    assert shown["allowed_from"] == "example.org, boss@other.net"
    assert shown["max_attach_mb"] == 10 and shown["retry_base_seconds"] == 60
    text = cli(env, "config", "show", cwd=tmp_path).stdout
    assert "smtp_host = mail.example.org" in text.splitlines()
    assert "smtp_port = 465" in text.splitlines()
    lines = text.splitlines()
    assert all(re.fullmatch(r"[a-z_]+ = .*", line) for line in lines)
    assert [line.split(" = ")[0] for line in lines] == list(shown)


def test_config_show_masks_the_smtp_password(env: dict[str, str], tmp_path: Path) -> None:
    assert config_json(env, tmp_path)["smtp_password"] == ""
    password = "smtp-Pa55-never-shown"
    cli(env, "config", "set", f"smtp_password={password}", "smtp_username=relayuser", cwd=tmp_path)
    text = cli(env, "config", "show", cwd=tmp_path).stdout
    shown = config_json(env, tmp_path)
    assert password not in text and password not in json.dumps(shown)
    assert "smtp_password = ********" in text.splitlines()
    assert shown["smtp_password"] == "********" and shown["smtp_username"] == "relayuser"
    assert (Path(env["RELAY_DATA_DIR"]) / "relay.db").exists()


@pytest.mark.parametrize("pairs,fragment", [
    (["smtp_host=mail.example.org", "no_such_key=1"], "no_such_key"),
    (["smtp_host=mail.example.org", "smtp_port=notanumber"], "smtp_port"),
    (["smtp_host=mail.example.org", "smtp_port=70000"], "smtp_port"),
    (["smtp_host=mail.example.org", "smtp_security=tls13"], "smtp_security"),
    (["default_from=not-an-address", "smtp_host=mail.example.org"], "default_from"),
    (["smtp_host=mail.example.org", "allowed_from=example.org, bad entry"], "allowed_from"),
    (["smtp_host=mail.example.org", "smtp_tls_verify=maybe"], "smtp_tls_verify"),
    (["smtp_host=mail.example.org", "smtp_port"], "key=value"),
    (["smtp_host=mail.example.org", "retry_base_seconds=900", "retry_max_seconds=60"], "retry_max_seconds"),
])
def test_config_set_is_all_or_nothing(env: dict[str, str], tmp_path: Path, pairs: list[str],
                                      fragment: str) -> None:
    before = config_json(env, tmp_path)
    result = cli(env, "config", "set", *pairs, cwd=tmp_path, check=False)
    assert result.returncode != 0
    line = only_line(result.stderr)
    assert fragment in line and "Traceback" not in result.stderr
    assert config_json(env, tmp_path) == before
    assert before["smtp_host"] == ""


def test_config_set_without_pairs_fails(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "config", "set", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "key=value" in result.stderr


# -- API keys ---------------------------------------------------------------------------------------
def test_api_key_show_prints_one_line(env: dict[str, str], tmp_path: Path) -> None:
    first = cli(env, "api-key", "show", cwd=tmp_path)
    key = only_line(first.stdout)
    assert KEY_RE.fullmatch(key)
    assert only_line(cli(env, "api-key", "show", cwd=tmp_path).stdout) == key


def test_api_key_new_replaces_the_key(env: dict[str, str], tmp_path: Path, store_of: Any) -> None:
    old = only_line(cli(env, "api-key", "show", cwd=tmp_path).stdout)
    new = only_line(cli(env, "api-key", "new", cwd=tmp_path).stdout)
    assert KEY_RE.fullmatch(new) and new != old
    assert only_line(cli(env, "api-key", "show", cwd=tmp_path).stdout) == new
    store = store_of(env)
    assert store.authenticate(old) is None and store.authenticate(new) is not None
    rows = [line.split("\t") for line in cli(env, "api-key", "list", cwd=tmp_path).stdout.splitlines()]
    assert [(r[1], r[2], r[3]) for r in rows] == [("portal", "portal", "revoked"), ("portal", "portal", "active")]


def test_api_key_add_list_revoke(env: dict[str, str], tmp_path: Path, store_of: Any) -> None:
    added = cli(env, "api-key", "add", "--label", "x", cwd=tmp_path)
    extra = only_line(added.stdout)
    assert KEY_RE.fullmatch(extra) and extra != only_line(cli(env, "api-key", "show", cwd=tmp_path).stdout)
    listing = cli(env, "api-key", "list", cwd=tmp_path).stdout
    assert extra not in listing
    rows = [line.split("\t") for line in listing.splitlines()]
    assert [(r[1], r[2], r[3]) for r in rows] == [("portal", "portal", "active"), ("x", "extra", "active")]
    extra_id = rows[1][0]
    assert store_of(env).authenticate(extra) is not None

    revoked = cli(env, "api-key", "revoke", extra_id, cwd=tmp_path)
    assert extra_id in revoked.stdout
    rows = [line.split("\t") for line in cli(env, "api-key", "list", cwd=tmp_path).stdout.splitlines()]
    assert [(r[1], r[3]) for r in rows] == [("portal", "active"), ("x", "revoked")]
    assert store_of(env).authenticate(extra) is None

    again = cli(env, "api-key", "revoke", extra_id, cwd=tmp_path, check=False)
    assert again.returncode != 0 and extra_id in again.stderr
    missing = cli(env, "api-key", "revoke", "999", cwd=tmp_path, check=False)
    assert missing.returncode != 0 and "999" in missing.stderr


# -- send-test -----------------------------------------------------------------------------------------
def test_send_test_needs_an_smtp_host_then_a_default_from(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "smtp_host" in only_line(result.stderr) and result.stdout == ""
    cli(env, "config", "set", "smtp_host=127.0.0.1", "smtp_port=2525", "smtp_security=none", cwd=tmp_path)
    result = cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "default_from" in only_line(result.stderr) and result.stdout == ""
    db = Path(env["RELAY_DATA_DIR"]) / "relay.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    conn.close()


def test_send_test_queues_a_message(env: dict[str, str], tmp_path: Path, store_of: Any) -> None:
    cli(env, "config", "set", "smtp_host=127.0.0.1", "smtp_port=2525", "smtp_security=none",
        "default_from=relay@example.org", cwd=tmp_path)
    result = cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path)
    message_id = only_line(result.stdout)
    assert re.fullmatch(r"[0-9a-f]{22}", message_id)
    status = store_of(env).message_status(message_id)
    assert status is not None and status["status"] == "queued"
    assert status["from"] == "relay@example.org" and status["message_id"] == f"<{message_id}@example.org>"
    assert [r["address"] for r in status["recipients"]] == ["a@example.com"]


def test_send_test_waits_for_the_outcome_with_the_servers_words(env: dict[str, str], tmp_path: Path) -> None:
    # It returned at once, before the worker had tried: the operator had to go and read the log.
    with SmtpServer("none") as server:
        cli(env, "config", "set", *server.settings(), "default_from=relay@example.org", "retry_base_seconds=3600",
            cwd=tmp_path)
        worker = RelayProcess("worker", env, tmp_path).start()
        try:
            wait_until(lambda: cli(env, "healthcheck", "--worker", cwd=tmp_path, check=False).returncode == 0,
                       timeout=30, interval=0.5, what="the worker's heartbeat")
            result = cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path)
            assert re.fullmatch(r"[0-9a-f]{22}", only_line(result.stdout))
            assert "Sent: the mail server answered 250" in result.stderr and len(server.received) == 1
            server.behaviour.data_replies = ["451 4.3.0 Greylisted, try later"]
            result = cli(env, "send-test", "--to", "a@example.com", cwd=tmp_path, check=False)
            assert result.returncode == 1
            assert "Deferred" in result.stderr and "451 4.3.0 Greylisted, try later" in result.stderr
        finally:
            worker.stop()


def test_send_test_refuses_a_bad_address(env: dict[str, str], tmp_path: Path) -> None:
    cli(env, "config", "set", "smtp_host=127.0.0.1", "default_from=relay@example.org", cwd=tmp_path)
    result = cli(env, "send-test", "--to", "not-an-address", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "not-an-address" in result.stderr and "Traceback" not in result.stderr


def test_changes_from_the_command_line_appear_in_recent_changes(env: dict[str, str], tmp_path: Path,
                                                                 store_of: Any) -> None:
    # Settings changed with the CLI never reached the Settings page's Recent changes.
    cli(env, "config", "set", "smtp_host=mail.example.org", "smtp_port=2525", cwd=tmp_path)
    cli(env, "pause", cwd=tmp_path)
    cli(env, "resume", cwd=tmp_path)
    cli(env, "api-key", "add", "--label", "newsletter", cwd=tmp_path)
    cli(env, "api-key", "revoke", "2", cwd=tmp_path)
    cli(env, "api-key", "new", cwd=tmp_path)
    entries = store_of(env).audit_entries()
    assert {e.actor for e in entries} == {"command line"}
    assert [e.action for e in reversed(entries)] == ["settings.cli", "delivery.pause", "delivery.resume",
                                                     "api_key.add", "api_key.revoke", "api_key.new"]
    assert "smtp_port: 587 → 2525" in entries[-1].detail and "smtp_host" in entries[-1].detail


# -- admin, backup, healthcheck ---------------------------------------------------------------------------
def test_admin_set_password_from_stdin(env: dict[str, str], tmp_path: Path, store_of: Any) -> None:
    result = cli(env, "admin", "set-password", "--password-stdin", cwd=tmp_path, input="a-new-Password-42\n")
    assert "changed" in result.stdout
    store = store_of(env)
    assert store.check_admin("admin", "a-new-Password-42")
    assert not store.check_admin("admin", "admin-pass-123")


def test_admin_set_password_refuses_a_short_one(env: dict[str, str], tmp_path: Path, store_of: Any) -> None:
    result = cli(env, "admin", "set-password", "--password-stdin", cwd=tmp_path, input="short\n", check=False)
    assert result.returncode != 0 and "Too short" in result.stderr and "fewer than 8" in result.stderr
    assert store_of(env).check_admin("admin", "admin-pass-123")


@pytest.mark.parametrize("common", ["password", "changeme", "12345678", "Password1", "qwertyuiop"])
def test_admin_set_password_refuses_the_commonest_passwords(env: dict[str, str], tmp_path: Path, store_of: Any,
                                                            common: str) -> None:
    # One policy with the Admin account card, which refuses these too.
    result = cli(env, "admin", "set-password", "--password-stdin", cwd=tmp_path, input=common + "\n", check=False)
    assert result.returncode != 0 and "widely known" in result.stderr
    assert store_of(env).check_admin("admin", "admin-pass-123")


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
