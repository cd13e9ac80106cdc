"""The end-of-session scan for secrets in logs (conftest.py's ``pytest_sessionfinish``) finds what it must."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
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


INNER = '''
import logging

def test_{name}() -> None:
    logging.getLogger("relay.test").warning({line!r})
'''


def inner_session(tmp_path: Path, name: str, line: str) -> subprocess.CompletedProcess[str]:
    """A pytest session of its own with this suite's conftest.py as a plugin, running one test that logs
    ``line``: what the end-of-session scan makes of it, without touching this session's logs."""
    test_file = tmp_path / f"test_{name}.py"
    test_file.write_text(INNER.format(name=name, line=line))
    return run_pytest(tmp_path, [test_file])


def run_pytest(tmp_path: Path, files: list[Path], *options: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    tests = Path(__file__).parent
    # Not this session's worker: the inner session is a controller or a plain run of its own.
    outer = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env = {**outer, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)]), "TMPDIR": str(tmp_path),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, *options, *map(str, files)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def test_the_end_of_session_scan_fails_a_run_whose_logs_hold_a_key(tmp_path: Path) -> None:
    leaked = inner_session(tmp_path, "leaks", "sent with Bearer tsr_" + "q" * 43)
    assert leaked.returncode == 1, leaked.stdout + leaked.stderr
    assert "1 passed" in leaked.stdout and "SECRETS IN LOGS: 1 leak(s)" in leaked.stdout, leaked.stdout
    assert "holds an API key (tsr_qq…)" in leaked.stdout and "q" * 43 not in leaked.stdout
    clean = inner_session(tmp_path, "clean", "sent 01a2 to a@example.com")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no API key or SMTP password in any" in clean.stdout


# Two tests that meet: each waits (bounded) for the other to have started, so they run at the same time,
# on two workers. One only registers the secret, the other only logs it.
PAIR = '''
import logging
import os
import time
from pathlib import Path

import captured_logs


def test_{name}() -> None:
    {action}
    here = Path(os.environ["MEETING"])
    (here / "{name}").write_text(os.environ["PYTEST_XDIST_WORKER"])
    deadline = time.monotonic() + 90
    while not (here / "{other}").exists():
        assert time.monotonic() < deadline, "the other test never started: one worker ran both"
        time.sleep(0.05)
'''


def test_a_secret_one_worker_saw_is_found_in_another_workers_log(tmp_path: Path) -> None:
    planted = "planted-pass-" + secrets.token_hex(8)  # not key-shaped: only its registration finds it
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    files = []
    for name, other, action in [("remembers", "logs", 'captured_logs.remember(os.environ["PLANTED"])'),
                                ("logs", "remembers", 'logging.getLogger("relay.test").warning('
                                                      '"auth with %s", os.environ["PLANTED"])')]:
        files.append(tmp_path / f"test_{name}.py")
        files[-1].write_text(PAIR.format(name=name, other=other, action=action))
    run = run_pytest(tmp_path, files, "-n", "2", env={"PLANTED": planted, "MEETING": str(meeting)})
    assert run.returncode == 1, run.stdout + run.stderr
    workers = {(meeting / "remembers").read_text(), (meeting / "logs").read_text()}
    assert len(workers) == 2, workers
    assert "2 passed" in run.stdout and "SECRETS IN LOGS: 1 leak(s)" in run.stdout, run.stdout
    logged_by = (meeting / "logs").read_text()
    assert f"in-process-{logged_by}.log: holds a secret the suite used (plante…)" in run.stdout, run.stdout
    assert planted not in run.stdout + run.stderr
