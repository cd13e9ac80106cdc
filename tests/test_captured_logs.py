"""The end-of-session scan for secrets in logs (conftest.py's ``pytest_sessionfinish``) finds what it must."""

from __future__ import annotations

from pathlib import Path

import captured_logs
from relay_core import crypto
from support import SMTP_PASSWORD, RelayProcess, cli, relay_env


def test_a_key_or_password_in_a_log_is_found_and_not_repeated(tmp_path: Path) -> None:
    key = crypto.new_api_key()
    unrelated = crypto.new_api_key()  # never registered: caught by its shape
    clean, leaky = tmp_path / "clean.log", tmp_path / "leaky.log"
    clean.write_text("INFO relay.delivery: 01a2 sent 250 to a@example.com\n")
    leaky.write_text(f"auth with {SMTP_PASSWORD} failed\nBearer {key}\nlater {unrelated}\n")
    assert captured_logs.find_leaks([clean], {key, SMTP_PASSWORD}) == []
    leaks = captured_logs.find_leaks([leaky], {key, SMTP_PASSWORD})
    assert len(leaks) == 3 and all(str(leaky) in line for line in leaks)
    assert not any(key in line or SMTP_PASSWORD in line or unrelated in line for line in leaks)


def test_the_suite_registers_relay_logs_cli_output_and_the_keys_it_printed(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    key = cli(env, "api-key", "show", cwd=tmp_path).stdout.strip()
    cli(env, "config", "set", "smtp_password=registered-pass-123", cwd=tmp_path)
    assert {key, "registered-pass-123", SMTP_PASSWORD} <= captured_logs.secrets()
    process = RelayProcess("worker", env, tmp_path)
    assert process.log_path in captured_logs.files()
    refused = cli(env, "api-key", "revoke", "999", cwd=tmp_path, check=False)  # says why on stderr
    kept = [p for p in captured_logs.files() if p.parent == captured_logs.directory()]
    assert any("No active API key with id 999" in p.read_text() for p in kept), refused.stderr
