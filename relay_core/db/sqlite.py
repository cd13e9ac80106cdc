"""The SQLite backend: relay.db in the data directory.

Writers take ``WriteLock`` before ``BEGIN IMMEDIATE``, so write transactions
are one at a time across threads and processes: a SELECT-then-write is safe
here. A shared ``flock`` on ``relay.db-inuse`` lets ``migrate-store`` tell
that a relay is running.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

# Bodies above this are written through the blob API: binding one as a parameter
# would make SQLite copy it and keep that copy in the cached statement.
BLOB_STREAM_THRESHOLD = 256 * 1024
# insert_rows: at most this many rows and parameters in one statement (999 parameters
# is the smallest limit any SQLite build has had).
MAX_ROWS_PER_INSERT = 128
MAX_PARAMETERS = 999
_VALUES = re.compile(r"\bVALUES\s*(\([^()]*\))", re.IGNORECASE)


class StoreInUse(Exception):
    """Another process holds the SQLite store in a way that excludes this one."""


class WriteLock:
    """One writer at a time across threads and processes, handed over without polling.

    SQLite's own busy wait sleeps up to 100 ms between retries, so a request
    could wait a quarter of a second behind a worker; this lock wakes the next
    writer the moment the previous one commits.
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


@functools.lru_cache(maxsize=64)
def _zeroblob_last(sql: str) -> str:
    """The INSERT with its last placeholder reserving the blob's length instead of binding it."""
    at = sql.rindex("?")
    return sql[:at] + "zeroblob(?)" + sql[at + 1:]


class RelayConnection(sqlite3.Connection):
    """sqlite3's connection plus the few operations whose SQL differs by backend."""

    dialect = "sqlite"
    writer: WriteLock | None = None
    for_share = ""  # the write lock already keeps what a writer read
    _changes_at_begin = -1

    def written_yet(self) -> bool:
        return self.total_changes != self._changes_at_begin

    @contextmanager
    def transaction(self, durable: bool = True, pipelined: bool = False) -> Iterator["RelayConnection"]:
        """BEGIN IMMEDIATE under the write lock; ``durable=False`` commits with ``synchronous=NORMAL``."""
        if not durable:
            self.execute("PRAGMA synchronous = NORMAL")
        try:
            with self.exclusive():
                self.execute("BEGIN IMMEDIATE")
                self._changes_at_begin = self.total_changes
                try:
                    yield self
                except BaseException:
                    self.execute("ROLLBACK")
                    raise
                try:
                    self.execute("COMMIT")
                except BaseException:
                    if self.in_transaction:
                        self.execute("ROLLBACK")
                    raise
        finally:
            if not durable:
                self.execute("PRAGMA synchronous = FULL")

    def exclusive(self) -> WriteLock | contextlib.nullcontext[None]:
        return self.writer if self.writer is not None else contextlib.nullcontext()

    def serialize(self, name: str) -> None:
        """Nothing to do: write transactions here are already one at a time."""

    def pipelined(self) -> contextlib.nullcontext[None]:
        """Nothing to do: a statement here costs no round trip."""
        return contextlib.nullcontext()

    def insert_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for statement, params in multi_row_inserts(sql, rows):
            self.execute(statement, params)

    def insert_blob(self, sql: str, params: Sequence[Any], table: str, column: str) -> None:
        """Run an INSERT whose last parameter is ``table.column``'s blob; a large one is streamed."""
        blob = params[-1]
        if len(blob) <= BLOB_STREAM_THRESHOLD:
            self.execute(sql, params)
            return
        cur = self.execute(_zeroblob_last(sql), (*params[:-1], len(blob)))
        with self.blobopen(table, column, int(cur.lastrowid or 0)) as handle:
            handle.write(blob)


