"""The store's database layer: one interface, two backends (SQLite, PostgreSQL).

Store modules hold every SQL text, written once for both backends (``?``
placeholders, ``ON CONFLICT``, ``RETURNING``). What differs lives behind
this module, in ``sqlite.py`` and ``postgres.py``:

- ``conn.execute(sql, params)`` / ``executemany`` with rows readable by name
  and by index (``sqlite3.Row`` on SQLite, ``postgres.Row`` on PostgreSQL);
- ``transaction(conn, durable=True)``: BEGIN IMMEDIATE under the write lock
  on SQLite, BEGIN on a pooled connection on PostgreSQL; ``durable=False``
  for writes whose loss to a power cut repeats work but loses nothing;
- ``write_lock(conn)``: the SQLite cross-process writer lock (nothing on
  PostgreSQL, where MVCC and row locks order writers);
- ``serialize(conn, name)``: inside a transaction, wait until no other
  transaction holds ``name`` (an advisory lock on PostgreSQL; nothing to do on
  SQLite, whose writers already take turns) — for check-then-write code that
  relied on that, such as the pacing count or first-boot seeding;
- ``insert_blob(conn, sql, params, table, column)``: an INSERT whose last
  parameter is a body; SQLite streams a large one through its blob API,
  PostgreSQL binds the bytes;
- ``for_share(conn)``: the clause that keeps a read row unchanged until
  the transaction ends;
- ``pipelined(conn)``: inside a transaction, let the ``executemany`` calls
  of a block share one round trip (PostgreSQL's pipeline mode; nothing on
  SQLite);
- ``conn.insert_rows(sql, rows)``: ``executemany`` of a plain
  ``INSERT ... VALUES (...)``; SQLite writes the rows with a few multi-row
  statements (each statement step lets go of the GIL, see sqlite.py),
  PostgreSQL with one statement taking an array per column (``unnest``);
- ``is_database_error(exc)``: either driver's errors.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, Iterator, Protocol, Sequence

from .. import files
from .sqlite import RelayConnection, SqliteDatabase, StoreInUse, WriteLock, connect  # noqa: F401

if TYPE_CHECKING:
    from ..config import Settings


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the store modules may use of a connection, on either backend."""

    dialect: str
    for_share: str

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    def transaction(self, durable: bool = True, pipelined: bool = False) -> ContextManager[Any]: ...

    def exclusive(self) -> ContextManager[None]: ...

    def take_turn(self, name: str) -> None: ...

    def insert_blob(self, sql: str, params: Sequence[Any], table: str, column: str) -> None: ...

    def insert_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def pipeline(self) -> ContextManager[Any]: ...

    def written_yet(self) -> bool: ...

    def close(self) -> None: ...


class Database(Protocol):
    """Where the store lives; hands out connections (one per thread, kept by ``Store``)."""

    dialect: str

    @property
    def path(self) -> Path | None: ...  # relay.db, or None for PostgreSQL

    def describe(self) -> str: ...

    def connect(self) -> Any: ...

    def close(self) -> None: ...


def open_database(settings: "Settings") -> Database:
    """PostgreSQL when RELAY_DATABASE_URL is set, else relay.db in the data directory."""
    if settings.database_url:
        from .postgres import PostgresDatabase  # psycopg is imported only by those who use it
        return PostgresDatabase(str(settings.database_url), max_size=settings.worker_threads + 4)
    files.private_dir(settings.data_dir)  # 0700 when created here; an existing one is left as is
    files.private_database(settings.db_path)  # 0600, and so its -wal and -shm
    return SqliteDatabase(settings.db_path)


def transaction(conn: Any, durable: bool = True, pipelined: bool = False) -> ContextManager[Any]:
    """A write transaction, committed on success and rolled back on error.

    ``pipelined``: on PostgreSQL the whole transaction is one pipeline: BEGIN
    goes with its first ``execute`` (which waits for its answer, as every
    ``execute`` does), ``executemany`` and ``insert_rows`` wait for nothing,
    and COMMIT goes with whatever followed the last ``execute``; an error in
    those surfaces when the block ends. A transaction that reads, then
    writes, costs two round trips.
    """
    return conn.transaction(durable, pipelined)  # type: ignore[no-any-return]


def write_lock(conn: Any) -> ContextManager[None]:
    """The SQLite writer lock (a no-op on PostgreSQL); ``transaction`` takes it itself."""
    return conn.exclusive()  # type: ignore[no-any-return]


def serialize(conn: Any, name: str) -> None:
    """Inside a transaction: one transaction at a time past this point, per ``name``."""
    conn.take_turn(name)


def insert_blob(conn: Any, sql: str, params: Sequence[Any], table: str, column: str) -> None:
    """Run an INSERT whose last parameter is the (possibly large) blob for ``table.column``."""
    conn.insert_blob(sql, params, table, column)


def for_share(conn: Any) -> str:
    """The clause that keeps the rows a SELECT reads as they were read until the transaction ends
    (a writer changing one waits for it; one that changed it first makes it read the change): FOR
    SHARE on PostgreSQL, nothing on SQLite, where a write transaction excludes every other writer."""
    return str(conn.for_share)


def written_yet(conn: Any) -> bool:
    """Whether the open transaction has written a row yet (on PostgreSQL: or locked one)."""
    return bool(conn.written_yet())


def pipelined(conn: Any) -> ContextManager[Any]:
    """Inside a transaction: the block's ``executemany`` calls in one round trip where that helps."""
    return conn.pipeline()  # type: ignore[no-any-return]


def is_database_error(exc: BaseException) -> bool:
    """An error from the database driver (either backend), as opposed to a bug."""
    if isinstance(exc, sqlite3.Error):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)
