"""Schema migrations for both backends: one ordered list of named steps.

A step's SQL is SQLite DDL, its types mapped for PostgreSQL by ``postgres_ddl``;
a step with no direct twin (a table rebuild) gives ``PerBackend``. Never edit a
step that has landed; append. Two processes starting at once migrate once: the
SQLite write lock or a PostgreSQL advisory lock makes the second wait.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, NamedTuple

from ..logs import fields

logger = logging.getLogger("relay.store")


class PerBackend(NamedTuple):
    """A step's DDL written separately for each backend."""

    sqlite: str
    postgres: str


MIGRATIONS: list[tuple[str, str | PerBackend]] = [
    ("0001_initial", """
        CREATE TABLE schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL);
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE settings (
            name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE admins (
            id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY, label TEXT NOT NULL, lookup TEXT NOT NULL UNIQUE,
            secret TEXT NOT NULL, is_primary INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL, revoked_at REAL);
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL CHECK (status IN
                ('queued', 'sending', 'sent', 'deferred', 'failed', 'cancelled')),
            source TEXT NOT NULL DEFAULT 'api',
            api_key_id INTEGER REFERENCES api_keys(id) ON DELETE SET NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            enqueued_at REAL,
            lease_owner TEXT,
            lease_expires_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            finished_at REAL,
            from_addr TEXT NOT NULL,
            from_name TEXT NOT NULL DEFAULT '',
            envelope_from TEXT NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            message_id_header TEXT NOT NULL,
            size INTEGER NOT NULL,
            body BLOB);
        CREATE INDEX messages_status_due ON messages (status, next_attempt_at);
        CREATE INDEX messages_created ON messages (created_at);
        CREATE TABLE recipients (
            message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            address TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'sent', 'deferred', 'failed', 'cancelled')),
            code INTEGER,
            reply TEXT,
            updated_at REAL,
            PRIMARY KEY (message_id, position));
        CREATE TABLE log (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            event TEXT NOT NULL,
            message_id TEXT,
            status TEXT NOT NULL,
            stage TEXT,
            code INTEGER,
            detail TEXT NOT NULL DEFAULT '',
            duration_ms INTEGER,
            source_ip TEXT,
            sender TEXT NOT NULL DEFAULT '',
            recipients TEXT NOT NULL DEFAULT '',
            subject TEXT NOT NULL DEFAULT '');
        CREATE INDEX log_message ON log (message_id);
        CREATE INDEX log_ts ON log (ts);
        CREATE TABLE idempotency (
            api_key_id INTEGER NOT NULL,
            key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            status INTEGER NOT NULL,
            response TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (api_key_id, key));
        CREATE INDEX idempotency_created ON idempotency (created_at);
        CREATE TABLE workers (
            name TEXT PRIMARY KEY, pid INTEGER, host TEXT,
            started_at REAL NOT NULL, heartbeat_at REAL NOT NULL);
    """),
    ("0002_pacing", """
        CREATE TABLE pacing (id INTEGER PRIMARY KEY, ts REAL NOT NULL);
        CREATE INDEX pacing_ts ON pacing (ts);
    """),
    ("0003_claims", """
        ALTER TABLE messages ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
    """),
    ("0004_admin_ui", """
        ALTER TABLE admins ADD COLUMN must_change INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE api_keys ADD COLUMN last_used_at REAL;
        CREATE TABLE admin_sessions (
            id_hash TEXT PRIMARY KEY,
            admin_id INTEGER NOT NULL REFERENCES admins(id) ON DELETE CASCADE,
            created_at REAL NOT NULL, last_seen REAL NOT NULL,
            ip TEXT NOT NULL DEFAULT '', user_agent TEXT NOT NULL DEFAULT '');
        CREATE INDEX admin_sessions_admin ON admin_sessions (admin_id);
        CREATE INDEX admin_sessions_seen ON admin_sessions (last_seen);
        CREATE TABLE login_failures (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, ip TEXT NOT NULL, username TEXT NOT NULL);
        CREATE INDEX login_failures_ip ON login_failures (ip, ts);
        CREATE INDEX login_failures_user ON login_failures (username, ts);
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, actor TEXT NOT NULL, ip TEXT NOT NULL DEFAULT '',
            action TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
        CREATE INDEX audit_ts ON audit (ts);
    """),
    # 'partial' joins the message states. SQLite cannot alter a CHECK, so there the
    # table is rebuilt (create, copy, drop, rename, re-index) with foreign keys off:
    # with them on, dropping messages would cascade into recipients.
    ("0005_partial_and_recipient_kind", PerBackend(sqlite="""
        CREATE TABLE messages_new (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL CHECK (status IN
                ('queued', 'sending', 'sent', 'partial', 'deferred', 'failed', 'cancelled')),
            source TEXT NOT NULL DEFAULT 'api',
            api_key_id INTEGER REFERENCES api_keys(id) ON DELETE SET NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            enqueued_at REAL,
            lease_owner TEXT,
            lease_expires_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            finished_at REAL,
            from_addr TEXT NOT NULL,
            from_name TEXT NOT NULL DEFAULT '',
            envelope_from TEXT NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            message_id_header TEXT NOT NULL,
            size INTEGER NOT NULL,
            body BLOB,
            claims INTEGER NOT NULL DEFAULT 0);
        INSERT INTO messages_new (id, status, source, api_key_id, created_at, updated_at, next_attempt_at,
            enqueued_at, lease_owner, lease_expires_at, attempts, last_error, finished_at, from_addr,
            from_name, envelope_from, subject, message_id_header, size, body, claims)
        SELECT id, status, source, api_key_id, created_at, updated_at, next_attempt_at,
            enqueued_at, lease_owner, lease_expires_at, attempts, last_error, finished_at, from_addr,
            from_name, envelope_from, subject, message_id_header, size, body, claims FROM messages;
        DROP TABLE messages;
        ALTER TABLE messages_new RENAME TO messages;
        CREATE INDEX messages_status_due ON messages (status, next_attempt_at);
        CREATE INDEX messages_created ON messages (created_at);
        ALTER TABLE recipients ADD COLUMN kind TEXT NOT NULL DEFAULT 'to';
    """, postgres="""
        ALTER TABLE messages DROP CONSTRAINT messages_status_check;
        ALTER TABLE messages ADD CONSTRAINT messages_status_check CHECK (status IN
            ('queued', 'sending', 'sent', 'partial', 'deferred', 'failed', 'cancelled'));
        ALTER TABLE recipients ADD COLUMN kind TEXT NOT NULL DEFAULT 'to';
    """)),
    # Counters and histogram buckets for /metrics, one row per process and metric
    # (see metrics.py): summed at scrape time, so every process reports one truth.
    ("0006_metric_counts", """
        CREATE TABLE metric_counts (
            process TEXT NOT NULL,
            name TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            value REAL NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            PRIMARY KEY (process, name, label));
        CREATE INDEX metric_counts_updated ON metric_counts (updated_at);
    """),
    # The admin's Transaction Log and Queue at a million rows (see logbook.py):
    # each log row's kind, attachment count and search words; counts per hour
    # and kind; a waiting message found by state and age; the search index
    # over the words (FTS5 on SQLite, GIN on PostgreSQL). Rows written before
    # get kind, words and counts from ``logbook.backfill`` (Python: the same
    # words for both backends).
    ("0007_admin_log", PerBackend(sqlite="""
        ALTER TABLE log ADD COLUMN kind TEXT NOT NULL DEFAULT '';
        ALTER TABLE log ADD COLUMN attachments INTEGER;
        ALTER TABLE log ADD COLUMN terms TEXT NOT NULL DEFAULT '';
        CREATE INDEX log_kind ON log (kind, id);
        DROP INDEX log_ts;
        CREATE INDEX log_ts_kind ON log (ts, kind);
        CREATE TABLE log_counts (
            hour INTEGER NOT NULL, kind TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (hour, kind));
        ALTER TABLE messages ADD COLUMN attachments INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX messages_status_created ON messages (status, created_at);
        CREATE VIRTUAL TABLE log_fts USING fts5(terms, content='log', content_rowid='id', detail='none');
    """, postgres="""
        ALTER TABLE log ADD COLUMN kind TEXT NOT NULL DEFAULT '';
        ALTER TABLE log ADD COLUMN attachments BIGINT;
        ALTER TABLE log ADD COLUMN terms TEXT NOT NULL DEFAULT '';
        CREATE INDEX log_kind ON log (kind, id);
        DROP INDEX log_ts;
        CREATE INDEX log_ts_kind ON log (ts, kind);
        CREATE TABLE log_counts (
            hour BIGINT NOT NULL, kind TEXT NOT NULL, n BIGINT NOT NULL, PRIMARY KEY (hour, kind));
        ALTER TABLE messages ADD COLUMN attachments BIGINT NOT NULL DEFAULT 0;
        CREATE INDEX messages_status_created ON messages (status, created_at);
        CREATE INDEX log_terms ON log USING GIN (to_tsvector('simple', terms));
    """)),
    # Issue 8: each API key's own send limit and Allowed From list; the per-minute send
    # counts the limits read (shared by every web process); refused requests counted per
    # source IP and minute, with the one log row that stands for them.
    ("0008_key_limits_and_refusals", """
        ALTER TABLE api_keys ADD COLUMN per_hour INTEGER;
        ALTER TABLE api_keys ADD COLUMN allowed_from TEXT NOT NULL DEFAULT '';
        CREATE TABLE send_counts (
            api_key_id INTEGER NOT NULL, minute INTEGER NOT NULL, n INTEGER NOT NULL,
            PRIMARY KEY (api_key_id, minute));
        CREATE TABLE refusals (
            ip TEXT NOT NULL, minute INTEGER NOT NULL, reason TEXT NOT NULL, n INTEGER NOT NULL,
            limited INTEGER NOT NULL DEFAULT 0, log_id INTEGER,
            PRIMARY KEY (ip, minute, reason));
        CREATE INDEX refusals_minute ON refusals (minute);
    """),
    # A sealed body does not compress (AES-GCM): PostgreSQL would try, then move it to the
    # TOAST table (a second table and index written per message). Bodies up to ~8 KB stay in
    # their row; larger ones go out of line without the attempt. SQLite keeps blobs in the row.
    ("0009_bodies_in_their_row", PerBackend(sqlite="", postgres="""
        ALTER TABLE messages SET (toast_tuple_target = 8160);
        ALTER TABLE messages ALTER COLUMN body SET STORAGE EXTERNAL;
    """)),
]
# Steps that rebuild a table others reference: run with foreign keys off (a
# pragma that cannot change inside a transaction), checked before commit.
REBUILDS = frozenset({"0005_partial_and_recipient_kind"})



