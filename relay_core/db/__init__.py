"""The store's database layer: one interface, two backends (SQLite, PostgreSQL).

Store modules write every SQL text once for both backends (``?`` placeholders,
``ON CONFLICT``, ``RETURNING``); the few operations whose SQL or cost differs
are the functions below, implemented in ``sqlite.py`` and ``postgres.py``.
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

    def serialize(self, name: str) -> None: ...

    def insert_blob(self, sql: str, params: Sequence[Any], table: str, column: str) -> None: ...

    def insert_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def pipelined(self) -> ContextManager[Any]: ...

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

    ``durable=False``: for writes whose loss to a power cut repeats work but
    loses no mail (a claim). ``pipelined``: on PostgreSQL only the ``execute``
    calls wait for an answer; the rest travel with the COMMIT, and their
    errors surface when the block ends.
    """
    return conn.transaction(durable, pipelined)  # type: ignore[no-any-return]


def write_lock(conn: Any) -> ContextManager[None]:
    """The SQLite writer lock (a no-op on PostgreSQL); ``transaction`` takes it itself."""
    return conn.exclusive()  # type: ignore[no-any-return]


def serialize(conn: Any, name: str) -> None:
    """Inside a transaction: one transaction at a time past this point, per ``name``, for
    check-then-write code (the pacing count, first-boot seeding)."""
    conn.serialize(name)


def insert_blob(conn: Any, sql: str, params: Sequence[Any], table: str, column: str) -> None:
    """An INSERT whose last parameter is a body: SQLite streams a large one through its blob API."""
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
    return conn.pipelined()  # type: ignore[no-any-return]


def is_database_error(exc: BaseException) -> bool:
    """An error from the database driver (either backend), as opposed to a bug."""
    if isinstance(exc, sqlite3.Error):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)
