"""`tspro-relay restore` as an operator runs it: refusals first, then a restore onto a new host.

Every refusal is one sentence on stderr, and leaves the data directory
exactly as it was.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from relay_core import crypto
from relay_core.config import load_settings
from relay_core.store import Store
from support import RelayProcess, cli, free_port, relay_env, store_message, wait_until


def only_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.endswith(("-inuse", "-writelock"))}  # (empty) lock files


@pytest.fixture(scope="module")
def made_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Made once per module (the CLI calls cost seconds), copied for each test by ``source``."""
    base = tmp_path_factory.mktemp("restore-source")
    env = relay_env(base / "old" / "data")
    cli(env, "config", "set", "smtp_host=127.0.0.1", "default_from=relay@example.org", cwd=base)
    cli(env, "api-key", "add", "--label", "second", cwd=base)
    settings = load_settings({k: v for k, v in env.items() if k.startswith("RELAY_")})
    store = Store(settings.db_path, crypto.derive_keys(settings))
    ids = [store_message(store, time.time()) for _ in range(3)]
    # One was being delivered when the backup was taken.
    conn = store.conn()
    conn.execute("UPDATE messages SET status = 'sending', lease_owner = 'gone:1:x', lease_expires_at = ?"
                 " WHERE id = ?", (time.time() + 300, ids[0]))
    store.shutdown()  # close() keeps this process's hold on relay.db; restore would see a relay using it
    cli(env, "backup", str(base / "backup.db"), cwd=base)
    return base, ids


@pytest.fixture
def source(tmp_path: Path, made_source: tuple[Path, list[str]]) -> tuple[dict[str, str], Path, list[str]]:
    """A relay with settings, an extra key and waiting messages, and its backup: this test's copy."""
    base, ids = made_source
    shutil.copytree(base / "old", tmp_path / "old")  # modes kept: the directory 0700, the databases 0600
    shutil.copyfile(base / "backup.db", tmp_path / "backup.db")
    return relay_env(tmp_path / "old" / "data"), tmp_path / "backup.db", ids


def test_restore_onto_a_new_host_brings_back_settings_keys_and_waiting_mail(
        tmp_path: Path, source: tuple[dict[str, str], Path, list[str]]) -> None:
    old_env, backup, ids = source
    new_env = relay_env(tmp_path / "new" / "data")  # same secret, fresh directory
    result = cli(new_env, "restore", str(backup), cwd=tmp_path)
    assert "3 messages, 3 waiting to be delivered" in result.stdout
    assert "kept as" not in result.stdout  # there was nothing to replace
    for args in (("config", "show", "--json"), ("api-key", "show"), ("api-key", "list")):
        assert cli(new_env, *args, cwd=tmp_path).stdout == cli(old_env, *args, cwd=tmp_path).stdout
    conn = sqlite3.connect(tmp_path / "new" / "data" / "relay.db")
    try:
        rows = dict(conn.execute("SELECT id, status FROM messages").fetchall())
        assert rows == {i: "queued" for i in ids}  # the in-flight one waits again
        assert conn.execute("SELECT COUNT(*) FROM messages WHERE lease_owner IS NOT NULL").fetchone()[0] == 0
    finally:
        conn.close()
    assert (tmp_path / "new" / "data" / "relay.db").stat().st_mode & 0o777 == 0o600
    assert backup.read_bytes()[:16] == b"SQLite format 3\x00"


def test_restore_over_a_store_keeps_the_old_one_and_drops_the_queue(
        tmp_path: Path, source: tuple[dict[str, str], Path, list[str]]) -> None:
    env, backup, ids = source
    data = tmp_path / "old" / "data"
    cli(env, "send-test", "--to", "late@example.com", cwd=tmp_path)  # after the backup: not in it
    result = cli(env, "restore", str(backup), cwd=tmp_path)
    kept = sorted(data.glob("relay.db.pre-restore-*"))
    assert [p.name for p in kept if not p.name.endswith("-wal")] and "kept as" in result.stdout
    assert not (data / "queue.db").exists() and not (data / "relay.db-wal").exists()
    conn = sqlite3.connect(data / "relay.db")
    try:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM messages")) == sorted(ids)
    finally:
        conn.close()
    old = sqlite3.connect(next(p for p in kept if not p.name.endswith("-wal")))
    try:
        assert old.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 4
    finally:
        old.close()


@pytest.mark.parametrize("role", ["worker", "web"])
def test_restore_refuses_while_a_relay_process_runs(tmp_path: Path, role: str,
                                                    source: tuple[dict[str, str], Path, list[str]]) -> None:
    env, backup, _ = source
    data = tmp_path / "old" / "data"
    cli(env, "send-test", "--to", "late@example.com", cwd=tmp_path)  # not in the backup
    process = RelayProcess(role, env, tmp_path, port=free_port() if role == "web" else None).start()
    try:
        if role == "worker":
            wait_until(lambda: cli(env, "healthcheck", "--worker", cwd=tmp_path, check=False).returncode == 0,
                       what="the worker to start")
        result = cli(env, "restore", str(backup), cwd=tmp_path, check=False)
        assert result.returncode == 2
        line = only_line(result.stderr)
        assert "is using" in line and "stop every relay process" in line
        assert not list(data.glob("*pre-restore*")) and not (data / "relay.db.restoring").exists()
        conn = sqlite3.connect(data / "relay.db", timeout=30)
        try:
            assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 4
        finally:
            conn.close()
    finally:
        assert process.stop() == 0
    # Once it has stopped, the same command works.
    assert cli(env, "restore", str(backup), cwd=tmp_path).returncode == 0


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(4096, len(data), 4096):  # garble every b-tree page's header but the first
        data[offset:offset + 12] = b"\x0d\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
    path.write_bytes(bytes(data))


def newer_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()


def plain_sqlite(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()


def not_sqlite(path: Path) -> None:
    path.write_text("RELAY_SECRET_KEY=this is a .env file, not a backup\n")


@pytest.mark.parametrize("spoil,expected", [
    (corrupt, "is damaged"),
    (newer_schema, "newer version of the relay (schema 999"),
    (plain_sqlite, "not a TS Pro Relay store"),
    (not_sqlite, "is not a SQLite database"),
])
def test_a_bad_backup_is_refused_and_nothing_changes(tmp_path: Path, spoil, expected: str,  # type: ignore[no-untyped-def]
                                                     source: tuple[dict[str, str], Path, list[str]]) -> None:
    env, backup, _ = source
    spoiled = tmp_path / "spoiled.db"
    shutil.copyfile(backup, spoiled)
    spoil(spoiled)
    data = tmp_path / "old" / "data"
    before = digest(data)
    result = cli(env, "restore", str(spoiled), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert expected in only_line(result.stderr) and "nothing was restored" in result.stderr
    assert digest(data) == before


def test_a_backup_made_with_another_secret_is_refused(tmp_path: Path,
                                                      source: tuple[dict[str, str], Path, list[str]]) -> None:
    _, backup, _ = source
    other = relay_env(tmp_path / "elsewhere" / "data",
                      RELAY_SECRET_KEY="another-secret-key-for-another-relay-0123456789")
    result = cli(other, "restore", str(backup), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "made with another RELAY_SECRET_KEY" in only_line(result.stderr)
    assert not (tmp_path / "elsewhere" / "data" / "relay.db").exists()


def test_restore_of_a_missing_file_says_so(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    result = cli(env, "restore", str(tmp_path / "nope.db"), cwd=tmp_path, check=False)
    assert result.returncode == 1 and "There is no backup at" in only_line(result.stderr)
