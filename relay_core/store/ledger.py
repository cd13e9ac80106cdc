"""The message side of the store: accepted messages, claims, attempts, the log.

A message row and its encrypted body are committed before the web process
answers 202; a worker claims a message with a conditional UPDATE checked by
rowcount, so only one claimer ever delivers it (huey's ``dequeue`` and
healthchecks' ``sendalerts`` use the same pattern), and only the lease holder
records the outcome. Functions return dataclasses; raw rows stay in here.
The SQL runs on both backends (see ``relay_core/db``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import crypto
from . import metrics
from ..crypto import KeySet
from ..db import Connection, insert_blob, serialize, transaction
from .part import Part
from .logbook import LogEntry, insert_log
from ..message import OutgoingMessage, message_id_header
from ..options import Options

FINAL_STATES = ("sent", "partial", "failed", "cancelled")
MESSAGE_STATES = ("queued", "sending", "deferred", *FINAL_STATES)
RECIPIENT_STATES = ("pending", "sent", "deferred", "failed", "cancelled")
# Stages at which a failure says the mail server cannot be used at all (as
# opposed to one message or recipient being refused).
CONNECTION_STAGES = ("connect", "EHLO", "STARTTLS", "AUTH")
# Claims with no outcome recorded (the worker died each time, say on a message
# that crashes it) before the message is failed instead of taken once more.
MAX_UNRECORDED_CLAIMS = 5


@dataclass
class NewMessage:
    id: str
    source: str
    api_key_id: int | None
    created_at: float
    from_addr: str
    from_name: str
    envelope_from: str
    subject: str
    message_id_header: str
    body: bytes
    size: int
    recipients: list[str]
    kinds: list[str] = field(default_factory=list)  # to/cc/bcc per recipient; empty means all 'to'
    attachments: int = 0

    @classmethod
    def accepted(cls, message: OutgoingMessage, message_id: str, sealed: bytes, created: float,
                 options: Options, source: str, api_key_id: int | None,
                 attachments: int | None = None, size: int | None = None) -> "NewMessage":
        """The row for a validated message whose stored document is ``sealed``.

        ``attachments``: their count, when the caller has already let go of them.
        ``size``: the document's, when it is sealed later (``sealed`` is then empty).
        """
        envelope = message.envelope
        return cls(
            id=message_id, source=source, api_key_id=api_key_id, created_at=created,
            from_addr=message.from_email, from_name=message.from_name,
            envelope_from=options.envelope_from or message.from_email, subject=message.subject,
            message_id_header=message_id_header(message_id, message.from_email), body=sealed,
            size=len(sealed) - crypto.BODY_OVERHEAD if size is None else size, recipients=[a for a, _ in envelope],
            kinds=[k for _, k in envelope],
            attachments=len(message.attachments) if attachments is None else attachments,
        )


@dataclass
class Recipient:
    position: int
    address: str
    status: str
    code: int | None
    reply: str | None


@dataclass
class ClaimedMessage:
    id: str
    envelope_from: str
    from_addr: str
    subject: str
    sealed: bytes | None
    created_at: float
    attempts: int
    recipients: list[Recipient]
    lease_owner: str
    keys: KeySet | None = None
    attachments: int = 0
    sealed_size: int = 0  # the stored body's length, also when the claim left it out (``room``)

    @property
    def body(self) -> bytes:
        """The stored document, decrypted on first use (raises ``DecryptionError``)."""
        if self.sealed is None or self.keys is None:
            return b""
        return self.keys.decrypt_body(self.sealed, self.id)


INSERT_MESSAGE = (
    "INSERT INTO messages (id, status, source, api_key_id, created_at, updated_at, next_attempt_at, enqueued_at,"
    " from_addr, from_name, envelope_from, subject, message_id_header, size, attachments, body)"
    " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def insert_message(conn: Connection, msg: NewMessage) -> None:
    # The body last: a large one is streamed into SQLite rather than bound (see db/sqlite.py).
    insert_blob(conn, INSERT_MESSAGE, (
        msg.id, msg.source, msg.api_key_id, msg.created_at, msg.created_at, msg.created_at, msg.created_at,
        msg.from_addr, msg.from_name, msg.envelope_from, msg.subject, msg.message_id_header, msg.size,
        msg.attachments, msg.body,
    ), "messages", "body")
    kinds = msg.kinds or ["to"] * len(msg.recipients)
    conn.executemany(
        "INSERT INTO recipients (message_id, position, address, kind) VALUES (?, ?, ?, ?)",
        [(msg.id, i, addr, kind) for i, (addr, kind) in enumerate(zip(msg.recipients, kinds))],
    )


@dataclass
class Paced:
    """A claim held back by an outbound limit: the message waits until ``until``."""

    until: float
    reason: str


def _pacing_wait(conn: Connection, now: float,
                 limits: tuple[tuple[int, float], ...]) -> Paced | None:
    wait: Paced | None = None
    for allowed, window in limits:
        used = conn.execute("SELECT COUNT(*) FROM pacing WHERE ts > ?", (now - window,)).fetchone()[0]
        if used < allowed:
            continue
        # The slot frees when the oldest delivery still counted leaves the window.
        oldest = conn.execute("SELECT ts FROM pacing WHERE ts > ? ORDER BY ts LIMIT 1 OFFSET ?",
                              (now - window, used - allowed)).fetchone()[0]
        # Spread the held-back messages over a slot's length so one freed slot does
        # not wake the whole backlog at once.
        until = oldest + window + 0.001 + random.uniform(0, min(5.0, window / allowed))
        if wait is None or until > wait.until:
            unit = {60: "minute", 3600: "hour", 86400: "day"}.get(int(window), f"{window:g} s")
            wait = Paced(until, f"waiting for the outbound limit of {allowed} deliveries per {unit}")
    return wait


def _fail_interrupted(conn: Connection, message_id: str, interrupted: int, now: float) -> None:
    reason = (f"delivery was interrupted {interrupted} times with no outcome recorded (the worker stopped "
              "or crashed during each attempt); giving up")
    conn.execute("UPDATE messages SET status = 'failed', lease_owner = NULL, lease_expires_at = NULL,"
                 " last_error = ?, finished_at = ?, updated_at = ? WHERE id = ?", (reason, now, now, message_id))
    conn.execute("UPDATE recipients SET status = 'failed', reply = ?, updated_at = ? WHERE message_id = ?"
                 " AND status IN ('pending', 'deferred')", (reason, now, message_id))
    row = conn.execute("SELECT from_addr, subject, attachments FROM messages WHERE id = ?", (message_id,)).fetchone()
    metrics.count_attempt(conn, "failed", None, now)
    insert_log(conn, LogEntry("attempt", "failed", message_id=message_id, stage="queue", detail=reason,
                              sender=row["from_addr"], subject=row["subject"], ts=now,
                              attachments=row["attachments"]))


_CLAIMED = ("id, envelope_from, from_addr, subject, created_at, attempts, claims, attachments,"
            " length(body) AS sealed_size")


def claim_message(conn: Connection, keys: KeySet, message_id: str, owner: str, lease_seconds: float,
                  now: float, limits: tuple[tuple[int, float], ...] = (),
                  room: int | None = None) -> ClaimedMessage | Paced | None:
    """Inside a transaction: queued/deferred and due (or sending with an expired lease) -> sending,
    leased to ``owner``.

    Returns None when another worker got there first, the message is not
    due yet, or it is finished: a duplicate wake-up is a harmless no-op.
    ``limits`` are (deliveries, per seconds) pairs; when one is reached the
    message goes back to deferred until a slot frees (``Paced``). The
    count is taken under the write lock (an advisory lock on PostgreSQL),
    so every worker process shares it. The UPDATE is the first write.
    ``room``: the stored body comes with the claim only if it is at most
    this many bytes (``sealed`` is None otherwise; ``sealed_size`` says
    how large it is, and ``read_body`` reads it once there is room).
    """
    body = "body" if room is None else "CASE WHEN length(body) <= ? THEN body END AS body"
    row = conn.execute(
        "UPDATE messages SET status = 'sending', lease_owner = ?, lease_expires_at = ?,"
        " updated_at = ?, claims = claims + 1"
        " WHERE id = ? AND ((status IN ('queued', 'deferred') AND next_attempt_at <= ?)"
        f" OR (status = 'sending' AND lease_expires_at < ?)) RETURNING {_CLAIMED}, {body}",
        (owner, now + lease_seconds, now, message_id, now, now, *(() if room is None else (room,))),
    ).fetchone()
    if row is None:
        return None
    if row["claims"] - row["attempts"] > MAX_UNRECORDED_CLAIMS:
        _fail_interrupted(conn, message_id, row["claims"] - row["attempts"] - 1, now)
        return None
    if limits:
        serialize(conn, "tspro-relay pacing")  # one count at a time across all workers
        paced = _pacing_wait(conn, now, limits)
        if paced is not None:
            conn.execute(
                "UPDATE messages SET status = 'deferred', lease_owner = NULL, lease_expires_at = NULL,"
                " next_attempt_at = ?, enqueued_at = ?, last_error = ?, claims = claims - 1 WHERE id = ?",
                (paced.until, paced.until, paced.reason, message_id))
            return paced
        conn.execute("INSERT INTO pacing (ts) VALUES (?)", (now,))
    recipients = [
        Recipient(r["position"], r["address"], r["status"], r["code"], r["reply"])
        for r in conn.execute("SELECT position, address, status, code, reply FROM recipients"
                              " WHERE message_id = ? ORDER BY position", (message_id,))
    ]
    return ClaimedMessage(row["id"], row["envelope_from"], row["from_addr"], row["subject"], row["body"],
                          row["created_at"], row["attempts"], recipients, owner, keys, row["attachments"],
                          row["sealed_size"] or 0)


@dataclass
class AttemptOutcome:
    message_id: str
    lease_owner: str
    status: str
    next_attempt_at: float | None
    last_error: str | None
    recipient_updates: dict[int, tuple[str, int | None, str | None]]
    entry: LogEntry
    now: float


def write_attempt_log(conn: Connection, entry: LogEntry, now: float) -> None:
    insert_log(conn, entry)
    metrics.count_attempt(conn, entry.status, entry.duration_ms, now)


def record_outcome(conn: Connection, outcome: AttemptOutcome,
                   log: Callable[[LogEntry], None] | None = None) -> bool:
    """Inside a transaction: store one attempt's outcome, if its worker still holds the lease.

    ``log`` writes the log row (default: now, with ``write_attempt_log``); the
    worker's group commit passes one that writes the batch's rows together.
    The UPDATE is the first write.
    """
    now = outcome.now
    finished = now if outcome.status in FINAL_STATES else None
    cur = conn.execute(
        "UPDATE messages SET status = ?, attempts = attempts + 1, last_error = ?,"
        " next_attempt_at = COALESCE(?, next_attempt_at), enqueued_at = COALESCE(?, enqueued_at),"
        " lease_owner = NULL, lease_expires_at = NULL, updated_at = ?, finished_at = ?"
        " WHERE id = ? AND status = 'sending' AND lease_owner = ?",
        # A retry's wake-up is scheduled for when it falls due: that is its enqueue time.
        (outcome.status, outcome.last_error, outcome.next_attempt_at, outcome.next_attempt_at, now, finished,
         outcome.message_id, outcome.lease_owner),
    )
    if cur.rowcount != 1:
        return False
    conn.executemany(
        "UPDATE recipients SET status = ?, code = ?, reply = ?, updated_at = ?"
        " WHERE message_id = ? AND position = ?",
        [(st, code, reply, now, outcome.message_id, pos)
         for pos, (st, code, reply) in outcome.recipient_updates.items()],
    )
    if log is None:
        write_attempt_log(conn, outcome.entry, now)
    else:
        log(outcome.entry)
    return True


class Ledger(Part):

    # -- messages: the delivery side -------------------------------------------
    def claim(self, message_id: str, owner: str, lease_seconds: float, now: float | None = None,
              limits: tuple[tuple[int, float], ...] = ()) -> ClaimedMessage | Paced | None:
        """``claim_message`` in a transaction of its own (the worker's group commit shares one)."""
        now = time.time() if now is None else now
        conn = self.conn()
        # A claim lost to a power cut only means the message is claimed again;
        # the outcome recorded afterwards is committed with a full fsync.
        with transaction(conn, durable=False):
            return claim_message(conn, self.store.keys, message_id, owner, lease_seconds, now, limits)

    def read_body(self, message_id: str) -> bytes | None:
        """A claimed message's stored body, when its claim left it out (see ``claim_message``)."""
        row = self.conn().execute("SELECT body FROM messages WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else row[0]

    def renew_leases(self, held: list[tuple[str, str]], until: float) -> None:
        conn = self.conn()
        with transaction(conn):
            conn.executemany("UPDATE messages SET lease_expires_at = ? WHERE id = ? AND lease_owner = ?"
                             " AND status = 'sending'", [(until, mid, owner) for mid, owner in held])

    def record_attempt(self, claimed: ClaimedMessage, status: str, *, next_attempt_at: float | None,
                       last_error: str | None, recipient_updates: dict[int, tuple[str, int | None, str | None]],
                       entry: LogEntry, now: float | None = None) -> bool:
        """``record_outcome`` in a transaction of its own (the worker's group commit shares one)."""
        outcome = AttemptOutcome(claimed.id, claimed.lease_owner, status, next_attempt_at, last_error,
                                 recipient_updates, entry, time.time() if now is None else now)
        conn = self.conn()
        with transaction(conn):
            return record_outcome(conn, outcome)

    def waiting_until(self, message_id: str, now: float) -> float | None:
        row = self.conn().execute(
            "SELECT next_attempt_at FROM messages WHERE id = ? AND status IN ('queued', 'deferred')"
            " AND next_attempt_at > ?", (message_id, now)).fetchone()
        return row[0] if row else None

    def mark_enqueued(self, message_ids: list[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        conn = self.conn()
        with transaction(conn):
            conn.executemany("UPDATE messages SET enqueued_at = ? WHERE id = ?", [(now, i) for i in message_ids])

    # -- reading -----------------------------------------------------------------
    def status(self, message_id: str, sent_by: tuple[int, bool] | None = None) -> dict[str, Any] | None:
        """The contract's view of one message: state, attempts, per-recipient outcome.

        ``sent_by`` (key id, is the portal's key): None unless that key sent it. The portal's key
        also sees what its replaced predecessors sent: replacing a leaked key must not make the
        portal lose track of its mail.
        """
        conn = self.conn()
        row = conn.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            return None
        if sent_by is not None and row["api_key_id"] != sent_by[0]:
            if not sent_by[1] or row["api_key_id"] is None or not conn.execute(
                    "SELECT 1 FROM api_keys WHERE id = ? AND is_primary = 1", (row["api_key_id"],)).fetchone():
                return None
        attempts = [
            {"at": r["ts"], "status": r["status"], "stage": r["stage"], "code": r["code"],
             "detail": r["detail"], "duration_ms": r["duration_ms"]}
            for r in conn.execute("SELECT * FROM log WHERE message_id = ? AND event = 'attempt' ORDER BY id",
                                  (message_id,))
        ]
        recipients = [
            {"address": r["address"], "kind": r["kind"], "status": r["status"], "code": r["code"],
             "reply": r["reply"]}
            for r in conn.execute("SELECT * FROM recipients WHERE message_id = ? ORDER BY position",
                                  (message_id,))
        ]
        waiting = row["status"] in ("queued", "deferred")
        return {
            "ok": True,
            "id": row["id"],
            "status": row["status"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "finished_at": row["finished_at"],
            "next_attempt_at": row["next_attempt_at"] if waiting else None,
            "attempt_count": row["attempts"],
            "last_error": row["last_error"],
            "from": row["from_addr"],
            "subject": row["subject"],
            "message_id": row["message_id_header"],
            "attempts": attempts,
            "recipients": recipients,
        }

    def counts(self) -> dict[str, int]:
        rows = self.conn().execute("SELECT status, COUNT(*) FROM messages GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}
