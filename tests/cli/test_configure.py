"""What an operator sets from the command line: `config set` and `show`, API keys, the admin password,
`send-test`, the SMTP security words, `pause` and `resume`. Real subprocesses and a real data
directory; what the CLI wrote is checked by running it again or by opening the store in-process.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import KEY_RE, config_json, only_line
from support import RelayProcess, SmtpServer, cli, wait_until


# -- config ----------------------------------------------------------------------------------------
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


# -- API keys --------------------------------------------------------------------------------------
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
    assert store.api_keys.authenticate(old) is None and store.api_keys.authenticate(new) is not None
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
    assert store_of(env).api_keys.authenticate(extra) is not None

    revoked = cli(env, "api-key", "revoke", extra_id, cwd=tmp_path)
    assert extra_id in revoked.stdout
    rows = [line.split("\t") for line in cli(env, "api-key", "list", cwd=tmp_path).stdout.splitlines()]
    assert [(r[1], r[3]) for r in rows] == [("portal", "active"), ("x", "revoked")]
    assert store_of(env).api_keys.authenticate(extra) is None

    again = cli(env, "api-key", "revoke", extra_id, cwd=tmp_path, check=False)
    assert again.returncode != 0 and extra_id in again.stderr
    missing = cli(env, "api-key", "revoke", "999", cwd=tmp_path, check=False)
    assert missing.returncode != 0 and "999" in missing.stderr


# -- the admin password ----------------------------------------------------------------------------
def test_admin_set_password_from_stdin(env: dict[str, str], tmp_path: Path, store_of: Any) -> None:
    result = cli(env, "admin", "set-password", "--password-stdin", cwd=tmp_path, input="a-new-Password-42\n")
    assert "changed" in result.stdout
    store = store_of(env)
    assert store.admin.check_password("admin", "a-new-Password-42")
    assert not store.admin.check_password("admin", "admin-pass-123")


def test_admin_set_password_refuses_a_short_one(env: dict[str, str], tmp_path: Path, store_of: Any) -> None:
    result = cli(env, "admin", "set-password", "--password-stdin", cwd=tmp_path, input="short\n", check=False)
    assert result.returncode != 0 and "Too short" in result.stderr and "fewer than 8" in result.stderr
    assert store_of(env).admin.check_password("admin", "admin-pass-123")


@pytest.mark.parametrize("common", ["password", "changeme", "12345678", "Password1", "qwertyuiop"])
def test_admin_set_password_refuses_the_commonest_passwords(env: dict[str, str], tmp_path: Path, store_of: Any,
                                                            common: str) -> None:
    # One policy with the Admin account card, which refuses these too.
    result = cli(env, "admin", "set-password", "--password-stdin", cwd=tmp_path, input=common + "\n", check=False)
    assert result.returncode != 0 and "widely known" in result.stderr
    assert store_of(env).admin.check_password("admin", "admin-pass-123")


# -- send-test -------------------------------------------------------------------------------------
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
    status = store_of(env).messages.status(message_id)
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
    entries = store_of(env).log.audit_entries()
    assert {e.actor for e in entries} == {"command line"}
    assert [e.action for e in reversed(entries)] == ["settings.cli", "delivery.pause", "delivery.resume",
                                                     "api_key.add", "api_key.revoke", "api_key.new"]
    assert "smtp_port: 587 → 2525" in entries[-1].detail and "smtp_host" in entries[-1].detail


# -- settings the operator types -------------------------------------------------------------------
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
