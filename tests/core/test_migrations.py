"""The 0005 migration on a store left by the previous version, messages in every state,
on both backends.

SQLite cannot alter a CHECK constraint, so adding the ``partial`` state
rebuilds the messages table there; with foreign keys on, dropping the old
table would cascade into recipients. PostgreSQL swaps the constraint. These
tests build a 0004 database for real (the earlier steps), fill it, migrate,
and check nothing was lost or loosened.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import pytest

from relay_core.db import migrations
from relay_core.config import Settings
from relay_core.store import open_database, transaction

pytestmark = pytest.mark.backends

OLD_STATES = ("queued", "sending", "sent", "deferred", "failed", "cancelled")
PREVIOUS = [step for step in migrations.MIGRATIONS if step[0] < "0005"]


@pytest.fixture
def conn(settings: Settings) -> Iterator[Any]:
    database = open_database(settings)
    conn = database.connect()
    yield conn
    conn.close()
    database.close()


def fill_previous_version(conn: Any) -> None:
    assert [name for name, _ in PREVIOUS] == ["0001_initial", "0002_pacing", "0003_claims", "0004_admin_ui"]
    migrations.migrate(conn, PREVIOUS)
    now = time.time()
    with transaction(conn):
        conn.execute("INSERT INTO api_keys (id, label, lookup, secret, is_primary, created_at)"
                     " VALUES (1, 'portal', 'l', 's', 1, ?)", (now,))
        for i, state in enumerate(OLD_STATES):
            conn.execute(
                "INSERT INTO messages (id, status, api_key_id, created_at, updated_at, next_attempt_at, from_addr,"
                " envelope_from, subject, message_id_header, size, body, claims, attempts, last_error)"
                " VALUES (?, ?, 1, ?, ?, ?, 'a@example.org', 'a@example.org', ?, '<m@example.org>', 3, ?, ?, ?, ?)",
                (f"m{i}", state, now + i, now + i, now + i, f"subject {i}", b"\x00\x01" + bytes([i]), i, i,
                 f"error {i}" if state in ("deferred", "failed") else None))
            for position in range(2):
                conn.execute("INSERT INTO recipients (message_id, position, address, status) VALUES (?, ?, ?, ?)",
                             (f"m{i}", position, f"r{position}@example.com",
                              "sent" if state == "sent" else "pending"))


def dump(conn: Any, table: str, columns: str) -> list[tuple[Any, ...]]:
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
            for r in conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2")]


MESSAGE_COLUMNS = ("id, status, source, api_key_id, created_at, updated_at, next_attempt_at, enqueued_at,"
                   " lease_owner, lease_expires_at, attempts, last_error, finished_at, from_addr, from_name,"
                   " envelope_from, subject, message_id_header, size, body, claims")
RECIPIENT_COLUMNS = "message_id, position, address, status, code, reply, updated_at"


def refused(conn: Any, sql: str) -> str:
    with pytest.raises(Exception) as caught:
        with transaction(conn):
            conn.execute(sql)
    return str(caught.value).lower()


def test_previous_store_migrates_with_every_row_and_foreign_key_intact(conn: Any) -> None:
    fill_previous_version(conn)
    messages_before = dump(conn, "messages", MESSAGE_COLUMNS)
    recipients_before = dump(conn, "recipients", RECIPIENT_COLUMNS)
    assert len(messages_before) == 6 and len(recipients_before) == 12
    assert "check" in refused(conn, "UPDATE messages SET status = 'partial' WHERE id = 'm2'")  # the old CHECK

    assert migrations.migrate(conn)[:1] == ["0005_partial_and_recipient_kind"]  # later steps may follow

    assert dump(conn, "messages", MESSAGE_COLUMNS) == messages_before
    assert dump(conn, "recipients", RECIPIENT_COLUMNS) == recipients_before
    assert {r[0] for r in conn.execute("SELECT kind FROM recipients")} == {"to"}
    if conn.dialect == "sqlite":
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                              " AND tbl_name = 'messages'")}
        assert {"messages_status_due", "messages_created"} <= indexes

    with transaction(conn):
        conn.execute("UPDATE messages SET status = 'partial' WHERE id = 'm2'")  # the new state is allowed
    assert "check" in refused(conn, "UPDATE messages SET status = 'bogus' WHERE id = 'm2'")
    # recipients still reference messages: a delete still cascades, an orphan is still refused.
    with transaction(conn):
        conn.execute("DELETE FROM messages WHERE id = 'm0'")
    assert conn.execute("SELECT COUNT(*) FROM recipients WHERE message_id = 'm0'").fetchone()[0] == 0
    assert "foreign key" in refused(
        conn, "INSERT INTO recipients (message_id, position, address) VALUES ('nope', 0, 'x@example.com')")
    assert migrations.migrate(conn) == []  # idempotent


def test_migrations_at_start_say_which_ran_from_which_version_to_which(
        conn: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    migrations.migrate(conn, PREVIOUS)
    caplog.clear()
    applied = migrations.migrate(conn)
    lines = [r.getMessage() for r in caplog.records if "migrat" in r.getMessage()]
    last = len(migrations.MIGRATIONS)
    assert lines == [f"migrated the store from version 4 to {last}: {', '.join(applied)}"]
    caplog.clear()
    assert migrations.migrate(conn) == [] and not [r for r in caplog.records if "migrat" in r.getMessage()]
