"""Backups and restores of the SQLite store (relay.db); docs/operating.md says what each guarantees.

The backup is SQLite's online backup API, so the copy is the store at one instant
while the web keeps accepting. A restore drops the queue: it held wake-ups for the
old store, and the sweepers re-enqueue whatever the restored one says is waiting.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .. import crypto
from ..db import migrations
from ..config import Settings
from ..crypto import KeySet
from ..db.sqlite import hold_exclusive

SQLITE_HEADER = b"SQLite format 3\x00"
RELAY_TABLES = {"schema_migrations", "meta", "settings", "messages", "recipients"}


class BackupError(Exception):
    """A backup could not be made; the message is one sentence saying why."""


class RestoreRefused(BackupError):
    """The backup cannot be restored; the message is one sentence saying why."""


def backup(conn: sqlite3.Connection, target: Path) -> None:
    """Copy the database behind ``conn`` to ``target``, a new file."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # refuses to overwrite
    os.close(fd)
    destination = sqlite3.connect(str(target))
    try:
        conn.backup(destination)  # all pages in one step: one consistent snapshot
        destination.execute("PRAGMA journal_mode = DELETE")  # one file, no -wal beside it
        check = destination.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise BackupError(f"The copy at {target} failed its integrity check ({check}).")
    finally:
        destination.close()


@dataclass
class Restored:
    schema_version: int
    waiting: int
    messages: int
    kept: Path | None


def _check(conn: sqlite3.Connection, source: Path, keys: KeySet) -> int:
    """Refuse anything but an intact relay store of a known schema made with this secret."""
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        raise RestoreRefused(f"{source} is damaged ({exc}); nothing was restored.") from None
    if problems != ["ok"]:
        raise RestoreRefused(f"{source} is damaged ({problems[0]}); nothing was restored.")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not RELAY_TABLES <= tables:
        raise RestoreRefused(f"{source} is a SQLite database but not a TS Pro Relay store; nothing was restored.")
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])  # what migrations.py counts on SQLite
    known = len(migrations.MIGRATIONS)
    if version > known:
        raise RestoreRefused(
            f"{source} was made by a newer version of the relay (schema {version}; this one knows up to "
            f"{known}); nothing was restored: upgrade the relay first, then restore.")
    row = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
    if row is not None:
        try:
            keys.decrypt_text(row[0])
        except crypto.DecryptionError:
            raise RestoreRefused(
                f"{source} was made with another RELAY_SECRET_KEY, so its stored secrets and queued mail could "
                "not be read; nothing was restored: set the key it was made with (keep it with your backups), "
                "then restore."
            ) from None
    return version


def _release_in_flight(conn: sqlite3.Connection, now: float) -> None:
    """Deliveries in progress when the backup was taken belong to workers that are gone."""
    conn.execute(
        "UPDATE messages SET status = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,"
        " lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = ?, enqueued_at = NULL, updated_at = ?"
        " WHERE status = 'sending'", (now, now))
    conn.execute("UPDATE messages SET enqueued_at = NULL WHERE status IN ('queued', 'deferred')")
    conn.execute("DELETE FROM workers")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(settings: Settings, source: Path, now: float | None = None) -> Restored:
    now = time.time() if now is None else now
    try:
        with open(source, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        raise RestoreRefused(f"There is no backup at {source}; nothing was restored.") from None
    except OSError as exc:
        raise RestoreRefused(f"{source} cannot be read ({exc.strerror}); nothing was restored.") from None
    if header != SQLITE_HEADER:
        raise RestoreRefused(f"{source} is not a SQLite database (not a relay backup); nothing was restored.")
    keys = crypto.derive_keys(settings)
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)  # a new host: nothing there yet
    with hold_exclusive(settings.db_path):  # StoreInUse while any relay process has the store open
        staged = data / "relay.db.restoring"
        staged.unlink(missing_ok=True)
        shutil.copyfile(source, staged)  # the operator's backup file is never touched
        os.chmod(staged, 0o600)
        try:
            conn = sqlite3.connect(str(staged), isolation_level=None)
            try:
                version = _check(conn, source, keys)
                conn.execute("BEGIN IMMEDIATE")
                _release_in_flight(conn, now)
                conn.execute("COMMIT")
                conn.execute("PRAGMA journal_mode = DELETE")
                counts = dict(conn.execute("SELECT status, COUNT(*) FROM messages GROUP BY status").fetchall())
            finally:
                conn.close()
            with open(staged, "rb+") as handle:
                os.fsync(handle.fileno())
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        kept = _set_aside(settings.db_path, now)
        os.replace(staged, settings.db_path)
        if not settings.queue_url:
            for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
                (data / name).unlink(missing_ok=True)
        _fsync_directory(data)
    waiting = sum(counts.get(state, 0) for state in ("queued", "deferred"))
    return Restored(version, waiting, sum(counts.values()), kept)


def _set_aside(db_path: Path, now: float) -> Path | None:
    """Keep the database being replaced, with its WAL, under a dated name; drop its -shm."""
    db_path.with_name(db_path.name + "-shm").unlink(missing_ok=True)
    wal = db_path.with_name(db_path.name + "-wal")
    if not db_path.exists():
        wal.unlink(missing_ok=True)  # a WAL without its database could only corrupt the new one
        return None
    kept = db_path.with_name(f"{db_path.name}.pre-restore-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}")
    if wal.exists():
        os.replace(wal, kept.with_name(kept.name + "-wal"))  # SQLite finds it again by that name
    os.replace(db_path, kept)
    return kept
