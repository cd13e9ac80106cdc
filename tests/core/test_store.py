"""relay_core.store on both backends: migrations, first boot, settings, claims.

Every test here runs twice: on a real SQLite file, and on a fresh database
in a real PostgreSQL cluster (conftest.py). The ``store`` fixture is a
migrated and bootstrapped store. Messages are inserted the way the web
process does it: a ``NewMessage`` with a body encrypted to its id, inside
``transaction``. "Another process" is a second ``Store`` on the same
database, with connections (and, on PostgreSQL, a pool) of its own.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay_core import crypto
from relay_core.db import migrations
from relay_core.config import Secret, Settings, load_settings
from relay_core.errors import BadRequest
from relay_core.db.migrations import MIGRATIONS
from relay_core.intake.group_commit import GroupCommit, NothingWritten
from relay_core.options import Options, parse_option
from relay_core.store import (ClaimedMessage, LogEntry, NewMessage, SqliteDatabase, Store, insert_message,
                              open_database, transaction)
from support import SECRET

pytestmark = pytest.mark.backends

T0 = 1_700_000_000.0



def table_names(store: Store) -> set[str]:
    if store.database.dialect == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    return {r[0] for r in store.conn().execute(sql)}


def add_message(store: Store, message_id: str, *, created: float = T0, recipients: list[str] | None = None,
                body: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> None:
    record = NewMessage(
        id=message_id, source="api", api_key_id=None, created_at=created, from_addr="noreply@example.org",
        from_name="Portal", envelope_from="noreply@example.org", subject="hi",
        message_id_header=f"<{message_id}@example.org>", body=store.keys.encrypt_body(body, message_id),
        size=len(body), recipients=recipients or ["a@example.com", "b@example.com"],
    )
    conn = store.conn()
    with transaction(conn):
        insert_message(conn, record)


def status_of(store: Store, message_id: str) -> Any:
    return store.conn().execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()


def attempt_entry(message_id: str, status: str = "deferred") -> LogEntry:
    return LogEntry("attempt", status, message_id=message_id, stage="DATA", code=451, detail="try later")


# -- migrations -------------------------------------------------------------------------------
def test_migrations_are_recorded(store: Store) -> None:
    conn = store.conn()
    rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY version").fetchall()
    assert [(r["version"], r["name"]) for r in rows] == [(i, name) for i, (name, _) in enumerate(MIGRATIONS, 1)]
    assert all(r["applied_at"] > 0 for r in rows)
    if store.database.dialect == "sqlite":
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert {"messages", "recipients", "log", "settings", "api_keys", "admins", "idempotency", "workers",
            "meta", "pacing"} <= table_names(store)


def test_connections_are_durable_and_enforce_foreign_keys(store: Store) -> None:
    conn = store.conn()
    if store.database.dialect == "sqlite":
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    else:
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert conn.execute("SHOW fsync").fetchone()[0] == "on"
    with pytest.raises(Exception) as caught:
        with transaction(conn):
            conn.execute("INSERT INTO recipients (message_id, position, address) VALUES ('nope', 0, 'a@b.c')")
    assert "foreign key" in str(caught.value).lower()


def test_migrate_twice_is_a_no_op(store: Store, settings: Settings) -> None:
    before = [tuple(r) for r in store.conn().execute("SELECT * FROM schema_migrations ORDER BY version")]
    assert store.migrate() == []
    again = Store.open(settings)  # another process starting up
    try:
        assert again.migrate() == []
        assert [tuple(r) for r in again.conn().execute("SELECT * FROM schema_migrations ORDER BY version")] == before
    finally:
        again.shutdown()


def test_a_fresh_database_applies_every_migration(settings: Settings) -> None:
    store = Store(open_database(settings), crypto.derive_keys(settings))
    try:
        assert store.migrate() == [name for name, _ in MIGRATIONS]
        assert store.migrate() == []
    finally:
        store.shutdown()


def test_processes_starting_at_once_migrate_and_seed_once(settings: Settings) -> None:
    """Four processes open a fresh database at the same moment: one applies each step, one
    admin and one portal key are seeded, and nobody fails."""
    barrier = threading.Barrier(4)
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def start() -> None:
        store = Store(open_database(settings), crypto.derive_keys(settings))
        try:
            barrier.wait()
            applied.append(store.migrate())
            store.verify_secret()
            store.bootstrap(settings)
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)
        finally:
            store.shutdown()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    # Each step applied by exactly one of them (not necessarily the same one for every step).
    assert sorted(name for names in applied for name in names) == sorted(name for name, _ in MIGRATIONS)
    store = Store.open(settings)
    try:
        conn = store.conn()
        assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("SELECT COUNT(*) FROM admins").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM api_keys WHERE is_primary = 1").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM meta WHERE name = 'key_check'").fetchone()[0] == 1
    finally:
        store.shutdown()


def test_sql_text_keeps_its_percent_signs_and_quoted_question_marks(store: Store) -> None:
    conn = store.conn()
    row = conn.execute("SELECT 'a%b?' AS x, 7 % 3 AS y, ? AS z", ("q",)).fetchone()
    assert (row["x"], row["y"], row["z"]) == ("a%b?", 1, "q") and tuple(row) == ("a%b?", 1, "q")
    assert bool(conn.execute("SELECT 'a%b' LIKE 'a%'").fetchone()[0]) is True


# -- first boot ----------------------------------------------------------------------------------
def test_bootstrap_seeds_one_admin_and_one_primary_key(store: Store) -> None:
    conn = store.conn()
    admins = conn.execute("SELECT username, password_hash FROM admins").fetchall()
    assert len(admins) == 1 and admins[0]["username"] == "admin"
    assert admins[0]["password_hash"].startswith("$argon2id$") and "admin-pass-123" not in admins[0]["password_hash"]
    assert store.admin.check_password("admin", "admin-pass-123") is True
    assert store.admin.check_password("admin", "admin-pass-124") is False
    assert store.admin.check_password("root", "admin-pass-123") is False

    (key,) = store.api_keys.all()
    assert key.is_primary and key.revoked_at is None and key.label == "portal"
    revealed = store.api_keys.reveal()
    assert revealed.startswith("tsr_")
    raw = base64.urlsafe_b64decode(revealed[4:] + "=" * (-len(revealed[4:]) % 4))
    assert len(raw) >= 32
    assert store.api_keys.authenticate(revealed) == key
    # Stored as an HMAC and a ciphertext, never in clear.
    row = conn.execute("SELECT lookup, secret FROM api_keys").fetchone()
    assert revealed not in (row["lookup"], row["secret"]) and revealed[4:] not in row["secret"]


def test_second_bootstrap_changes_nothing(store: Store, settings: Settings) -> None:
    conn = store.conn()
    before = ([tuple(r) for r in conn.execute("SELECT * FROM admins")],
              [tuple(r) for r in conn.execute("SELECT * FROM api_keys")])
    report = store.bootstrap(settings)
    assert (report.admin_created, report.api_key_created, report.admin_password_generated) == (False, False, None)
    after = ([tuple(r) for r in conn.execute("SELECT * FROM admins")],
             [tuple(r) for r in conn.execute("SELECT * FROM api_keys")])
    assert after == before


def test_bootstrap_without_a_password_generates_one(settings: Settings) -> None:
    settings = dataclasses.replace(settings, admin_user="chief", admin_password=None)
    store = Store.open(settings)
    try:
        report = store.bootstrap(settings)
        assert report.admin_created and report.api_key_created
        assert report.admin_password_generated and len(report.admin_password_generated) >= 16
        assert store.admin.check_password("chief", report.admin_password_generated)
    finally:
        store.shutdown()


def test_set_admin_password(store: Store) -> None:
    store.admin.set_password("admin", "new-password-99")
    assert store.admin.check_password("admin", "new-password-99")
    assert not store.admin.check_password("admin", "admin-pass-123")
    assert store.conn().execute("SELECT COUNT(*) FROM admins").fetchone()[0] == 1


def test_a_weaker_password_hash_is_replaced_at_the_next_successful_sign_in(store: Store, other: Store) -> None:
    salt = base64.b64encode(b"0123456789abcdef").decode()
    digest = base64.b64encode(hashlib.scrypt(b"admin-pass-123", salt=b"0123456789abcdef", n=2**14, r=8, p=1,
                                             dklen=32)).decode()
    weak = f"scrypt${2**14}$8$1${salt}${digest}"  # an scrypt hash, as stored before Argon2id
    conn = store.conn()
    with transaction(conn):
        conn.execute("UPDATE admins SET password_hash = ?", (weak,))

    def stored() -> str:
        return str(other.conn().execute("SELECT password_hash FROM admins").fetchone()[0])

    assert store.admin.verify("admin", "admin-pass-124") is None and stored() == weak  # a failure changes nothing
    assert store.admin.verify("admin", "admin-pass-123") is not None
    upgraded = stored()  # as another process reads it: committed
    assert upgraded != weak and not crypto.needs_rehash(upgraded)
    assert upgraded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert other.admin.check_password("admin", "admin-pass-123") and stored() == upgraded  # once only


# -- settings ------------------------------------------------------------------------------------
def test_options_default_then_persist(store: Store, other: Store) -> None:
    assert store.options() == Options()
    store.set_options({"smtp_host": "mail.example.org", "smtp_port": 465, "smtp_security": "ssl",
                       "max_attach_mb": 10.5, "smtp_tls_verify": False})
    options = other.options()  # another process sees it
    assert (options.smtp_host, options.smtp_port, options.smtp_security) == ("mail.example.org", 465, "ssl")
    assert options.max_attach_mb == 10.5 and options.smtp_tls_verify is False


def test_a_change_by_another_process_is_seen_without_restart(store: Store, other: Store) -> None:
    assert store.options().smtp_host == ""
    other.set_options({"smtp_host": "changed.example.org"})
    assert store.options().smtp_host == "changed.example.org"
    other.set_options({"smtp_port": 2525})
    assert store.options().smtp_port == 2525


def test_set_options_is_all_or_nothing(store: Store) -> None:
    store.set_options({"retry_base_seconds": 60, "retry_max_seconds": 600})
    rows_before = [tuple(r) for r in store.conn().execute("SELECT * FROM settings ORDER BY name")]
    with pytest.raises(BadRequest, match="retry_max_seconds"):
        store.set_options({"smtp_host": "mail.example.org", "retry_base_seconds": 900})
    with pytest.raises(BadRequest, match="retry_max_seconds"):
        store.set_options({"retry_max_seconds": 30, "smtp_port": 2525})
    assert [tuple(r) for r in store.conn().execute("SELECT * FROM settings ORDER BY name")] == rows_before
    options = store.options()
    assert (options.smtp_host, options.smtp_port, options.retry_base_seconds,
            options.retry_max_seconds) == ("", 587, 60, 600)


def test_smtp_password_is_stored_encrypted(store: Store, settings: Settings) -> None:
    password = "smtp-Pa55-unique-value"
    store.set_options({"smtp_password": parse_option("smtp_password", password)})
    (raw,) = store.conn().execute("SELECT value FROM settings WHERE name = 'smtp_password'").fetchone()
    assert raw != password and password not in raw
    assert store.keys.decrypt_text(raw) == password
    assert store.options().smtp_password == password
    if store.database.dialect == "sqlite":  # nothing in the database file holds it in clear
        store.conn().execute("PRAGMA wal_checkpoint(FULL)")
        assert password.encode() not in settings.db_path.read_bytes()
    store.set_options({"smtp_password": ""})
    assert store.options().smtp_password == ""


# -- API keys ------------------------------------------------------------------------------------
def test_new_primary_key_revokes_the_old_one_at_once(store: Store) -> None:
    old = store.api_keys.reveal()
    new = store.api_keys.new_primary()
    assert new != old and store.api_keys.reveal() == new
    assert store.api_keys.authenticate(old) is None
    assert store.api_keys.authenticate(new) is not None and store.api_keys.authenticate(new).is_primary


def test_extra_keys_can_be_added_and_revoked(store: Store) -> None:
    key_id, key = store.api_keys.add("rotation")
    assert store.api_keys.authenticate(key).id == key_id and store.api_keys.reveal(key_id) == key
    assert store.api_keys.authenticate(store.api_keys.reveal()) is not None  # the primary still works
    assert store.api_keys.revoke(key_id) is True
    assert store.api_keys.authenticate(key) is None
    assert store.api_keys.revoke(key_id) is False
    assert store.api_keys.revoke(9999) is False
    assert store.api_keys.authenticate("") is None and store.api_keys.authenticate("tsr_guess") is None


# -- claims -------------------------------------------------------------------------------------
def test_claim_returns_the_decrypted_message(store: Store) -> None:
    add_message(store, "m1", body=b"the MIME bytes")
    claimed = store.messages.claim("m1", "worker-a", 300, now=T0)
    assert claimed is not None
    assert (claimed.id, claimed.body, claimed.lease_owner, claimed.attempts) == ("m1", b"the MIME bytes",
                                                                                 "worker-a", 0)
    assert [(r.position, r.address, r.status) for r in claimed.recipients] == [
        (0, "a@example.com", "pending"), (1, "b@example.com", "pending")]
    row = status_of(store, "m1")
    assert (row["status"], row["lease_owner"], row["lease_expires_at"]) == ("sending", "worker-a", T0 + 300)


@pytest.mark.parametrize("size", [0, 1, 256 * 1024, 3 * 1024 * 1024 + 7])
def test_bodies_of_every_size_round_trip(store: Store, size: int) -> None:
    body = (bytes(range(256)) * (size // 256 + 1))[:size]
    add_message(store, f"s{size}", body=body)
    claimed = store.messages.claim(f"s{size}", "w", 300, now=T0)
    assert claimed is not None and claimed.body == body
    raw = status_of(store, f"s{size}")["body"]
    assert raw != body and len(raw) == len(store.keys.encrypt_body(body, "x"))


def test_only_one_of_two_claims_succeeds(store: Store) -> None:
    add_message(store, "m1")
    first = store.messages.claim("m1", "worker-a", 300, now=T0)
    second = store.messages.claim("m1", "worker-b", 300, now=T0 + 1)
    assert first is not None and second is None
    assert status_of(store, "m1")["lease_owner"] == "worker-a"


def test_concurrent_claims_from_two_connections(store: Store, other: Store) -> None:
    for i in range(20):
        add_message(store, f"c{i}")
    wins: dict[str, list[str]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def run(name: str, s: Store) -> None:
        barrier.wait()
        for i in range(20):
            if s.messages.claim(f"c{i}", name, 300, now=T0) is not None:
                wins[name].append(f"c{i}")

    threads = [threading.Thread(target=run, args=("a", store)), threading.Thread(target=run, args=("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(wins["a"] + wins["b"]) == sorted(f"c{i}" for i in range(20))
    assert not set(wins["a"]) & set(wins["b"])


def test_not_claimable_before_next_attempt_at(store: Store) -> None:
    add_message(store, "m1", created=T0)
    assert store.messages.claim("m1", "w", 300, now=T0 - 1) is None
    claimed = store.messages.claim("m1", "w", 300, now=T0)
    assert claimed is not None
    assert store.messages.record_attempt(claimed, "deferred", next_attempt_at=T0 + 600, last_error="451 later",
                                         recipient_updates={0: ("deferred", 451, "later"), 1: ("sent", 250, "ok")},
                                         entry=attempt_entry("m1"), now=T0 + 5)
    assert store.messages.claim("m1", "w", 300, now=T0 + 599) is None
    again = store.messages.claim("m1", "w", 300, now=T0 + 600)
    assert again is not None and again.attempts == 1
    assert [(r.status, r.code) for r in again.recipients] == [("deferred", 451), ("sent", 250)]


def test_an_expired_sending_lease_is_claimable_again(store: Store) -> None:
    add_message(store, "m1")
    first = store.messages.claim("m1", "dead-worker", 60, now=T0)
    assert first is not None
    assert store.messages.claim("m1", "w2", 60, now=T0 + 60) is None  # not yet expired
    second = store.messages.claim("m1", "w2", 60, now=T0 + 61)
    assert second is not None and second.lease_owner == "w2"
    # The dead worker, back from the grave, may not record its outcome.
    assert store.messages.record_attempt(first, "sent", next_attempt_at=None, last_error=None,
                                         recipient_updates={0: ("sent", 250, "ok")}, entry=attempt_entry("m1", "sent"),
                                         now=T0 + 62) is False
    assert status_of(store, "m1")["status"] == "sending"
    assert store.messages.record_attempt(second, "sent", next_attempt_at=None, last_error=None,
                                         recipient_updates={0: ("sent", 250, "ok"), 1: ("sent", 250, "ok")},
                                         entry=attempt_entry("m1", "sent"), now=T0 + 63) is True
    row = status_of(store, "m1")
    assert (row["status"], row["attempts"], row["finished_at"], row["lease_owner"]) == ("sent", 1, T0 + 63, None)


def test_record_attempt_by_a_non_owner_changes_nothing(store: Store) -> None:
    add_message(store, "m1")
    claimed = store.messages.claim("m1", "owner", 300, now=T0)
    assert claimed is not None
    impostor = ClaimedMessage(**{**claimed.__dict__, "lease_owner": "impostor"})
    assert store.messages.record_attempt(impostor, "failed", next_attempt_at=None, last_error="nope",
                                         recipient_updates={0: ("failed", 550, "nope")}, entry=attempt_entry("m1", "failed"),
                                         now=T0 + 1) is False
    row = status_of(store, "m1")
    assert (row["status"], row["attempts"], row["last_error"]) == ("sending", 0, None)
    assert store.conn().execute("SELECT COUNT(*) FROM log WHERE message_id = 'm1'").fetchone()[0] == 0
    recipients = store.conn().execute("SELECT status FROM recipients WHERE message_id = 'm1'").fetchall()
    assert [r[0] for r in recipients] == ["pending", "pending"]


def test_finished_messages_are_never_claimed(store: Store) -> None:
    add_message(store, "m1")
    claimed = store.messages.claim("m1", "w", 300, now=T0)
    assert claimed is not None
    assert store.messages.record_attempt(claimed, "failed", next_attempt_at=None, last_error="550 no such user",
                                         recipient_updates={0: ("failed", 550, "no"), 1: ("failed", 550, "no")},
                                         entry=attempt_entry("m1", "failed"), now=T0 + 1)
    assert store.messages.claim("m1", "w", 300, now=T0 + 10**6) is None
    status = store.messages.status("m1")
    assert status is not None and status["status"] == "failed" and status["last_error"] == "550 no such user"
    assert [a["status"] for a in status["attempts"]] == ["failed"]


def test_claim_of_an_unknown_id_is_none(store: Store) -> None:
    assert store.messages.claim("no-such-id", "w", 300, now=T0) is None
    assert store.messages.status("no-such-id") is None


def test_a_body_moved_to_another_row_does_not_decrypt(store: Store) -> None:
    add_message(store, "m1", body=b"for m1")
    add_message(store, "m2", body=b"for m2")
    conn = store.conn()
    with transaction(conn):
        conn.execute("UPDATE messages SET body = (SELECT body FROM messages WHERE id = 'm1') WHERE id = 'm2'")
    claimed = store.messages.claim("m2", "w", 300, now=T0)
    assert isinstance(claimed, ClaimedMessage)
    with pytest.raises(crypto.DecryptionError):
        claimed.body


def test_sweep_finds_lost_wake_ups(store: Store) -> None:
    add_message(store, "queued-stale", created=T0)
    add_message(store, "queued-fresh", created=T0)
    add_message(store, "deferred-due", created=T0)
    add_message(store, "sending-expired", created=T0)
    store.messages.mark_enqueued(["queued-fresh"], now=T0 + 100)
    claimed = store.messages.claim("deferred-due", "w", 300, now=T0)
    assert claimed is not None
    store.messages.record_attempt(claimed, "deferred", next_attempt_at=T0 + 50, last_error="451",
                                  recipient_updates={}, entry=attempt_entry("deferred-due"), now=T0 + 1)
    assert store.messages.claim("sending-expired", "w", 10, now=T0) is not None
    assert sorted(store.workers.sweep(now=T0 + 110, stale_after=30)) == ["deferred-due", "queued-stale", "sending-expired"]
    again = store.workers.sweep(now=T0 + 111, stale_after=30)  # the others were just enqueued
    assert "queued-stale" not in again and "deferred-due" not in again and "queued-fresh" not in again


# -- the admin UI's tables ------------------------------------------------------------------------
def test_sessions_sign_in_failures_and_audit_trail(store: Store) -> None:
    admin = store.admin.verify("admin", "admin-pass-123")
    assert admin is not None and admin.must_change
    store.admin.create_session(admin.id, "session-1", "192.0.2.1", "browser", now=T0)
    found = store.admin.find_session("session-1", idle_seconds=600, now=T0 + 120)
    assert found is not None and found.admin.username == "admin"
    again = store.admin.find_session("session-1", idle_seconds=600, now=T0 + 121)
    assert again is not None and again.last_seen == T0 + 120  # the visit was recorded
    assert store.admin.find_session("session-1", idle_seconds=600, now=T0 + 10_000) is None  # idle: deleted
    assert store.admin.session_count(admin.id) == 0
    for i in range(5):
        store.admin.claim_login_attempt("192.0.2.9", "Admin", now=T0 + i)
    assert store.admin.locked_until("192.0.2.9", "someone", now=T0 + 10) == T0 + 60
    store.admin.clear_login_failures("admin")
    assert store.admin.locked_until("198.51.100.1", "admin", now=T0 + 10) is None
    store.admin.update(admin.id, username="chief", password="a-new-password-1")
    assert store.admin.verify("chief", "a-new-password-1") == dataclasses.replace(admin, username="chief",
                                                                                   must_change=False)
    key = store.api_keys.all()[0]
    conn = store.conn()
    with transaction(conn):
        store.api_keys.note_use(conn, key.id, T0)
    assert store.api_keys.usage() == {key.id: T0}
    for i in range(3):
        store.log.record_audit("chief", "192.0.2.1", f"settings.{i}", "100% done", ts=T0 + i)
    entries = store.log.audit_entries(limit=2, action_prefix="settings.")
    assert [e.action for e in entries] == ["settings.2", "settings.1"] and entries[0].detail == "100% done"
    assert [e.action for e in store.log.audit_entries(before_id=entries[1].id)] == ["settings.0"]


def test_pruning_drops_dead_sessions_and_stale_sign_in_failures(store: Store) -> None:
    admin = store.admin.verify("admin", "admin-pass-123")
    assert admin is not None
    store.admin.create_session(admin.id, "idle", "192.0.2.1", "a", now=T0)
    store.admin.create_session(admin.id, "active", "192.0.2.1", "b", now=T0 + 3000)
    store.admin.claim_login_attempt("192.0.2.9", "admin", now=T0 + 3000)
    store.admin.claim_login_attempt("192.0.2.9", "admin", now=T0 + 3599)
    assert store.admin.prune_sessions(T0 + 3600, idle_seconds=1800) == 1
    assert store.admin.find_session("idle", 10**6, now=T0 + 3600) is None
    assert store.admin.find_session("active", 1800, now=T0 + 3600) is not None
    conn = store.conn()
    assert conn.execute("SELECT COUNT(*) FROM login_failures").fetchone()[0] == 1  # only the last minute's
    # Nobody keeps a session past a day, however busy.
    assert store.admin.prune_sessions(T0 + 3000 + 86401, idle_seconds=10**6) == 1


def test_an_active_session_lives_with_a_one_minute_idle_limit(store: Store) -> None:
    # The last visit was written at most once a minute: with session_idle_minutes=1 a page viewed every
    # 50 s still expired. The granularity follows the setting.
    admin = store.admin.verify("admin", "admin-pass-123")
    assert admin is not None
    store.admin.create_session(admin.id, "busy", "192.0.2.1", "browser", now=T0)
    for visit in range(1, 6):
        assert store.admin.find_session("busy", idle_seconds=60, now=T0 + 50 * visit) is not None, visit
    assert store.admin.find_session("busy", idle_seconds=60, now=T0 + 250 + 61) is None


# -- what one writer at a time used to guarantee, across processes ---------------------------------------
def test_pacing_is_counted_once_across_concurrent_claims(store: Store, other: Store) -> None:
    """Two 'processes' claim 16 due messages at once under a limit of 5 a minute: exactly
    5 are claimed (the count and the insert happen under one lock), the rest are paced."""
    for i in range(16):
        add_message(store, f"p{i}")
    limits = ((5, 60.0),)
    results: dict[str, list[object]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def run(name: str, s: Store, ids: list[str]) -> None:
        barrier.wait()
        for message_id in ids:
            results[name].append(s.messages.claim(message_id, name, 300, now=T0 + 1, limits=limits))

    threads = [threading.Thread(target=run, args=("a", store, [f"p{i}" for i in range(0, 16, 2)])),
               threading.Thread(target=run, args=("b", other, [f"p{i}" for i in range(1, 16, 2)]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outcomes = results["a"] + results["b"]
    assert len(outcomes) == 16
    assert sum(isinstance(o, ClaimedMessage) for o in outcomes) == 5
    assert store.conn().execute("SELECT COUNT(*) FROM pacing").fetchone()[0] == 5
    assert store.messages.counts() == {"sending": 5, "deferred": 11}


def test_an_idempotency_key_is_claimed_by_one_of_two_racing_writers(store: Store, other: Store) -> None:
    """A second writer's claim of the same key waits for the first one's commit, then fails:
    two web processes answering one repeated request store one message."""
    key_id = store.api_keys.all()[0].id
    first_in = threading.Event()
    outcome: dict[str, bool] = {}

    def first() -> None:
        conn = store.conn()
        with transaction(conn):
            outcome["first"] = store.messages.remember_answer(conn, key_id, "k-1", "hash", 202, {"id": "m1"}, T0 - 10)
            first_in.set()
            threading.Event().wait(0.5)  # still uncommitted while the second one tries

    def second() -> None:
        first_in.wait(10)
        conn = other.conn()
        with transaction(conn):
            outcome["second"] = other.messages.remember_answer(conn, key_id, "k-1", "hash", 202, {"id": "m2"}, T0 - 10)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcome == {"first": True, "second": False}
    assert store.messages.idempotent_answer(store.conn(), key_id, "k-1", 0) == ("hash", 202, {"id": "m1"})


def test_both_backends_end_with_the_same_schema(tmp_path: Path, pg_url: str) -> None:
    """Every migration step's PostgreSQL form (mapped, or written out as a twin) gives the
    same tables, columns, types, NOT NULLs and indexes as its SQLite form."""
    types = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text", "BLOB": "bytea"}
    sqlite_db = SqliteDatabase(tmp_path / "relay.db")
    lite = sqlite_db.connect()
    pg_db = open_database(load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATABASE_URL": pg_url}))
    pg = pg_db.connect()
    try:
        migrations.migrate(lite)
        migrations.migrate(pg)
        # Plain tables: the log's search index is each backend's own (FTS5's virtual and shadow
        # tables on SQLite, a GIN index, log_terms, on PostgreSQL; see relay_core/store/logbook.py).
        tables = {r["name"] for r in lite.execute("PRAGMA table_list")
                  if r["type"] == "table" and r["schema"] == "main" and not r["name"].startswith("sqlite_")}
        lite_schema = {
            # A primary key column is NOT NULL on PostgreSQL (and may as well be on SQLite).
            table: {(c["name"], types[c["type"].upper()], bool(c["notnull"] or c["pk"]))
                    for c in lite.execute(f"PRAGMA table_info({table})")}
            for table in tables
        }
        pg_schema: dict[str, set[tuple[str, str, bool]]] = {}
        for table, column, kind, nullable in pg.execute(
                "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
                " WHERE table_schema = current_schema()"):
            pg_schema.setdefault(table, set()).add((column, kind, nullable == "NO"))
        assert pg_schema == lite_schema
        lite_indexes = {r[0] for r in lite.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%'")}
        pg_indexes = {r[0] for r in pg.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND indexname NOT LIKE '%_pkey'"
            " AND indexname NOT LIKE '%_key'")}
        assert pg_indexes - {"log_terms"} == lite_indexes
    finally:
        lite.close()
        sqlite_db.close()
        pg_db.close()


def test_metric_rows_folded_by_two_sweepers_at_once_are_counted_once(store: Store, other: Store) -> None:
    """Each round leaves three quiet processes' rows; two sweepers fold at the same moment.
    Every row is folded by exactly one of them, and the total never counts a row twice."""
    from relay_core.store import metrics
    rounds = 12
    start, done = threading.Barrier(3), threading.Barrier(3)
    folded: list[int] = []

    def sweeper(s: Store) -> None:
        for _ in range(rounds):
            start.wait()
            folded.append(metrics.fold(s.conn(), T0 + 2 * metrics.FOLD_AFTER_SECONDS))
            done.wait()

    threads = [threading.Thread(target=sweeper, args=(s,)) for s in (store, other)]
    for t in threads:
        t.start()
    conn = store.conn()
    for round_ in range(rounds):
        with transaction(conn):
            conn.executemany("INSERT INTO metric_counts (process, name, label, value, updated_at)"
                             " VALUES (?, ?, '', 1, ?)",
                             [(f"gone-{round_}-{p}", metrics.ACCEPTED, T0) for p in range(3)])
        start.wait(30)
        done.wait(30)
    for t in threads:
        t.join(30)
    assert sum(folded) == 3 * rounds
    assert metrics.totals(conn) == {(metrics.ACCEPTED, ""): 3.0 * rounds}


def test_log_counts_stay_exact_when_two_processes_backfill_or_prune_at_once(store: Store, other: Store) -> None:
    """Rows an older relay wrote (no kind yet) are filled and counted by whichever process
    starts first; two sweepers pruning at once take each row out of the counts once."""
    conn = store.conn()
    hour = T0 // 3600 * 3600  # rows over five whole hours
    now = hour + 400 * 86400
    with transaction(conn):
        conn.executemany("INSERT INTO log (ts, event, status, sender, recipients, subject) VALUES (?, ?, ?, ?, ?, ?)",
                         [(hour + i * 60, "attempt", "sent", "a@example.org", "b@example.org", f"s{i}")
                          for i in range(300)])
    barrier = threading.Barrier(2)

    def both(work: Any) -> None:
        def run(s: Store) -> None:
            barrier.wait()
            work(s)
        threads = [threading.Thread(target=run, args=(s,)) for s in (store, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    def counted() -> tuple[int, int]:
        rows = conn.execute("SELECT COUNT(*) FROM log WHERE kind <> ''").fetchone()[0]
        return int(conn.execute("SELECT COALESCE(SUM(n), 0) FROM log_counts").fetchone()[0]), int(rows)

    both(lambda s: s.migrate())  # each start-up backfills what it finds
    assert counted() == (300, 300)
    # Two whole hours go by age, then the oldest rows over the cap of 100, part of an hour.
    both(lambda s: s.workers.prune(now, sent_body_seconds=1, failed_body_seconds=1, log_seconds=now - (hour + 2 * 3600),
                                   log_max_rows=100, idempotency_seconds=1))
    assert counted() == (100, 100)


def beside(work: Any, outcome: dict[str, Any], name: str) -> threading.Thread:
    """A thread (not started) that puts ``work``'s result, or what it raised, in ``outcome[name]``."""
    def run() -> None:
        try:
            outcome[name] = work()
        except Exception as exc:  # noqa: BLE001  (what the test reports)
            outcome[name] = exc
    return threading.Thread(target=run)


