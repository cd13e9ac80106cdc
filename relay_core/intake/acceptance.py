"""Accepted messages written many at a time: the web's group commit hands a batch's rows here.

The same rows and counts as ``ledger.insert_message`` and ``insert_log``, with a
few statements per table instead of one per row: one at a time cost four round
trips per message on PostgreSQL, and on SQLite a GIL hand-over per row that the
event loop pays for.
"""

from __future__ import annotations

from ..crypto import KeySet
from ..db import Connection, pipelined
from ..db.sqlite import BLOB_STREAM_THRESHOLD
from ..store.ledger import INSERT_MESSAGE, NewMessage, insert_message
from ..store.logbook import LogEntry, count_log_rows, log_kind, next_log_id, search_terms

_INSERT_LOG = ("INSERT INTO log (ts, event, message_id, status, stage, code, detail, duration_ms,"
               " source_ip, sender, recipients, subject, attachments, kind, terms)"
               " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_INSERT_RECIPIENT = "INSERT INTO recipients (message_id, position, address, kind) VALUES (?, ?, ?, ?)"


def insert_logs(conn: Connection, entries: list[LogEntry]) -> None:
    """``insert_log`` for many rows at once, counted and indexed with them."""
    rows, counted = [], []
    for entry in entries:
        kind = log_kind(entry.event, entry.status, entry.code)
        rows.append((entry.ts, entry.event, entry.message_id, entry.status, entry.stage, entry.code,
                     entry.detail, entry.duration_ms, entry.source_ip, entry.sender, entry.recipients,
                     entry.subject, entry.attachments, kind,
                     search_terms(entry.message_id or "", entry.sender, entry.recipients, entry.subject)))
        counted.append((kind, entry.ts))
    first = next_log_id(conn)
    conn.insert_rows(_INSERT_LOG, rows)
    count_log_rows(conn, counted, first)


def insert_messages(conn: Connection, messages: list[NewMessage]) -> None:
    """``insert_message`` for many (a few statements per table); large bodies one by one."""
    small = []
    for msg in messages:
        if len(msg.body) > BLOB_STREAM_THRESHOLD:
            insert_message(conn, msg)
        else:
            small.append(msg)
    conn.insert_rows(INSERT_MESSAGE, [
        (msg.id, msg.source, msg.api_key_id, msg.created_at, msg.created_at, msg.created_at, msg.created_at,
         msg.from_addr, msg.from_name, msg.envelope_from, msg.subject, msg.message_id_header, msg.size,
         msg.attachments, msg.body) for msg in small])
    conn.insert_rows(_INSERT_RECIPIENT, [
        (msg.id, i, addr, kind) for msg in small
        for i, (addr, kind) in enumerate(zip(msg.recipients, msg.kinds or ["to"] * len(msg.recipients)))])


def insert_accepted(conn: Connection, accepted: list[tuple[NewMessage, LogEntry, bytes | bytearray]],
                    keys: KeySet) -> None:
    """Accepted messages with their log rows, many at once (the web's group commit writes these).

    Sealed here, in the writer thread, so the event loop never waits on encryption.
    """
    for msg, _, document in accepted:
        msg.body = keys.encrypt_body(document, msg.id)
    with pipelined(conn):  # on PostgreSQL: the four tables' rows in one round trip
        insert_messages(conn, [msg for msg, _, _ in accepted])
        insert_logs(conn, [entry for _, entry, _ in accepted])
