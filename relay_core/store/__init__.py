"""The store of record (relay.db, or PostgreSQL): its settings, and its named parts.

Every process opens its own connections (one per thread; on PostgreSQL each
borrows from the process's pool, see ``relay_core/db``). Settings and API keys
are cached per process and re-read only when the revision counter moves, so a
change made by the CLI or another process takes effect everywhere without a
restart.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import crypto
from ..db import migrations
from .accounts import Admin, AdminAccount, ApiKey, ApiKeys  # noqa: F401  (re-exported)
from .audit import Audit, AuditEntry, insert_audit  # noqa: F401  (re-exported)
from ..config import ConfigError, Settings
from ..crypto import KeySet
from ..db import (Connection, Database, SqliteDatabase, connect, for_share, insert_blob, open_database,  # noqa: F401
                 serialize, transaction, write_lock, written_yet)
from .interventions import ActionReport, Interventions  # noqa: F401  (re-exported)
from .idempotency import Idempotency
from .ledger import (FINAL_STATES, MAX_UNRECORDED_CLAIMS, ClaimedMessage, Ledger, NewMessage, Paced,  # noqa: F401
                     Recipient, insert_message)
from .limits import SendLimits
from ..logs import fields
from .logbook import AttemptFact, LogEntry, Logbook, LoggedRow, backfill, insert_log  # noqa: F401  (re-exported)
from ..options import SECRET_OPTIONS, Options, build_options, check_consistency, to_text
from .queueview import QueueView
from .refusals import Refusals
from .sessions import AdminSession, Sessions  # noqa: F401  (re-exported)
from .sweeping import Sweeping
from .workers import Workers

logger = logging.getLogger("relay.store")
KEY_CHECK = "tspro-relay key check"
# Where each secret setting is entered again.
REENTER = {"smtp_password": "Settings → SMTP delivery", "turnstile_secret": "Settings → Sign-in protection",
           "oauth_client_secret": "Settings → SMTP delivery",
           "oauth_refresh_token": "connect the account again in Settings → SMTP delivery"}


def unreadable_sentence(name: str) -> str:
    """What the log says about a stored secret this RELAY_SECRET_KEY cannot decrypt (never its value)."""
    return (f"the stored {name} cannot be decrypted with RELAY_SECRET_KEY (it was encrypted with another "
            "secret: after changing the secret, run `tspro-relay rotate-secret` with the previous one as "
            f"RELAY_SECRET_KEY_OLD); until then it is not used. Re-enter it: `tspro-relay config set {name}=...`"
            f" or {REENTER.get(name, 'the admin pages')}.")
MOVED_MARK = "moved_to"  # set in relay.db by migrate-store (see transfer.py)


@dataclass
class BootstrapReport:
    admin_created: bool = False
    admin_password_generated: str | None = None
    api_key_created: bool = False


def _writable(directory: Path) -> bool:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    writable = os.access(directory, os.W_OK | os.X_OK)
    db = directory / "relay.db"
    return writable and (not db.exists() or os.access(db, os.R_OK | os.W_OK))


class MessagesPart(Ledger, Idempotency, QueueView, Interventions):
    """``store.messages``: accepted mail, its claims and outcomes (ledger.py), Idempotency-Key answers
    (idempotency.py), and what the queue pages read and do (queueview.py, interventions.py)."""

class ApiKeysPart(ApiKeys, SendLimits):
    """``store.api_keys``: the keys (accounts.py) and their send limits (limits.py)."""


class AdminPart(AdminAccount, Sessions):
    """``store.admin``: the admin account (accounts.py) and its sign-in state (sessions.py)."""


class LogPart(Logbook, Audit, Refusals):
    """``store.log``: the transaction log (logbook.py), the audit trail (audit.py) and the counted
    refusals (refusals.py)."""


class WorkersPart(Workers, Sweeping):
    """``store.workers``: worker heartbeats (workers.py) and the sweeper's passes (sweeping.py)."""