_TYPES = [
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b", re.I),
     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
]
_QUOTED = re.compile(r"('(?:[^']|'')*')")


def postgres_ddl(sql: str) -> str:
    """SQLite DDL with its types mapped to PostgreSQL's (quoted text untouched).

    REAL is 4 bytes on PostgreSQL and would round timestamps to minutes, and
    INTEGER 4 bytes where SQLite's are 8: hence DOUBLE PRECISION and BIGINT.
    """
    parts = _QUOTED.split(sql)
    for i in range(0, len(parts), 2):  # even parts are outside quotes
        for pattern, replacement in _TYPES:
            parts[i] = pattern.sub(replacement, parts[i])
    return "".join(parts)


def statements(sql: str | PerBackend, dialect: str) -> list[str]:
    if isinstance(sql, PerBackend):
        text = sql.postgres if dialect == "postgresql" else sql.sqlite
    else:
        text = postgres_ddl(sql) if dialect == "postgresql" else sql
    return [s for s in text.split(";") if s.strip()]


def current_version(conn: Any) -> int:
    if conn.dialect == "sqlite":
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])


def apply_step(conn: Any, version: int, name: str, sql: str | PerBackend) -> None:
    for statement in statements(sql, conn.dialect):
        conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                 (version, name, time.time()))
    if conn.dialect == "sqlite":
        conn.execute(f"PRAGMA user_version = {version}")


