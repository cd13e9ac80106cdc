"""The queue as the admin pages see it: counts, the oldest waiting message, lists, one message.

Reads only. They must stay quick with 100,000 messages waiting, so every
query walks the (status, created_at) index for one state at a time: a count
is an index range, the oldest waiting message is the first entry of a range,
and a list is the first page of one (merged here when it spans two states).
Counts of finished mail come from the log's hourly counts (``logbook.py``),
not from the messages table, which keeps finished rows for the log's
retention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .part import Part
from ..message import OutgoingMessage, unpack_stored

WAITING = ("queued", "deferred")
RETRYABLE = ("deferred", "failed")
CANCELLABLE = ("queued", "deferred")
DAY = 86400.0


@dataclass(frozen=True)
class QueueCounts:
    queued: int
    sending: int
    deferred: int
    failed: int
    sent_24h: int
    partial_24h: int
    failed_24h: int
    oldest_waiting_at: float | None

    @property
    def waiting(self) -> int:
        return self.queued + self.deferred


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    status: str
    created_at: float
    next_attempt_at: float
    attempts: int
    last_error: str | None
    from_addr: str
    subject: str
    recipients: list[str]


@dataclass(frozen=True)
class MessageRecipient:
    position: int
    address: str
    kind: str  # to, cc, bcc
    status: str
    code: int | None
    reply: str | None


@dataclass
class MessageRecord:
    id: str
    status: str
    source: str
    created_at: float
    updated_at: float
    finished_at: float | None
    next_attempt_at: float
    attempts: int
    last_error: str | None
    from_addr: str
    from_name: str
    envelope_from: str
    subject: str
    message_id_header: str
    size: int
    attachments: int
    has_body: bool
    recipients: list[MessageRecipient] = field(default_factory=list)

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE and (self.has_body or self.status == "deferred")

    @property
    def cancellable(self) -> bool:
        return self.status in CANCELLABLE


def _queued(row: Any, recipients: list[str]) -> QueuedMessage:
    return QueuedMessage(row["id"], row["status"], float(row["created_at"]), float(row["next_attempt_at"]),
                         int(row["attempts"]), row["last_error"], row["from_addr"], row["subject"], recipients)


class QueueView(Part):
    def queue_counts(self, now: float | None = None) -> QueueCounts:
        now = time.time() if now is None else now
        conn = self.conn()
        n = {status: int(conn.execute("SELECT COUNT(*) FROM messages WHERE status = ?", (status,)).fetchone()[0])
             for status in ("queued", "sending", "deferred", "failed")}
        oldest = [conn.execute("SELECT MIN(created_at) FROM messages WHERE status = ?", (status,)).fetchone()[0]
                  for status in WAITING]
        finished = self.store.log.counters(now - DAY, now + 1)
        return QueueCounts(n["queued"], n["sending"], n["deferred"], n["failed"], finished["sent"],
                           finished["partial"], finished["failed"],
                           min((float(t) for t in oldest if t is not None), default=None))

    def _with_recipients(self, rows: list[Any], shown: int = 3) -> list[QueuedMessage]:
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        marks = ", ".join("?" for _ in ids)
        addresses: dict[str, list[str]] = {i: [] for i in ids}
        for message_id, address in self.conn().execute(
                f"SELECT message_id, address FROM recipients WHERE message_id IN ({marks})"
                f" ORDER BY message_id, position", ids):
            addresses[message_id].append(address)
        return [_queued(r, addresses[r["id"]]) for r in rows]

    def waiting(self, limit: int = 50) -> list[QueuedMessage]:
        rows: list[Any] = []
        for status in WAITING:
            rows += self.conn().execute(
                "SELECT id, status, created_at, next_attempt_at, attempts, last_error, from_addr, subject"
                " FROM messages WHERE status = ? ORDER BY created_at, id LIMIT ?", (status, limit)).fetchall()
        rows.sort(key=lambda r: (r["created_at"], r["id"]))
        return self._with_recipients(rows[:limit])

    def failed(self, limit: int = 50) -> list[QueuedMessage]:
        rows = self.conn().execute(
            "SELECT id, status, created_at, next_attempt_at, attempts, last_error, from_addr, subject"
            " FROM messages WHERE status = 'failed' ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)).fetchall()
        return self._with_recipients(rows)

    def record(self, message_id: str) -> MessageRecord | None:
        conn = self.conn()
        row = conn.execute(
            "SELECT id, status, source, created_at, updated_at, finished_at, next_attempt_at, attempts, last_error,"
            " from_addr, from_name, envelope_from, subject, message_id_header, size, attachments,"
            " CASE WHEN body IS NULL THEN 0 ELSE 1 END AS has_body FROM messages WHERE id = ?",
            (message_id,)).fetchone()
        if row is None:
            return None
        rows = conn.execute("SELECT * FROM recipients WHERE message_id = ? ORDER BY position",
                            (message_id,)).fetchall()
        recipients = [MessageRecipient(int(r["position"]), r["address"], r["kind"], r["status"], r["code"],
                                       r["reply"]) for r in rows]
        return MessageRecord(
            row["id"], row["status"], row["source"], float(row["created_at"]), float(row["updated_at"]),
            row["finished_at"], float(row["next_attempt_at"]), int(row["attempts"]), row["last_error"],
            row["from_addr"], row["from_name"], row["envelope_from"], row["subject"], row["message_id_header"],
            int(row["size"]), int(row["attachments"]), bool(row["has_body"]), recipients)

    def document(self, message_id: str) -> OutgoingMessage | None:
        """The stored message, decrypted and parsed; None when its body was pruned (or it is unknown).

        Raises ``crypto.DecryptionError`` when this process's key cannot read it.
        """
        row = self.conn().execute("SELECT body FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None or row["body"] is None:
            return None
        document = self.store.keys.decrypt_body(bytes(row["body"]), message_id)
        return unpack_stored(document)