class Store:
    """Thread-safe access to the store: each thread gets its own connection.

    The settings are read and written here; everything else through a part:
    ``store.messages``, ``store.api_keys``, ``store.admin``, ``store.log``, ``store.workers``.
    """

    def __init__(self, database: Database | Path, keys: KeySet) -> None:
        self.database: Database = SqliteDatabase(database) if isinstance(database, Path) else database
        self.path = self.database.path  # relay.db, or None on PostgreSQL
        self.keys = keys
        self._local = threading.local()
        self._cache_lock = threading.Lock()
        self._cache: tuple[int, Options, list[ApiKey]] | None = None
        self.unreadable_secrets: frozenset[str] = frozenset()  # secret settings this secret cannot decrypt
        self.messages = MessagesPart(self)
        self.api_keys = ApiKeysPart(self)
        self.admin = AdminPart(self)
        self.log = LogPart(self)
        self.workers = WorkersPart(self)

    @classmethod
    def open(cls, settings: Settings, keys: KeySet | None = None) -> "Store":
        """Open the database (creating the data directory for SQLite), migrate, check the secret.

        The explicit start-up step. With PostgreSQL nothing is written to the
        data directory: another host's process could not see it.
        """
        store: Store | None = None
        try:
            store = cls(open_database(settings), keys or crypto.derive_keys(settings))
            store.migrate()
            store.check_not_moved()
            store.verify_secret()
        except BaseException as exc:
            if store is not None:
                store.shutdown()
            if (isinstance(exc, (OSError, sqlite3.OperationalError)) and not settings.database_url
                    and not _writable(settings.data_dir)):
                raise ConfigError(
                    f"The data directory '{settings.data_dir}' cannot be written by this user (uid {os.getuid()}): "
                    f"make it theirs (chown -R {os.getuid()} '{settings.data_dir}') or set RELAY_DATA_DIR to "
                    "a writable directory."
                ) from exc
            raise
        return store

    def check_not_moved(self) -> None:
        """Refuse a relay.db that migrate-store has moved: its mail now lives in PostgreSQL,
        and a worker delivering from this copy would send it a second time."""
        row = self.conn().execute("SELECT value FROM meta WHERE name = ?", (MOVED_MARK,)).fetchone()
        if row is None:
            return
        mark = json.loads(row[0])
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(mark["at"]))
        raise ConfigError(
            f"{self.path} was moved to PostgreSQL ({mark['to']}) by `tspro-relay migrate-store` on {when} and "
            "is kept only as a backup: set RELAY_DATABASE_URL (and RELAY_QUEUE_URL) to run on PostgreSQL."
        )

    def verify_secret(self) -> None:
        """Refuse a RELAY_SECRET_KEY that cannot read this data directory's secrets.

        A worker started with a mistyped key would otherwise fail or defer mail
        it cannot decrypt; better that it does not start, and says why.
        """
        conn = self.conn()
        row = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
        if row is None:
            with transaction(conn):
                conn.execute("INSERT INTO meta (name, value) VALUES ('key_check', ?) ON CONFLICT (name) DO NOTHING",
                             (self.keys.encrypt_text(KEY_CHECK),))
            return
        try:
            self.keys.decrypt_text(row["value"])
        except crypto.DecryptionError:
            raise ConfigError(
                f"RELAY_SECRET_KEY is not the key {self.database.describe()} is encrypted with, so its "
                "stored secrets and queued mail cannot be read; use that key (during a rotation, set the "
                "previous one as RELAY_SECRET_KEY_OLD; after `tspro-relay rotate-secret`, the new one)."
            ) from None

    # -- connections ---------------------------------------------------
    def conn(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.database.connect()
            self._local.conn = conn
        return conn  # type: ignore[no-any-return]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def shutdown(self) -> None:
        """Close this thread's connection and the database itself (the pool; the hold on relay.db)."""
        self.close()
        self.database.close()

    def migrate(self) -> list[str]:
        conn = self.conn()
        applied = migrations.migrate(conn)
        backfill(conn)  # log rows older than the columns the admin pages read; a no-op once done
        return applied

    def _bump_rev(self, conn: Connection) -> None:
        """Move the settings' revision: every process re-reads its settings and keys.

        The first write of its transaction, always (a transaction that wrote before is refused):
        the web's writer holds the revision until its batch commits and meanwhile updates key rows
        a change also updates, so a change taking such a row first would deadlock with it on
        PostgreSQL (test_a_key_change_beside_a_batch_recording_that_keys_use_neither_deadlocks).
        """
        if written_yet(conn):
            raise RuntimeError("the settings' revision moves first in its transaction (Store._bump_rev)")
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('rev', '1') ON CONFLICT(name)"
            " DO UPDATE SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)"
        )

    # -- first boot ------------------------------------------------------
    def bootstrap(self, settings: Settings) -> BootstrapReport:
        """Seed the admin account and the portal's API key if they do not exist."""
        report = BootstrapReport()
        conn = self.conn()
        if conn.execute("SELECT 1 FROM admins LIMIT 1").fetchone() is None:
            password = str(settings.admin_password) if settings.admin_password else None
            if password is None:
                password = crypto.new_password()
                report.admin_password_generated = password
            hashed = crypto.hash_password(password)
            with transaction(conn):
                serialize(conn, "tspro-relay bootstrap")  # two processes booting at once seed once
                if conn.execute("SELECT 1 FROM admins LIMIT 1").fetchone() is None:
                    now = time.time()
                    # A password chosen before anyone signed in (the seed, or one we
                    # generated and printed) must be changed at the first sign-in.
                    conn.execute("INSERT INTO admins (username, password_hash, must_change, created_at,"
                                 " updated_at) VALUES (?, ?, 1, ?, ?)", (settings.admin_user, hashed, now, now))
                    report.admin_created = True
            if not report.admin_created:
                report.admin_password_generated = None
        with transaction(conn):
            serialize(conn, "tspro-relay bootstrap")
            if conn.execute("SELECT 1 FROM api_keys WHERE is_primary = 1 AND revoked_at IS NULL").fetchone() is None:
                self._bump_rev(conn)
                self.api_keys.insert(conn, "portal", crypto.new_api_key(), primary=True)
                report.api_key_created = True
        return report

    # -- settings ----------------------------------------------------------
    def _load_cache(self) -> tuple[Options, list[ApiKey]]:
        _, options, keys = self.fresh_snapshot()
        return options, keys

    _REVISION = "SELECT value FROM meta WHERE name = 'rev'"

    def revision(self, conn: Connection | None = None, hold: bool = False) -> int:
        """The settings' revision counter: it moves with every change to settings or keys.

        ``hold``: inside a write transaction that relies on it (the web's batch, create_app's
        at_begin), keep it so until the commit: a settings change then waits for the transaction,
        so once it returns nothing checked against the settings it replaced is stored later
        (test_once_a_revoke_returns_no_send_checked_against_the_key_is_stored_later)."""
        conn = conn or self.conn()
        row = conn.execute(self._REVISION + (for_share(conn) if hold else "")).fetchone()
        return int(row[0]) if row else 0

    def cached_snapshot(self) -> tuple[int, Options, list[ApiKey]]:
        """(revision, settings, keys) as last read, without asking the database.

        For the send path only: it checks its accept against the revision in
        the transaction that stores it, and re-reads before refusing (api.py).
        """
        cached = self._cache
        return cached if cached is not None else self.fresh_snapshot()

    def fresh_snapshot(self) -> tuple[int, Options, list[ApiKey]]:
        conn = self.conn()
        rev = self.revision(conn)
        cached = self._cache
        if cached is not None and cached[0] == rev:
            return cached
        stored = {r["name"]: r["value"] for r in conn.execute("SELECT name, value FROM settings")}
        unreadable = set()
        for name in sorted(SECRET_OPTIONS):
            if stored.get(name):
                try:
                    stored[name] = self.keys.decrypt_text(stored[name])
                except crypto.DecryptionError:
                    # Fail closed: the setting counts as unusable (delivery waits, sign-in with
                    # Turnstile is refused) rather than empty, and the log says what to re-enter.
                    stored[name] = ""
                    unreadable.add(name)
                    logger.error(unreadable_sentence(name), extra=fields("store.unreadable_secret"))
        self.unreadable_secrets = frozenset(unreadable)
        options = build_options(stored)
        keys = [
            ApiKey(r["id"], r["label"], bool(r["is_primary"]), r["created_at"], r["revoked_at"], r["lookup"],
                   None if r["per_hour"] is None else int(r["per_hour"]), r["allowed_from"])
            for r in conn.execute("SELECT * FROM api_keys ORDER BY id")
        ]
        snapshot = (rev, options, keys)
        with self._cache_lock:
            self._cache = snapshot
        return snapshot

    def options_changed_at(self, names: tuple[str, ...]) -> float:
        marks = ",".join("?" * len(names))
        row = self.conn().execute(f"SELECT MAX(updated_at) FROM settings WHERE name IN ({marks})",
                                  names).fetchone()
        return float(row[0] or 0.0)

    def options(self) -> Options:
        return self._load_cache()[0]

    def snapshot(self) -> tuple[Options, list[ApiKey]]:
        """Settings and keys from one look at the revision counter (the send path's)."""
        return self._load_cache()

    def set_options(self, values: dict[str, Any], audit: tuple[str, str, str, str] | None = None) -> Options:
        """Write validated, typed values; secrets are encrypted. All or nothing.

        ``audit`` (actor, ip, action, detail) is recorded in the same transaction.
        """
        current = self.options()
        merged = {**current.__dict__, **values}
        candidate = Options(**merged)
        check_consistency(candidate)
        conn = self.conn()
        now = time.time()
        with transaction(conn):
            self._bump_rev(conn)
            for name, value in values.items():
                text = to_text(value)
                if name in SECRET_OPTIONS and text:
                    text = self.keys.encrypt_text(text)
                conn.execute(
                    "INSERT INTO settings (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(name)"
                    " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (name, text, now),
                )
            if audit is not None:
                insert_audit(conn, *audit, ts=now)
        return self.options()