def migrate(conn: Any, steps: list[tuple[str, str | PerBackend]] | None = None) -> list[str]:
    """Apply every pending step, each in its own transaction; tests pass a prefix as ``steps``."""
    applied = []
    for version, (name, sql) in enumerate(MIGRATIONS if steps is None else steps, start=1):
        # A SQLite table rebuild runs with foreign keys off (a pragma that does nothing
        # inside a transaction): dropping the old table would otherwise cascade.
        rebuild = name in REBUILDS and conn.dialect == "sqlite"
        if rebuild:
            if current_version(conn) >= version:
                continue
            conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.transaction():
                # Re-read under the lock: another process may have migrated meanwhile.
                conn.serialize("tspro-relay migrations")
                if current_version(conn) >= version:
                    continue
                apply_step(conn, version, name, sql)
                if rebuild:
                    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration {name} would break {len(broken)} foreign key(s)")
        finally:
            if rebuild:
                conn.execute("PRAGMA foreign_keys = ON")
        applied.append(name)
    if applied:  # an upgrade says what it did to the store, once
        versions = {name: version for version, (name, _) in enumerate(MIGRATIONS if steps is None else steps, 1)}
        logger.info("migrated the store from version %d to %d: %s", versions[applied[0]] - 1,
                    versions[applied[-1]], ", ".join(applied), extra=fields("store.migrated", count=len(applied)))
    return applied