def finished_or_waiting_for_a_lock(thread: threading.Thread, store: Store) -> None:
    """Return once ``thread`` has finished, or one of the database's transactions waits for a lock
    (PostgreSQL; bounded)."""
    for _ in range(3000):
        if not thread.is_alive():
            return
        waiting = store.conn().execute(
            "SELECT COUNT(*) FROM pg_locks WHERE NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0]
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError("the other transaction neither finished nor waited for a lock")


def keyed_message(store: Store, message_id: str, key_id: int) -> NewMessage:
    return NewMessage(
        id=message_id, source="api", api_key_id=key_id, created_at=T0, from_addr="noreply@example.org",
        from_name="", envelope_from="noreply@example.org", subject="hi", message_id_header=f"<{message_id}@x>",
        body=store.keys.encrypt_body(b"body", message_id), size=4, recipients=["a@example.com"])


def messages_of(store: Store, key_id: int) -> list[str]:
    return [r[0] for r in store.conn().execute("SELECT id FROM messages WHERE api_key_id = ? ORDER BY id",
                                               (key_id,))]


@pytest.mark.parametrize("backend", ["postgresql"])  # SQLite's writers take turns: nothing to show there
def test_once_a_revoke_returns_no_send_checked_against_the_key_is_stored_later(
        store: Store, other: Store, backend: str) -> None:
    """An operator revoking a leaked key from another process, then listing (or purging) its
    messages, misses none: the revoke returns only after every batch that checked the key as live
    has committed. The web's writer reads the settings' revision FOR SHARE at its batch's start
    (create_app's at_begin); without it, under READ COMMITTED the revoke commits beside the open
    batch, and the batch then stores a message by the revoked key after the operator looked."""
    key_id, _ = store.api_keys.add("leaked")
    checked = store.revision()
    intake = GroupCommit(store, None, at_begin=functools.partial(store.revision, hold=True))
    in_batch, release = threading.Event(), threading.Event()

    def send(conn: Any) -> tuple[str, list[str]]:  # api.accept's job, paused between its check and its write
        if intake.batch_value != checked:
            raise NothingWritten("checked against settings that changed")
        in_batch.set()
        release.wait(20)
        insert_message(conn, keyed_message(store, "leaked-1", key_id))
        return "stored", []

    listed: dict[str, list[str]] = {}

    def revoke_then_list() -> None:
        other.api_keys.revoke(key_id)
        listed["after the revoke"] = messages_of(other, key_id)

    revoking = threading.Thread(target=revoke_then_list)
    intake.start()
    try:
        stored = intake.submit(send)
        assert in_batch.wait(20)
        revoking.start()
        finished_or_waiting_for_a_lock(revoking, store)
        release.set()
        assert stored.result(20) == "stored"
        revoking.join(20)
    finally:
        release.set()
        intake.stop()
    assert listed == {"after the revoke": ["leaked-1"]}
    assert messages_of(store, key_id) == ["leaked-1"]


def test_rotate_secret_beside_a_group_commit_of_a_keyed_send_neither_deadlocks(store: Store,
                                                                               settings: Settings) -> None:
    """rotate-secret rewrites every key row; a group commit holds the revision (FOR SHARE) and then
    inserts a message naming its key, which waits for a rewritten key row. The rotation takes the
    revision before the key rows, so it waits for the group instead of the two waiting on each
    other (PostgreSQL would kill the rotation as a deadlock)."""
    from relay_core.maintenance.rotation import rotate

    key_id, _ = store.api_keys.add("portal-2")
    checked = store.revision()
    rotating_settings = dataclasses.replace(settings, secret_key=Secret("another-secret-key-9876543210-zyxwvutsrqponm"),
                                            secret_key_old=settings.secret_key)
    rotating = Store(open_database(rotating_settings), crypto.derive_keys(rotating_settings))
    outcome: dict[str, Any] = {}
    thread = beside(lambda: rotate(rotating).api_keys, outcome, "rotated")
    conn = store.conn()
    try:
        with transaction(conn):
            assert store.revision(conn, hold=True) == checked  # as the web's writer begins a batch
            thread.start()
            thread.join(0.5)
            insert_message(conn, keyed_message(store, "keyed-1", key_id))
        thread.join(20)
    finally:
        rotating.shutdown()
    assert outcome["rotated"] >= 2, outcome  # both keys rewritten: the rotation went through
    assert status_of(store, "keyed-1")["api_key_id"] == key_id


@pytest.mark.parametrize("change", ["revoke", "limits", "new primary"])
def test_a_key_change_beside_a_batch_recording_that_keys_use_neither_deadlocks(
        store: Store, other: Store, change: str) -> None:
    """The web's writer thread holds the revision from its batch's start to its commit and, in the
    batch, records a key's last use (an UPDATE of the key's row). A key change by another process
    updates that row too; it moves the revision first (Store._bump_rev), so it waits for the batch
    instead of holding the row the batch waits for (PostgreSQL would kill one as a deadlock)."""
    key_id = next(k.id for k in store.api_keys.all() if k.is_primary) if change == "new primary" else \
        store.api_keys.add("other-portal")[0]
    changes = {"revoke": lambda: other.api_keys.revoke(key_id),
               "limits": lambda: other.api_keys.set_limits(key_id, per_hour=50),
               "new primary": other.api_keys.new_primary}
    outcome: dict[str, Any] = {}

    def key_change() -> str:
        changes[change]()
        return "done"

    thread = beside(key_change, outcome, "change")
    conn = store.conn()
    before = store.revision()
    try:
        with transaction(conn):
            assert store.revision(conn, hold=True) == before
            thread.start()
            thread.join(0.5)  # the change has started, and waits for this batch
            store.api_keys.note_use(conn, key_id, T0 + 1e6)
        outcome["batch"] = "done"
    finally:
        thread.join(20)
    assert outcome == {"batch": "done", "change": "done"}
    assert store.revision() > before
    assert store.conn().execute("SELECT last_used_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()[0] == T0 + 1e6


def test_a_transaction_that_wrote_before_moving_the_revision_is_refused(store: Store) -> None:
    """The lock-order rule of Store._bump_rev is checked, not only written down: a change that
    wrote a row first fails at once, on either backend, and leaves nothing behind."""
    key_id = store.api_keys.add("ordered")[0]
    before = store.revision()
    conn = store.conn()
    with pytest.raises(RuntimeError, match="revision moves first"):
        with transaction(conn):
            conn.execute("UPDATE api_keys SET per_hour = 7 WHERE id = ?", (key_id,))
            store._bump_rev(conn)
    assert store.revision() == before
    assert next(k for k in store.api_keys.all() if k.id == key_id).per_hour is None
    with transaction(conn):  # the same change in the rule's order goes through
        store._bump_rev(conn)
        conn.execute("UPDATE api_keys SET per_hour = 7 WHERE id = ?", (key_id,))
    assert store.revision() > before
