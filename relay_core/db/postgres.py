"""The PostgreSQL backend (``RELAY_DATABASE_URL=postgresql://...``): psycopg 3 and a pool.

A pooled connection is borrowed for one statement or one transaction, so the
number of server connections follows the work in flight, not the threads.
Durability as on SQLite: ``synchronous_commit = on`` on every connection,
whatever the server's default. No process-wide write lock: MVCC and row
locks order writers, and ``serialize(name)`` is an advisory lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import select
import threading
import urllib.parse
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import psycopg
from psycopg import pq
from psycopg.adapt import Loader
import psycopg_pool.base
from psycopg_pool import ConnectionPool

from ..config import ConfigError

CONNECT_TIMEOUT = 10
POOL_TIMEOUT = 5.0  # how long a caller waits for a connection (the server down: then an error)
_TRANSLATIONS: dict[str, str] = {}
_TRANSLATIONS_LOCK = threading.Lock()

# While the server is down, the pool tries to reconnect on a schedule of its own that waits
# twice as long after each failure (1, 2, 4, 8 ... s): after an outage of a minute its next try
# could come half a minute after the server was back, every caller getting "store unavailable"
# meanwhile. A try a second for each connection lost is nothing the server needs sparing from; the
# relay is back within a second of the database. (The class attribute is the pool's own knob,
# since psycopg_pool 3.2.1; a release without it keeps its own schedule rather than fail here, and
# tests/core/test_backends.py's outage test says so.)
if hasattr(psycopg_pool.base, "AttemptWithBackoff"):
    psycopg_pool.base.AttemptWithBackoff.DELAY_BACKOFF = 1.0


def mask_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = userinfo.split(":", 1)[0] + ":***@" + host
    query = "&".join(
        f"{k}=***" if k == "password" else f"{k}={v}"
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def translate(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s``; a literal ``%`` doubled (psycopg parses every one).

    A ``?`` inside a quoted string, a quoted identifier or a ``--`` comment is left alone.
    """
    cached = _TRANSLATIONS.get(sql)
    if cached is not None:
        return cached
    out: list[str] = []
    quote: str | None = None
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "%":
            out.append("%%")
        elif quote is not None:
            out.append(ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
            continue
        elif ch == "?":
            out.append("%s")
        else:
            out.append(ch)
        i += 1
    result = "".join(out)
    with _TRANSLATIONS_LOCK:
        if len(_TRANSLATIONS) > 4096:  # only dynamic SQL could grow it this far
            _TRANSLATIONS.clear()
        _TRANSLATIONS[sql] = result
    return result


# insert_rows' statements: an INSERT whose VALUES are placeholders or plain literals (no parentheses).
_INSERT_VALUES = re.compile(r"\s*INSERT INTO (\w+) \(([^()]*)\) VALUES \(([^()]*)\)(.*)", re.DOTALL)
_FLOAT_TYPES = ("double precision", "real")
_LITERAL = re.compile(r"'[^',%?]*'|-?\d+(\.\d+)?|NULL", re.IGNORECASE)  # what a VALUES may hold beside ?


def _names(listed: str) -> list[str]:
    return [name.strip() for name in listed.split(",")]


def unnest_insert(sql: str, types: dict[str, str]) -> tuple[str, list[int]] | None:
    """``sql`` (``INSERT ... VALUES (?, 'x', ?)``) as ``INSERT ... SELECT u.p0, 'x', u.p1 FROM
    unnest(%b::text[], ...)``, and which parameters are floats; None for a shape it does not know.
    Binary (``%b``) because in text every body would be hex-escaped."""
    match = _INSERT_VALUES.fullmatch(sql)
    if match is None:
        return None
    table, listed, values, rest = match.groups()
    names, given = _names(listed), _names(values)
    if (len(names) != len(given) or "?" in rest  # (a placeholder after VALUES: another row, or an upsert's)
            or any(value != "?" and not _LITERAL.fullmatch(value) for value in given)
            or any(value == "?" and name not in types for name, value in zip(names, given))):
        return None
    picks: list[str] = []
    arrays: list[str] = []
    floats: list[int] = []
    for name, value in zip(names, given):
        if value != "?":
            picks.append(value)
            continue
        if types[name] in _FLOAT_TYPES:
            floats.append(len(arrays))
        picks.append(f"u.p{len(arrays)}")
        arrays.append(f"%b::{types[name]}[]")
    aliases = ", ".join(f"p{i}" for i in range(len(arrays)))
    return (f"INSERT INTO {table} ({listed}) SELECT {', '.join(picks)} FROM unnest({', '.join(arrays)})"
            f" AS u({aliases}){translate(rest)}", floats)


class Row(tuple):  # type: ignore[type-arg]
    """A result row readable by index and by column name, like ``sqlite3.Row``."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                key = self._index[key]
            except KeyError:
                raise IndexError(f"no column named {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_index": {name: i for i, name in enumerate(names)}})


def _row_factory(cursor: Any) -> Any:
    description = cursor.description
    if description is None:
        return tuple
    return _row_class(tuple(column.name for column in description))


class _NumericLoader(Loader):
    """NUMERIC (what SUM of a BIGINT column returns) as int or float, as SQLite gives, not Decimal."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        try:
            return int(text)
        except ValueError:
            return float(text)


def _advisory_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


class Result:
    """What ``execute`` returns: the rows already fetched, and the affected-row count."""

    __slots__ = ("_rows", "_pos", "rowcount", "description")

    def __init__(self, rows: list[Any], rowcount: int, description: Any) -> None:
        self._rows, self._pos, self.rowcount, self.description = rows, 0, rowcount, description

    def fetchone(self) -> Any:
        if self._pos >= len(self._rows):
            return None
        self._pos += 1
        return self._rows[self._pos - 1]

    def fetchall(self) -> list[Any]:
        rest, self._pos = self._rows[self._pos:], len(self._rows)
        return rest

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


def _run(raw: psycopg.Connection[Any], query: str, params: Sequence[Any],
         sync: Callable[[], None] | None = None) -> Result:
    cur = raw.execute(query, params)  # type: ignore[call-overload]
    if sync is not None:  # in a pipelined transaction: its answer, and what was queued before it
        sync()
    rows = cur.fetchall() if cur.description is not None else []
    result = Result(rows, cur.rowcount, cur.description)
    cur.close()
    return result


class PgConnection:
    """One thread's handle on the pool, with the sqlite3-like surface the store modules use."""

    dialect = "postgresql"
    for_share = " FOR SHARE"  # (db.for_share)

    def __init__(self, database: "PostgresDatabase") -> None:
        self._database = database
        self._raw: psycopg.Connection[Any] | None = None
        self._sync: Callable[[], None] | None = None  # in a pipelined transaction

    @classmethod
    def pinned(cls, raw: psycopg.Connection[Any]) -> "PgConnection":
        conn = cls.__new__(cls)
        conn._database, conn._raw, conn._sync = None, raw, None  # type: ignore[assignment]
        return conn

    @property
    def in_transaction(self) -> bool:
        return self._raw is not None and self._raw.info.transaction_status != pq.TransactionStatus.IDLE

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        query = translate(sql)
        if self._raw is not None:
            return _run(self._raw, query, params, self._sync)
        for attempt in (1, 2):
            with self._database.borrowed() as raw:
                try:
                    return _run(raw, query, params)
                except psycopg.OperationalError:
                    # A pooled connection the server closed (a restart): a read may run again
                    # on a fresh one; a write may already have happened, so it is not repeated.
                    if attempt == 2 or not raw.broken or not query.lstrip()[:6].upper() == "SELECT":
                        raise
        raise AssertionError("unreachable")

    def pipelined(self) -> ContextManager[Any]:
        if self._raw is None or self._raw.pgconn.pipeline_status != pq.PipelineStatus.OFF:
            return contextlib.nullcontext()  # (a block inside another: the outer one sends it all)
        return self._raw.pipeline()

    def executemany(self, sql: str, seq_of_params: Iterable[Sequence[Any]]) -> Result:
        query, rows = translate(sql), list(seq_of_params)
        with self._borrow() as raw:
            if not rows:
                return Result([], 0, None)
            cur = raw.cursor()
            cur.executemany(query, rows)  # type: ignore[call-overload]
            result = Result([], cur.rowcount, None)
            cur.close()
            return result

    @contextmanager
    def _borrow(self) -> Iterator[psycopg.Connection[Any]]:
        if self._raw is not None:
            yield self._raw
            return
        with self._database.borrowed() as raw:
            yield raw

    @contextmanager
    def transaction(self, durable: bool = True, pipelined: bool = False) -> Iterator["PgConnection"]:
        if self._raw is not None:
            raise RuntimeError("a transaction is already open on this connection")
        if pipelined:
            with self._pipelined_transaction(durable):
                yield self
            return
        pool = self._database.pool
        raw = self._database.live_connection()
        try:
            raw.execute("BEGIN")
        except psycopg.OperationalError:
            pool.putconn(raw)
            if not raw.broken:
                raise
            raw = pool.getconn()  # the server dropped that one; nothing ran yet, so try one more
            try:
                raw.execute("BEGIN")
            except BaseException:
                pool.putconn(raw)
                raise
        self._raw = raw
        try:
            if not durable:
                raw.execute("SET LOCAL synchronous_commit = off")
            try:
                yield self
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")
        finally:
            self._raw = None
            pool.putconn(raw)

    @contextmanager
    def _pipelined_transaction(self, durable: bool) -> Iterator[None]:
        with self._database.borrowed() as raw:
            try:
                with raw.pipeline() as pipeline:
                    raw.execute("BEGIN")
                    if not durable:
                        raw.execute("SET LOCAL synchronous_commit = off")
                    self._raw, self._sync = raw, pipeline.sync
                    yield
                    raw.execute("COMMIT")  # sent, with what is still queued, as the pipeline ends
            except BaseException:
                if raw.info.transaction_status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
                    with contextlib.suppress(psycopg.Error):
                        raw.execute("ROLLBACK")  # (a failed statement skipped the COMMIT queued after it)
                raise
            finally:
                self._raw, self._sync = None, None

    def written_yet(self) -> bool:
        """A transaction gets its id at its first row written or locked."""
        if self._raw is None:
            raise RuntimeError("written_yet() needs an open transaction")
        return bool(self.execute("SELECT txid_current_if_assigned() IS NOT NULL").fetchone()[0])

    def exclusive(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def serialize(self, name: str) -> None:
        """Wait for, then hold until this transaction ends, the lock called ``name``."""
        if self._raw is None:
            raise RuntimeError("serialize() needs an open transaction")
        self._raw.execute("SELECT pg_advisory_xact_lock(%s)", (_advisory_key(name),))

    def insert_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for all rows (``unnest_insert``): psycopg's ``executemany`` makes each row
        a statement, a socket write each. Rows must not share an ``ON CONFLICT`` key."""
        form = self._database.unnest_form(sql) if len(rows) > 1 and self._database is not None else None
        if form is None:
            self.executemany(sql, rows)  # (inside ``pipeline``, still one round trip for the block)
            return
        statement, floats = form
        columns = [list(column) for column in zip(*rows)]
        for index in floats:  # an array holds one type: the ints of a float column become floats
            columns[index] = [None if value is None else float(value) for value in columns[index]]
        with self._borrow() as raw:
            raw.execute(statement, columns)  # type: ignore[call-overload]

    def insert_blob(self, sql: str, params: Sequence[Any], table: str, column: str) -> None:
        # psycopg sends bytes as they are: nothing to stream
        self.execute(sql, params)

    def close(self) -> None:
        """Nothing is held between statements; the pool closes with the database."""


def _hung_up(raw: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection's server has closed it: something waits to be read (an idle
    connection is sent nothing else but the odd notice) and reading it finds the end."""
    if raw.closed or raw.broken:
        return True
    waiting = select.poll()  # (not select(): a busy process's descriptors go past 1024)
    waiting.register(raw.fileno(), select.POLLIN)
    for _ in range(3):  # the server's last words ("terminating connection ..."), then the end
        if not waiting.poll(0):
            return False
        try:
            raw.pgconn.consume_input()  # (a notice stays buffered for psycopg to read as usual)
        except psycopg.OperationalError:
            return True
        if raw.pgconn.status != pq.ConnStatus.OK:
            return True
    return False


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.adapters.register_loader("numeric", _NumericLoader)
    # Commit waits for the WAL flush, whatever the server's default: the 202 depends on it.
    conn.execute("SET synchronous_commit = on")
    conn.execute("SET application_name = 'tspro-relay'")


def connect_once(url: str) -> psycopg.Connection[Any]:
    try:
        conn = psycopg.connect(url, autocommit=True, row_factory=_row_factory, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise ConfigError(f"Cannot connect to the PostgreSQL database {mask_url(url)}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    _configure(conn)
    return conn


class PostgresDatabase:
    """A PostgreSQL store of record: one pool per process."""

    dialect = "postgresql"
    path = None

    def __init__(self, url: str, max_size: int = 12) -> None:
        self.url = url
        connect_once(url).close()  # a wrong URL or password fails here, in one sentence
        self.pool: ConnectionPool[Any] = ConnectionPool(
            url, min_size=1, max_size=max(2, max_size), open=True, configure=_configure,
            kwargs={"autocommit": True, "row_factory": _row_factory, "connect_timeout": CONNECT_TIMEOUT},
            timeout=POOL_TIMEOUT, name="tspro-relay",
        )
        self._unnest_forms: dict[str, tuple[str, list[int]] | None] = {}

    def describe(self) -> str:
        return f"the PostgreSQL database {mask_url(self.url)}"

    def unnest_form(self, sql: str) -> tuple[str, list[int]] | None:
        """``unnest_insert(sql, ...)`` with the table's column types, read once per statement text."""
        if sql not in self._unnest_forms:
            match = _INSERT_VALUES.fullmatch(sql)
            types: dict[str, str] = {}
            if match is not None:
                with self.borrowed() as raw:
                    types = {row[0]: row[1] for row in raw.execute(
                        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped", (match[1],))}
                if not types:
                    return None  # no such table (yet): executemany says so; asked again next time
            self._unnest_forms[sql] = unnest_insert(sql, types)
        return self._unnest_forms[sql]

    def connect(self) -> PgConnection:
        return PgConnection(self)

    def live_connection(self) -> psycopg.Connection[Any]:
        """A pooled connection the server has not closed, checked without a round trip: after a
        PostgreSQL restart the first transaction then runs on a live one instead of failing."""
        for _ in range(self.pool.max_size):
            raw = self.pool.getconn()
            try:
                dead = _hung_up(raw)
            except BaseException:
                self.pool.putconn(raw)
                raise
            if not dead:
                return raw
            self.pool.putconn(raw)  # broken: the pool discards it
        return self.pool.getconn()  # (a new one by now; if not, the transaction says so itself)

    @contextmanager
    def borrowed(self) -> Iterator[psycopg.Connection[Any]]:
        raw = self.live_connection()
        try:
            yield raw
        finally:
            self.pool.putconn(raw)

    def close(self) -> None:
        self.pool.close()

