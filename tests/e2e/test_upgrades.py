"""Upgrades never lose mail: a store made by each earlier version, migrated and run by this code.

tests/fixtures/stores/vN.db was written by the code of the commit that
introduced schema version N, running as an operator runs it (see
tests/fixtures/make_store.py): settings with an encrypted SMTP password, the
portal key and a second named key, and sent, failed, mixed, deferred and
queued messages with their log. For each one:

1. this code's CLI opens it (which migrates it) and every row of every table
   the old version had is still there, unchanged;
2. the keys still authenticate, the admin password still signs in;
3. this code's worker logs in to SMTP with the stored password and delivers
   the queued and deferred messages, each once, attachments intact; nothing
   that was finished is touched.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from relay_core import crypto
from relay_core.db import migrations
from relay_core.config import load_settings
from relay_core.store import Store
from support import REPO, Relay, SmtpServer

pytestmark = pytest.mark.slow
FIXTURES = REPO / "tests" / "fixtures" / "stores"
CURRENT = len(migrations.MIGRATIONS)
VERSIONS = sorted(int(p.stem[1:]) for p in FIXTURES.glob("v*.json"))
# Tables whose rows the relay appends to as it runs (a migration still must not change old rows).
APPEND_ONLY = {"schema_migrations", "meta", "log", "workers", "pacing", "metric_counts"}


def test_every_earlier_schema_version_has_a_fixture() -> None:
    assert set(range(1, CURRENT)) <= set(VERSIONS), "make one with: python tests/fixtures/make_store.py N"


def table_rows(db: Path) -> dict[str, list[dict[str, Any]]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                            " AND name NOT LIKE 'sqlite_%'")]
        return {name: [dict(r) for r in conn.execute(f'SELECT * FROM "{name}"')] for name in names}
    finally:
        conn.close()


def metric_totals(tables: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], float]:
    totals: dict[tuple[str, str], float] = {}
    for row in tables.get("metric_counts", []):
        totals[(row["name"], row["label"])] = totals.get((row["name"], row["label"]), 0.0) + row["value"]
    return totals


def differences(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]],
                skip: set[str] = frozenset(), changed_ids: set[str] = frozenset(),
                ignore: dict[str, set[str]] | None = None) -> list[str]:
    """Rows of ``before`` missing or altered in ``after`` (old columns only), and rows added to old tables."""
    problems = []
    for table, rows in before.items():
        if table in skip:
            continue
        if table not in after:
            problems.append(f"table {table} is gone")
            continue
        columns = (set(rows[0]) if rows else set()) - (ignore or {}).get(table, set())
        seen = [{k: v for k, v in row.items() if k in columns} for row in after[table]]
        for row in rows:
            if changed_ids and (row.get("message_id") in changed_ids or
                                (table == "messages" and row.get("id") in changed_ids)):
                continue
            if {k: v for k, v in row.items() if k in columns} not in seen:
                problems.append(f"{table}: {row} changed or vanished")
        if table not in APPEND_ONLY and len(after[table]) != len(rows):
            problems.append(f"{table}: {len(rows)} rows became {len(after[table])}")
    return problems


@pytest.mark.parametrize("version", VERSIONS, ids=[f"v{v}" for v in VERSIONS])
def test_a_store_from_an_earlier_version_migrates_and_delivers_its_waiting_mail(tmp_path: Path,
                                                                                version: int) -> None:
    facts = json.loads((FIXTURES / f"v{version}.json").read_text())
    assert facts["version"] == version
    (tmp_path / "data").mkdir()
    db = tmp_path / "data" / "relay.db"
    shutil.copyfile(FIXTURES / f"v{version}.db", db)
    before = table_rows(db)

    relay = Relay(tmp_path, RELAY_SECRET_KEY=facts["secret"], RELAY_ADMIN_PASSWORD=facts["admin_password"])
    try:
        # 1. Any command migrates; what the old version wrote is all still there.
        assert relay.key == facts["api_keys"]["portal"]
        migrated = table_rows(db)
        assert migrated["schema_migrations"][-1]["version"] == CURRENT
        assert differences(before, migrated) == []

        # 2. Keys and the admin password still work.
        settings = load_settings({k: v for k, v in relay.env.items() if k.startswith("RELAY_")})
        store = Store(settings.db_path, crypto.derive_keys(settings))
        try:
            assert store.api_keys.authenticate(facts["api_keys"]["second"]) is not None
            assert store.admin.check_password("admin", facts["admin_password"])
            assert store.options().smtp_password == "smtp-pass-Zq8!unique"
        finally:
            store.shutdown()

        # 3. This code's worker delivers exactly what was waiting.
        waiting = facts["ids"]["queued"] + facts["ids"]["deferred"]
        with SmtpServer("none", auth=True) as server:
            relay.configure(f"smtp_port={server.port}")
            relay.start_worker()
            relay.start_web()
            for message_id in waiting:
                relay.wait_status(message_id, "sent", "failed", timeout=60)
            time.sleep(1)  # a second delivery of anything would show up now
            received = {r.message["Message-ID"]: r for r in server.received}
        assert sorted(received) == sorted(f"<{i}@example.org>" for i in waiting)
        assert all(r.auth == "relayuser" for r in received.values())
        for message_id in waiting:
            assert relay.status(message_id)["status"] == "sent"
        rich = received[f"<{facts['ids']['queued'][1]}@example.org>"].message
        assert rich["Reply-To"] == "Help Desk <help@example.org>"
        parts = {part.get_content_type(): part for part in rich.walk()}
        assert parts["application/pdf"].get_filename() == "minutes.pdf"
        assert parts["application/pdf"].get_content().startswith(b"%PDF-1.4\nfixture attachment\n")
        assert "<b>body</b>" in parts["text/html"].get_content()
        # The key that sent a finished message reads it through the API, as the portal would; another
        # key is told it does not exist (a key sees only the messages it sent).
        sent_id = facts["ids"]["sent"][0]
        assert relay.status(sent_id)["status"] == "sent"
        answer = relay.http.get(f"/api/messages/{sent_id}",
                                headers={"Authorization": f"Bearer {facts['api_keys']['second']}"})
        assert answer.status_code == 404
    finally:
        relay.close()

    # Nothing else changed: only the delivered messages, the SMTP port the test set (and the
    # settings revision that counts such changes, and its audit row), when the keys were last used, and
    # idempotency answers older than their 24-hour window (pruned by the sweeper) differ.
    # Metric rows of long-gone processes are folded into one by the sweeper: their totals stay.
    after = table_rows(db)
    # (From v7 on, log_counts counts log rows per hour and log_fts* index their words: the
    # deliveries' rows move both.)
    derived = {name for name in after if name == "log_counts" or name.startswith("log_fts")}
    # The admin's scrypt hash became Argon2id when step 2 checked the password.
    assert [row["password_hash"][:10] for row in after["admins"]] == ["$argon2id$"]
    problems = differences(before, after, skip={"idempotency", "metric_counts"} | derived, changed_ids=set(waiting),
                           ignore={"api_keys": {"last_used_at"}, "admins": {"password_hash"}})
    # (From v4 on, the store has an audit trail, where `config set` now records the port change.)
    expected = ("settings: {'name': 'smtp_port'", "meta: {'name': 'rev'", "audit: 0 rows became 1")
    assert [p for p in problems if not p.startswith(expected)] == []
    old_totals, new_totals = metric_totals(before), metric_totals(after)
    assert all(new_totals.get(key, 0.0) >= value for key, value in old_totals.items()), (old_totals, new_totals)
