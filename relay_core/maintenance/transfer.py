"""Moving a SQLite store into an empty PostgreSQL database (`tspro-relay migrate-store`).

One PostgreSQL transaction creates the schema and copies every table as it is
(still encrypted), so a failure leaves the target empty. relay.db is then marked
as moved, so a process started without RELAY_DATABASE_URL refuses it instead of
delivering the same waiting mail twice.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ..db import migrations
from ..config import Settings
from ..db.postgres import PgConnection, connect_once, mask_url
from ..db.sqlite import StoreInUse, hold_exclusive
from ..store import MOVED_MARK, Store, transaction


class TransferRefused(Exception):
    """migrate-store will not run; the message says why and what to do."""


@dataclass
class TransferReport:
    target: str
    tables: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)


def _tables_in_dependency_order(conn: Any) -> list[str]:
    """relay.db's tables, each after the tables its foreign keys point to."""
    # Plain tables only: the log's FTS5 search index (a virtual table and its shadow tables) is
    # SQLite's own; PostgreSQL's migration builds its GIN index over the copied words.
    names = sorted(r["name"] for r in conn.execute("PRAGMA table_list")
                   if r["type"] == "table" and r["schema"] == "main" and not r["name"].startswith("sqlite_"))
    depends = {name: {r["table"] for r in conn.execute(f"PRAGMA foreign_key_list({name})")} - {name}
               for name in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and depends[n] <= set(ordered)]
        if not ready:
            raise TransferRefused(f"relay.db's foreign keys form a cycle among {sorted(set(names) - set(ordered))}")
        ordered.extend(ready)
    return ordered


def _target_columns(raw: Any, table: str) -> list[str]:
    return [r[0] for r in raw.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = %s ORDER BY ordinal_position", (table,))]


def _copy_table(source: Any, raw: Any, table: str) -> int:
    columns = [r["name"] for r in source.execute(f"PRAGMA table_info({table})")]
    missing = set(columns) - set(_target_columns(raw, table))
    if missing:
        raise TransferRefused(
            f"the PostgreSQL schema has no column(s) {sorted(missing)} for table {table}: a migration step "
            "is missing its PostgreSQL form; nothing was copied.")
    names = ", ".join(columns)
    copied = 0
    with raw.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for row in source.execute(f"SELECT {names} FROM {table}"):
            copy.write_row(tuple(row))
            copied += 1
    return copied


def _reset_identities(raw: Any) -> None:
    """Identity columns continue after the copied ids, as SQLite's rowids would."""
    for table, column in raw.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND is_identity = 'YES'").fetchall():
        raw.execute(f"SELECT setval(pg_get_serial_sequence(%s, %s), GREATEST(MAX({column}), 1),"
                    f" MAX({column}) IS NOT NULL) FROM {table}", (table, column))


def copy_store(settings: Settings, target_url: str) -> TransferReport:
    """Copy the data directory's relay.db into the empty PostgreSQL database at ``target_url``."""
    if not settings.db_path.exists():
        raise TransferRefused(f"there is no store to move at {settings.db_path} (check RELAY_DATA_DIR).")
    report = TransferReport(mask_url(target_url))
    try:
        with hold_exclusive(settings.db_path):
            store = Store.open(dataclasses.replace(settings, database_url=None))
            try:
                _copy(store, target_url, report)
            finally:
                store.shutdown()
    except StoreInUse as exc:
        raise TransferRefused(f"{exc} Nothing was copied.") from None
    return report


def _copy(store: Store, target_url: str, report: TransferReport) -> None:
    source = store.conn()
    raw = connect_once(target_url)
    try:
        with raw.transaction():
            target = PgConnection.pinned(raw)
            # A relay starting on the target meanwhile waits here, then finds the schema made.
            target.serialize("tspro-relay migrations")
            existing = [r[0] for r in raw.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                " ORDER BY table_name")]
            if existing:
                shown = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
                raise TransferRefused(
                    f"{report.target} is not empty (it has the tables {shown}); migrate-store copies into an "
                    "empty database only. Create a new one (createdb) or drop these tables first.")
            for version, (name, sql) in enumerate(migrations.MIGRATIONS, start=1):
                migrations.apply_step(target, version, name, sql)
            for table in _tables_in_dependency_order(source):
                if table == "schema_migrations":
                    continue  # the target records its own steps, just applied
                report.tables[table] = _copy_table(source, raw, table)
            _reset_identities(raw)
            for table, count in report.tables.items():
                there = raw.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # type: ignore[index]
                if there != count:
                    raise TransferRefused(f"{table}: {count} rows read but {there} in PostgreSQL; nothing was kept.")
            report.messages = {r[0]: r[1] for r in raw.execute(
                "SELECT status, COUNT(*) FROM messages GROUP BY status ORDER BY status")}
    finally:
        raw.close()
    with transaction(source):
        source.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                       " SET value = excluded.value",
                       (MOVED_MARK, json.dumps({"to": report.target, "at": time.time()})))

