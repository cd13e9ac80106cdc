"""SQLite plumbing: connections, the cross-process write lock, transactions.

Every connection runs in WAL mode with a busy timeout, foreign keys on,
``synchronous=FULL`` and manual transactions; writers take ``WriteLock``
before ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class WriteLock:
    """One writer at a time across threads and processes, handed over without polling.

    SQLite makes a writer that finds the database locked sleep and retry, with
    sleeps growing to 100 ms, so under contention a web request could wait
    behind a worker for a quarter of a second. Taking this lock (a thread lock,
    then flock on a file beside the database) before BEGIN IMMEDIATE means the
    next writer is woken the moment the previous one commits.
    """

    _registry: dict[str, "WriteLock"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self._thread_lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @classmethod
    def for_database(cls, db_path: str) -> "WriteLock":
        key = os.path.abspath(db_path)
        with cls._registry_lock:
            lock = cls._registry.get(key)
            if lock is None:
                lock = cls._registry[key] = cls(key + "-writelock")
            return lock

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


class RelayConnection(sqlite3.Connection):
    write_lock: WriteLock | None = None


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection with WAL, a busy timeout, foreign keys and manual transactions."""
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False,
                           factory=RelayConnection)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.write_lock = WriteLock.for_database(str(path))
    return conn


def write_lock(conn: sqlite3.Connection) -> WriteLock | contextlib.nullcontext[None]:
    lock = getattr(conn, "write_lock", None)
    return lock if lock is not None else contextlib.nullcontext()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE under the write lock; roll back on error."""
    with write_lock(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
