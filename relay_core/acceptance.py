"""Accepted messages written many at a time: the web's group commit hands a batch's rows here.

``ledger.insert_message`` and ``insert_log`` write one message or log row
with a statement each; a batch of accepts written that way costs, on
PostgreSQL, four round trips per message. These write a batch's messages,
recipients, log rows and log counts with one ``executemany`` per table, all
in one pipeline on PostgreSQL (one round trip); SQLite, where a statement
costs no round trip, still inserts log rows one by one because its search
index needs each row's id. Same rows, same counts, as the one-at-a-time
functions would write.
"""

from __future__ import annotations

from .db import Connection, pipelined
from .db_sqlite import BLOB_STREAM_THRESHOLD
from .ledger import INSERT_MESSAGE, LogEntry, NewMessage, insert_message
from .logbook import count_log_rows, log_kind, search_terms

_INSERT_LOG = ("INSERT INTO log (ts, event, message_id, status, stage, code, detail, duration_ms,"
               " source_ip, sender, recipients, subject, attachments, kind, terms)"
               " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


def insert_logs(conn: Connection, entries: list[LogEntry]) -> None:
    """``insert_log`` for many rows at once (on PostgreSQL, one round trip for all of them).

    SQLite needs each row's id for its search index, and a statement there costs
    no round trip, so it inserts them one by one.
    """
    rows = []
    for entry in entries:
        kind = log_kind(entry.event, entry.status, entry.code)
        terms = search_terms(entry.sender, entry.recipients, entry.subject)
        rows.append(((entry.ts, entry.event, entry.message_id, entry.status, entry.stage, entry.code,
                      entry.detail, entry.duration_ms, entry.source_ip, entry.sender, entry.recipients,
                      entry.subject, entry.attachments, kind, terms), kind, entry.ts, terms))
    if conn.dialect == "sqlite":
        ids: list[int | None] = [int(conn.execute(_INSERT_LOG + " RETURNING id", values).fetchone()[0])
                                 for values, _, _, _ in rows]
    else:
        conn.executemany(_INSERT_LOG, [values for values, _, _, _ in rows])
        ids = [None] * len(rows)
    count_log_rows(conn, [(log_id, kind, ts, terms) for log_id, (_, kind, ts, terms) in zip(ids, rows)])


def insert_messages(conn: Connection, messages: list[NewMessage]) -> None:
    """``insert_message`` for many (on PostgreSQL, one round trip per table); large bodies one by one."""
    small = [msg for msg in messages if len(msg.body) <= BLOB_STREAM_THRESHOLD]
    for msg in messages:
        if len(msg.body) > BLOB_STREAM_THRESHOLD:
            insert_message(conn, msg)
    conn.executemany(INSERT_MESSAGE, [
        (msg.id, msg.source, msg.api_key_id, msg.created_at, msg.created_at, msg.created_at, msg.created_at,
         msg.from_addr, msg.from_name, msg.envelope_from, msg.subject, msg.message_id_header, msg.size,
         msg.attachments, msg.body) for msg in small])
    conn.executemany(
        "INSERT INTO recipients (message_id, position, address, kind) VALUES (?, ?, ?, ?)",
        [(msg.id, i, addr, kind) for msg in small
         for i, (addr, kind) in enumerate(zip(msg.recipients, msg.kinds or ["to"] * len(msg.recipients)))],
    )


def insert_accepted(conn: Connection, accepted: list[tuple[NewMessage, LogEntry]]) -> None:
    """Accepted messages with their log rows, many at once (the web's group commit writes these)."""
    with pipelined(conn):  # on PostgreSQL: the four tables' rows in one round trip
        insert_messages(conn, [msg for msg, _ in accepted])
        insert_logs(conn, [entry for _, entry in accepted])
