"""Schema migrations: an ordered list of named steps, recorded as applied.

``PRAGMA user_version`` holds how many steps have run; ``schema_migrations``
records each by name and time for people reading the database. Run by an
explicit start-up step (``Store.migrate``), never at import.
"""

from __future__ import annotations

import sqlite3
import time

MIGRATIONS: list[tuple[str, str]] = [
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
]


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply every pending step, each in its own transaction. Returns their names."""
    applied = []
    for version, (name, sql) in enumerate(MIGRATIONS, start=1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated.
            if current_version(conn) >= version:
                conn.execute("ROLLBACK")
                continue
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
