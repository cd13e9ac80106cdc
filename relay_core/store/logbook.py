"""The transaction log as admins read it: filters, pages, search, counters, export, clearing.

The log grows to a million rows (``log_max_rows``), so nothing here reads the
whole table to answer a page. Each row gets a ``kind`` when written, indexed as
(kind, id), so a filtered page is an index range; pages are keyset pages by id,
so page 500 costs what page 1 does. ``log_counts`` keeps rows per hour and kind,
in the same transaction as every insert, prune and clear, so counters and the
chart add up a few thousand numbers instead of counting rows. Search is
word-prefix search over ``terms`` (the searchable fields cut into words by one
Python function, so both backends see the same words): FTS5 on SQLite, a GIN
index on PostgreSQL; LIKE '%x%' would read every row. A time range becomes a
range of ids first (ids grow with time, see ``CLOCK_SKEW``).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from .audit import insert_audit
from ..db import Connection, serialize, transaction
from .part import Part

# What the status filter offers, in this order, with the words the pages use.
KINDS = {
    "accepted": "Accepted", "sent": "Sent", "partial": "Partly sent", "deferred": "Deferred",
    "failed": "Failed", "rejected": "Rejected", "unauthorized": "Unauthorized",
    "rate_limited": "Rate limited", "retried": "Retried", "cancelled": "Cancelled", "cleared": "Log cleared",
}
ATTEMPT_KINDS = ("sent", "partial", "deferred", "failed")
HOUR = 3600
# How far a row's time may run ahead of a row committed after it (the time is
# taken before the commit that gives the id). A time range is widened by this
# much when it is turned into ids, so no row inside the range is missed.
CLOCK_SKEW = 3600.0
MAX_QUERY_WORDS = 8
WALK_SECONDS = 0.12  # how long a prefix search walks the log before asking the index (Logbook._select)
MAX_TERMS = 4000
_WORD = re.compile(r"[^\W_]+")


def log_kind(event: str, status: str, code: int | None) -> str:
    if event == "attempt":
        return status
    if event == "rejected":
        return "rate_limited" if code == 429 else "rejected"
    return {"accepted": "accepted", "unauthorized": "unauthorized", "retry": "retried",
            "cancel": "cancelled", "cleared": "cleared"}.get(event, status)


def search_terms(*texts: str) -> str:
    """The words a row can be found by: lower case, letters and digits, each once, in order."""
    # One pass over the texts joined by a space (which no word contains).
    return " ".join(dict.fromkeys(_WORD.findall(" ".join(filter(None, texts)).lower())))[:MAX_TERMS]


def query_words(query: str) -> list[str]:
    return _WORD.findall(query.lower())[:MAX_QUERY_WORDS]


def hour_of(ts: float) -> int:
    return int(ts // HOUR)


def _tighter(pick: Any, *bounds: int | None) -> int | None:
    given = [b for b in bounds if b is not None]
    return int(pick(given)) if given else None


def _dialect(conn: Any) -> str:
    return str(getattr(conn, "dialect", "sqlite"))


@dataclass
class LogEntry:
    event: str
    status: str
    message_id: str | None = None
    stage: str | None = None
    code: int | None = None
    detail: str = ""
    duration_ms: int | None = None
    source_ip: str | None = None
    sender: str = ""
    recipients: str = ""
    subject: str = ""
    ts: float = field(default_factory=time.time)
    attachments: int | None = None


def insert_log(conn: Connection, entry: LogEntry) -> int:
    """Write one log row, counted and searchable in the same transaction (below); its id."""
    kind = log_kind(entry.event, entry.status, entry.code)
    terms = search_terms(entry.message_id or "", entry.sender, entry.recipients, entry.subject)
    log_id = int(conn.execute(
        "INSERT INTO log (ts, event, message_id, status, stage, code, detail, duration_ms,"
        " source_ip, sender, recipients, subject, attachments, kind, terms)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
        (entry.ts, entry.event, entry.message_id, entry.status, entry.stage, entry.code,
         entry.detail, entry.duration_ms, entry.source_ip, entry.sender, entry.recipients,
         entry.subject, entry.attachments, kind, terms),
    ).fetchone()[0])
    count_log_row(conn, log_id, kind, entry.ts, terms)
    return log_id


# -- kept in step with every write (called by the ledger inside its transactions) ------------------
def count_log_row(conn: Any, log_id: int, kind: str, ts: float, terms: str) -> None:
    conn.execute("INSERT INTO log_counts (hour, kind, n) VALUES (?, ?, 1) ON CONFLICT (hour, kind)"
                 " DO UPDATE SET n = log_counts.n + 1", (hour_of(ts), kind))
    if _dialect(conn) == "sqlite":  # every row, even one without words: FTS5 counts its rows
        conn.execute("INSERT INTO log_fts (rowid, terms) VALUES (?, ?)", (log_id, terms))


def next_log_id(conn: Any) -> int | None:
    """Inside a write transaction, on SQLite: the id the next log row will get (None on PostgreSQL).

    A new rowid is one more than the largest, so rows inserted after this
    (under the same write lock) are exactly those with an id from here on.
    """
    if _dialect(conn) != "sqlite":
        return None
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM log").fetchone()[0])


def count_log_rows(conn: Any, rows: list[tuple[str, float]], first_id: int | None) -> None:
    """``count_log_row`` for the rows just inserted (kind, ts each), from ``next_log_id``'s id on:
    one upsert per hour and kind, and on SQLite one statement indexing them all.

    (On PostgreSQL the search index is kept by PostgreSQL itself.)
    """
    counts = Counter((hour_of(ts), kind) for kind, ts in rows)
    conn.executemany("INSERT INTO log_counts (hour, kind, n) VALUES (?, ?, ?) ON CONFLICT (hour, kind)"
                     " DO UPDATE SET n = log_counts.n + excluded.n",
                     [(hour, kind, n) for (hour, kind), n in sorted(counts.items())])
    if _dialect(conn) == "sqlite" and first_id is not None:  # every row, as count_log_row does
        conn.execute("INSERT INTO log_fts (rowid, terms) SELECT id, terms FROM log WHERE id >= ?", (first_id,))


def forget_log_rows(conn: Any, where: str, params: tuple[Any, ...]) -> None:
    """Rows matching ``where`` are about to be deleted: take them out of the counts and the search index.

    Reads only the rows being deleted (a prune's oldest rows), never the rest.
    """
    # A row without a kind was never counted nor indexed (written by an older relay, and not yet
    # reached by ``backfill``): there is nothing to take back.
    counts: Counter[tuple[int, str]] = Counter()
    for ts, kind in conn.execute(f"SELECT ts, kind FROM log WHERE {where} AND kind <> ''", params):
        counts[(hour_of(ts), kind)] += 1
    if not counts:
        return
    conn.executemany("UPDATE log_counts SET n = n - ? WHERE hour = ? AND kind = ?",
                     [(n, hour, kind) for (hour, kind), n in counts.items()])
    conn.execute("DELETE FROM log_counts WHERE n <= 0")
    if _dialect(conn) == "sqlite":
        # An external-content FTS5 row is removed by repeating what was indexed.
        conn.execute(f"INSERT INTO log_fts (log_fts, rowid, terms) SELECT 'delete', id, terms FROM log"
                     f" WHERE {where} AND kind <> ''", params)


def backfill(conn: Any, batch: int = 5000) -> int:
    """Fill kind, terms, the counts and the search index for rows written before they existed.

    Runs once, after the migration that added them (rows written since have
    them); each batch in its own transaction. Returns how many rows it filled.
    """
    done = 0
    while True:
        with transaction(conn):
            # Every process runs this at start-up: on PostgreSQL two could read the same rows
            # and count them twice. One at a time, the second finds them filled.
            serialize(conn, "tspro-relay log backfill")
            rows = conn.execute("SELECT id, ts, event, status, code, sender, recipients, subject FROM log"
                                " WHERE kind = '' ORDER BY id LIMIT ?", (batch,)).fetchall()
            for row in rows:
                kind = log_kind(row[2], row[3], row[4])
                terms = search_terms(row[5], row[6], row[7])
                conn.execute("UPDATE log SET kind = ?, terms = ? WHERE id = ?", (kind, terms, row[0]))
                count_log_row(conn, row[0], kind, row[1], terms)
        done += len(rows)
        if len(rows) < batch:
            return done


_WORD_LIKE = "(' ' || log.terms || ' ') LIKE ?"


def _word_pattern(word: str, prefix: bool) -> str:
    return f"% {word}%" if prefix else f"% {word} %"


def _query(source: str, key: str, match: list[str], match_params: list[Any], flt: "LogFilter",
           lower: int | None, upper: int | None, newest_first: bool, limit: int) -> tuple[str, list[Any]]:
    where, params = list(match), list(match_params)
    if flt.kind:
        where.append("log.kind = ?")
        params.append(flt.kind)
    if lower is not None:
        where.append(f"{key} > ?")
        params.append(lower)
    if upper is not None:
        where.append(f"{key} < ?")
        params.append(upper)
    # The unary + keeps SQLite from walking the ts index and sorting the range by id.
    if flt.since is not None:
        where.append("+log.ts >= ?")
        params.append(flt.since)
    if flt.until is not None:
        where.append("+log.ts < ?")
        params.append(flt.until)
    sql = (f"SELECT {_COLUMNS} FROM {source}" + (f" WHERE {' AND '.join(where)}" if where else "")
           + f" ORDER BY {key} {'DESC' if newest_first else 'ASC'} LIMIT ?")
    return sql, [*params, limit]


# -- reading ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogRow:
    id: int
    ts: float
    kind: str
    event: str
    status: str
    message_id: str | None
    stage: str | None
    code: int | None
    detail: str
    duration_ms: int | None
    source_ip: str | None
    sender: str
    recipients: str
    subject: str
    attachments: int | None


_COLUMNS = ("log.id, log.ts, log.kind, log.event, log.status, log.message_id, log.stage, log.code, log.detail,"
            " log.duration_ms, log.source_ip, log.sender, log.recipients, log.subject, log.attachments")


def _row(r: Any) -> LogRow:
    return LogRow(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8] or "", r[9], r[10],
                  r[11] or "", r[12] or "", r[13] or "", r[14])


@dataclass(frozen=True)
class LogFilter:
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    words: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.kind or self.since is not None or self.until is not None or self.words)


@dataclass
class LogPage:
    rows: list[LogRow]
    older: int | None = None  # pass as ``before`` for the next older page
    newer: int | None = None  # pass as ``after`` for the next newer page


@dataclass
class LogCounters:
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __getitem__(self, kind: str) -> int:
        return self.by_kind.get(kind, 0)


@dataclass(frozen=True)
class AttemptFact:
    """One recorded delivery attempt, as the health check reads it."""

    at: float
    message_id: str | None
    status: str
    stage: str | None
    code: int | None
    detail: str


@dataclass(frozen=True)
class LoggedRow:
    """One transaction-log row, as `tspro-relay log` prints it."""

    id: int
    ts: float
    event: str
    message_id: str | None
    status: str
    stage: str | None
    code: int | None
    detail: str
    sender: str
    recipients: str
    subject: str


class Logbook(Part):
    def write(self, entry: LogEntry) -> None:
        conn = self.conn()
        with transaction(conn):
            insert_log(conn, entry)

    # -- pages --------------------------------------------------------------------------------------
    def _id_bounds(self, flt: LogFilter) -> tuple[int | None, int | None]:
        """Ids bracketing the time range (exclusive): every row inside it lies strictly between."""
        conn = self.conn()
        low = high = None
        if flt.since is not None:
            row = conn.execute("SELECT id FROM log WHERE ts < ? ORDER BY ts DESC LIMIT 1",
                               (flt.since - CLOCK_SKEW,)).fetchone()
            low = int(row[0]) if row else None
        if flt.until is not None:
            row = conn.execute("SELECT id FROM log WHERE ts >= ? ORDER BY ts LIMIT 1",
                               (flt.until + CLOCK_SKEW,)).fetchone()
            high = int(row[0]) if row else None
        return low, high

    def _word_matches(self, words: tuple[str, ...]) -> list[tuple[str, bool]]:
        """Each word, and whether it is matched as the start of words (True) or as a whole word.

        A word found whole in the log is matched whole ("org", "password"); one
        that is not is taken as the start of words ("passw", "member47"). Both
        indexes answer a whole word by walking its list of rows newest first and
        stopping after a page; a prefix first gathers the rows of every word it
        starts, which for a word as common as "org" is most of the log.
        """
        conn = self.conn()
        sqlite = _dialect(conn) == "sqlite"
        common = frozenset() if sqlite else self._pg_common_words()
        found = []
        for word in words:
            if len(word) < 3 or word in common:
                found.append((word, False))
                continue
            if sqlite:
                whole = conn.execute("SELECT rowid FROM log_fts WHERE log_fts MATCH ? LIMIT 1",
                                     (f'"{word}"',)).fetchone()
            else:
                with transaction(conn, durable=False):
                    # Not among the common words, so its list of rows is short: read it from the
                    # GIN index. Left alone, the planner guesses a match within the first rows it
                    # reads and scans the whole table for a word that is not there.
                    conn.execute("SET LOCAL enable_seqscan = off")
                    whole = conn.execute("SELECT 1 FROM log WHERE to_tsvector('simple', terms) @@"
                                         " to_tsquery('simple', ?) LIMIT 1", (word,)).fetchone()
            found.append((word, whole is None))
        return found

    def _pg_common_words(self) -> frozenset[str]:
        """The words PostgreSQL's statistics list as the log's most common (re-read each minute).

        A common word's rows are dense, so a page is found by walking the log newest
        first; any other word's rows are few, so they are read from the GIN index and
        sorted. The planner cannot tell the two apart for a prefix ("member4703:*"),
        and guessed wrong both ways, seconds either time; these statistics can.
        """
        cached: tuple[float, frozenset[str]] | None = getattr(self, "_common_words", None)
        now = time.monotonic()
        if cached is not None and now - cached[0] < 60:
            return cached[1]
        row = self.conn().execute(
            "SELECT most_common_elems::text FROM pg_stats WHERE schemaname = current_schema()"
            " AND tablename = 'log_terms'").fetchone()
        text = (row[0] or "") if row else ""
        words = frozenset(w.strip('"') for w in text.strip("{}").split(",") if w)
        self._common_words = (now, words)
        return words

    def _select(self, flt: LogFilter, lower: int | None, upper: int | None, newest_first: bool,
                limit: int) -> list[LogRow]:
        conn = self.conn()
        low, high = self._id_bounds(flt)
        span = (flt, _tighter(max, lower, low), _tighter(min, upper, high), newest_first, limit)
        if not flt.words:
            return self._run(*_query("log", "log.id", [], [], *span))
        words = self._word_matches(flt.words)
        if any(prefix for _, prefix in words):
            # A prefix may start one rare word or thousands ("mem" starts every member123@), and
            # both indexes gather the rows of all of them before returning the first. Walk the log
            # newest first for a moment instead (a LIKE on the words column, the same on both
            # backends); if that does not fill the page, the matches are few and the index gathers
            # them quickly.
            rows = self._walk(*_query("log", "log.id", [_WORD_LIKE] * len(words),
                                      [_word_pattern(w, p) for w, p in words], *span))
            if rows is not None:
                return rows
        if _dialect(conn) == "sqlite":
            # The search index drives, newest first, and stops after the page.
            match = " AND ".join(f'"{word}"' + ("*" if prefix else "") for word, prefix in words)
            return self._run(*_query("log_fts JOIN log ON log.id = log_fts.rowid", "log_fts.rowid",
                                     ["log_fts MATCH ?"], [match], *span))
        sql, params = _query("log", "log.id", ["to_tsvector('simple', log.terms) @@ to_tsquery('simple', ?)"],
                             [" & ".join(word + (":*" if prefix else "") for word, prefix in words)], *span)
        common = self._pg_common_words()
        if all(word in common for word, _ in words):
            return self._run(sql, params)  # dense rows: the planner walks the log newest first
        with transaction(conn, durable=False):
            # Read the few matching rows from the GIN index and sort them, rather than walk the
            # whole log newest first looking for them (see _pg_common_words).
            conn.execute("SET LOCAL enable_seqscan = off")
            conn.execute("SET LOCAL enable_indexscan = off")
            return self._run(sql, params)

    def _run(self, sql: str, params: list[Any]) -> list[LogRow]:
        return [_row(r) for r in self.conn().execute(sql, params)]

    def _walk(self, sql: str, params: list[Any]) -> list[LogRow] | None:
        conn = self.conn()
        if _dialect(conn) != "sqlite":
            try:
                with transaction(conn, durable=False):
                    conn.execute(f"SET LOCAL statement_timeout = {max(1, round(WALK_SECONDS * 1000))}")
                    # A walk: along an index in id order, never a scan of everything then a sort.
                    for plan in ("seqscan", "bitmapscan", "sort"):
                        conn.execute(f"SET LOCAL enable_{plan} = off")
                    return self._run(sql, params)
            except Exception as exc:
                if getattr(exc, "sqlstate", None) == "57014":  # query_canceled: out of time
                    return None
                raise
        deadline = time.monotonic() + WALK_SECONDS
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 20_000)  # type: ignore[attr-defined]
        try:
            return self._run(sql, params)
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                return None
            raise
        finally:
            conn.set_progress_handler(None, 0)  # type: ignore[attr-defined]

    def page(self, flt: LogFilter, before: int | None = None, after: int | None = None,
             limit: int = 50) -> LogPage:
        """One page, newest first: the newest rows, or those just older than ``before``, or just newer
        than ``after``. ``older``/``newer`` say where the neighbouring pages start (None: no more)."""
        if after is not None:
            rows = self._select(flt, after, None, newest_first=False, limit=limit + 1)
            more_newer = len(rows) > limit
            rows = list(reversed(rows[:limit]))
            return LogPage(rows, older=rows[-1].id if rows else None,
                           newer=rows[0].id if rows and more_newer else None)
        rows = self._select(flt, None, before, newest_first=True, limit=limit + 1)
        more_older = len(rows) > limit
        rows = rows[:limit]
        page = LogPage(rows, older=rows[-1].id if rows and more_older else None)
        if before is not None:
            page.newer = rows[0].id if rows else before - 1
        return page

    def chunks(self, flt: LogFilter, chunk: int = 1000) -> Iterator[list[LogRow]]:
        """Every matching row, newest first, ``chunk`` rows per query (for the CSV export).

        Each chunk is its own short query, so a slow reader holds no transaction open.
        """
        upper: int | None = None
        while True:
            rows = self._select(flt, None, upper, newest_first=True, limit=chunk)
            if rows:
                yield rows
            if len(rows) < chunk:
                return
            upper = rows[-1].id

    def iter_rows(self, flt: LogFilter, chunk: int = 1000) -> Iterator[LogRow]:
        for rows in self.chunks(flt, chunk):
            yield from rows

    def row(self, log_id: int) -> LogRow | None:
        row = self.conn().execute(f"SELECT {_COLUMNS} FROM log WHERE id = ?", (log_id,)).fetchone()
        return _row(row) if row else None

    def of_message(self, message_id: str, limit: int = 500) -> list[LogRow]:
        rows = self.conn().execute(f"SELECT {_COLUMNS} FROM log WHERE message_id = ? ORDER BY id LIMIT ?",
                                   (message_id, limit)).fetchall()
        return [_row(r) for r in rows]

    def last_attempts(self, limit: int = 3, since: float | None = None) -> list[LogRow]:
        """The newest delivery attempts (after ``since``), newest first: a short index walk per outcome.

        One query over every attempt, newest first, would walk the log back past
        all the accepts and rejections of a busy relay that has not delivered
        for a while (paused, say); (kind, id) finds each outcome's newest at once.
        """
        conn = self.conn()
        low, _ = self._id_bounds(LogFilter(since=since))
        found: list[LogRow] = []
        for kind in ATTEMPT_KINDS:
            found += [_row(r) for r in conn.execute(
                f"SELECT {_COLUMNS} FROM log WHERE kind = ? AND id > ? AND +ts > ? ORDER BY id DESC LIMIT ?",
                (kind, low or 0, since if since is not None else -1.0, limit))]
        return sorted(found, key=lambda r: r.id, reverse=True)[:limit]

    def recent_attempts(self, limit: int, since: float = 0.0) -> list[AttemptFact]:
        rows = self.last_attempts(limit, since)
        return [AttemptFact(r.ts, r.message_id, r.status, r.stage, r.code, r.detail) for r in rows]

    def entries(self, *, status: str | None = None, limit: int = 50,
                after_id: int = 0) -> list[LoggedRow]:
        """Transaction-log rows, oldest first: the latest ``limit`` ones, or with ``after_id``
        the next ``limit`` after that row (for following the log)."""
        where, params = ["id > ?"], [after_id]  # type: list[str], list[object]
        if status:
            where.append("status = ?")
            params.append(status)
        order = "ASC" if after_id else "DESC"
        rows = self.conn().execute(
            f"SELECT * FROM log WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT ?",
            (*params, limit)).fetchall()
        if not after_id:
            rows.reverse()
        return [LoggedRow(r["id"], r["ts"], r["event"], r["message_id"], r["status"], r["stage"], r["code"],
                          r["detail"], r["sender"], r["recipients"], r["subject"]) for r in rows]

    # -- counters ------------------------------------------------------------------------------------
    def counters(self, since: float | None = None, until: float | None = None) -> LogCounters:
        """Rows per kind written in [since, until): whole hours from ``log_counts``, the ends counted."""
        conn = self.conn()
        counts: Counter[str] = Counter()
        first_hour = None if since is None else -(-since // HOUR)  # the first whole hour inside
        end_hour = None if until is None else until // HOUR
        if first_hour is not None and end_hour is not None and first_hour >= end_hour:
            self._count_rows(counts, since, until)  # less than two hours: count the rows
            return LogCounters(dict(counts))
        where, params = [], []  # type: list[str], list[Any]
        if first_hour is not None:
            where.append("hour >= ?")
            params.append(int(first_hour))
            self._count_rows(counts, since, first_hour * HOUR)
        if end_hour is not None:
            where.append("hour < ?")
            params.append(int(end_hour))
            self._count_rows(counts, end_hour * HOUR, until)
        sql = "SELECT kind, SUM(n) FROM log_counts" + (f" WHERE {' AND '.join(where)}" if where else "")
        for kind, n in conn.execute(sql + " GROUP BY kind", params):
            counts[kind] += int(n)
        return LogCounters({k: n for k, n in counts.items() if n})

    def _count_rows(self, counts: Counter[str], since: float | None, until: float | None) -> None:
        if since is not None and until is not None and since >= until:
            return
        for kind, n in self.conn().execute("SELECT kind, COUNT(*) FROM log WHERE ts >= ? AND ts < ? GROUP BY kind",
                                           (since, until)):
            counts[kind] += int(n)

    def hourly(self, now: float | None = None, hours: int = 24,
               kinds: tuple[str, ...] = ("sent", "deferred", "failed")) -> list[tuple[int, dict[str, int]]]:
        """(hour start, {kind: rows}) for the last ``hours`` hours, the current one last."""
        now = time.time() if now is None else now
        current = hour_of(now)
        first = current - hours + 1
        marks = ", ".join("?" for _ in kinds)
        table: dict[int, dict[str, int]] = {h: {k: 0 for k in kinds} for h in range(first, current + 1)}
        for hour, kind, n in self.conn().execute(
                f"SELECT hour, kind, n FROM log_counts WHERE hour >= ? AND hour <= ? AND kind IN ({marks})",
                (first, current, *kinds)):
            table[int(hour)][kind] = int(n)
        return [(h * HOUR, table[h]) for h in range(first, current + 1)]

    # -- clearing ---------------------------------------------------------------------------------------
    def clear(self, actor: str, ip: str, now: float | None = None) -> int:
        """Delete every log row; one row says it was cleared, and the audit trail (kept) says by whom."""
        now = time.time() if now is None else now
        conn = self.conn()
        with transaction(conn):
            if _dialect(conn) != "sqlite":
                # Writers wait for the clear (a moment): a row committed between the two DELETEs
                # would stay in the log with its count deleted. (SQLite has one writer anyway.)
                conn.execute("LOCK TABLE log IN EXCLUSIVE MODE")
            removed = int(conn.execute("SELECT COALESCE(SUM(n), 0) FROM log_counts").fetchone()[0])
            if _dialect(conn) == "sqlite":
                conn.execute("INSERT INTO log_fts (log_fts) VALUES ('delete-all')")
            conn.execute("DELETE FROM log")
            conn.execute("DELETE FROM log_counts")
            insert_log(conn, LogEntry("cleared", "cleared", detail="log cleared by admin", source_ip=ip or None,
                                      sender=actor, ts=now))
            insert_audit(conn, actor, ip, "log.clear", f"cleared the transaction log ({removed} rows)", ts=now)
        return removed