def multi_row_inserts(sql: str, rows: Sequence[Sequence[Any]]) -> Iterator[tuple[str, list[Any]]]:
    """``rows`` for ``sql`` as a few multi-row statements: sqlite3 lets go of the GIL at every row
    of an ``executemany``, and the event loop waits for it as often. Row counts are powers of
    two, so few statement texts are prepared."""
    if not rows:
        return
    most = MAX_ROWS_PER_INSERT
    while most > 1 and most * len(rows[0]) > MAX_PARAMETERS:
        most //= 2
    start = 0
    while start < len(rows):
        count = min(most, 1 << ((len(rows) - start).bit_length() - 1))
        yield _multi_row(sql, count), [value for row in rows[start:start + count] for value in row]
        start += count


@functools.lru_cache(maxsize=256)
def _multi_row(sql: str, count: int) -> str:
    match = _VALUES.search(sql)
    if match is None:
        raise ValueError(f"not an INSERT ... VALUES (...): {sql!r}")
    return sql[:match.start(1)] + ", ".join([match.group(1)] * count) + sql[match.end(1):]


def connect(path: Path | str) -> RelayConnection:
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False,
                           factory=RelayConnection)
    assert isinstance(conn, RelayConnection)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.writer = WriteLock.for_database(str(path))
    # Turning a new (or rollback-journal) database to WAL is a write that SQLite may
    # refuse at once with "database is locked", busy timeout or not, when another
    # process is doing the same (relays starting together on a fresh data directory):
    # it would deadlock waiting. Under the write lock the switches take turns.
    with conn.writer:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


# -- who holds the store ------------------------------------------------------------------
class _Holds:
    """One descriptor per store file per process, locked shared or exclusive, counted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[str, list[Any]] = {}  # path -> [fd, users, exclusive]


_holds = _Holds()


def _inuse_path(db_path: Path) -> str:
    return os.path.abspath(str(db_path)) + "-inuse"


def hold(db_path: Path) -> None:
    """Mark this process as a user of the store (a shared lock, kept until ``release``)."""
    key = _inuse_path(db_path)
    with _holds.lock:
        entry = _holds.entries.get(key)
        if entry is None:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreInUse(
                    f"{db_path} is held by a command that needs it alone (migrate-store or a restore); "
                    "start the relay again when that command has finished."
                ) from None
            entry = _holds.entries[key] = [fd, 0, False]
        entry[1] += 1


def release(db_path: Path) -> None:
    key = _inuse_path(db_path)
    with _holds.lock:
        entry = _holds.entries.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0 and not entry[2]:
            os.close(entry[0])
            del _holds.entries[key]


@contextmanager
def hold_exclusive(db_path: Path) -> Iterator[None]:
    """Have the store to this process alone, or raise ``StoreInUse`` at once."""
    key = _inuse_path(db_path)
    with _holds.lock:
        entry = _holds.entries.get(key)
        if entry is None:
            entry = _holds.entries[key] = [os.open(key, os.O_RDWR | os.O_CREAT, 0o600), 0, False]
        try:
            fcntl.flock(entry[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if entry[1] == 0:
                os.close(entry[0])
                del _holds.entries[key]
            else:
                fcntl.flock(entry[0], fcntl.LOCK_SH)
            raise StoreInUse(f"a relay process (web, worker or another command) is using {db_path}; "
                             "stop every relay process that uses it first.") from None
        entry[2] = True
    try:
        yield
    finally:
        with _holds.lock:
            entry[2] = False
            if entry[1] > 0:
                fcntl.flock(entry[0], fcntl.LOCK_SH)
            else:
                os.close(entry[0])
                del _holds.entries[key]


class SqliteDatabase:
    """relay.db: a connection per caller, and this process's hold on the file."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = False
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"the data directory '{self.path.parent}'"

    def connect(self) -> RelayConnection:
        with self._lock:
            if not self._held:  # from the first connection on, until close()
                hold(self.path)
                self._held = True
        return connect(self.path)

    def flush_log(self) -> None:
        """Flush the write-ahead log to disk: what ``synchronous=FULL`` does at every commit, done
        here once for the commits made since with ``synchronous=NORMAL`` (see intake.py).

        Opened each time, not kept: the log is a file SQLite may delete and create anew. With
        none there, every commit is in relay.db, which a checkpoint flushes before it ends."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                release(self.path)
