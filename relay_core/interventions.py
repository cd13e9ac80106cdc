"""What an admin may do to a message: retry it now, or cancel it.

- Retry now: a deferred message falls due now; a failed one goes back to
  queued with its failed recipients pending again (its body must still be
  stored). The caller then enqueues the ids it gets back.
- Cancel: only a message still waiting (queued or deferred) becomes
  cancelled. One a worker holds ('sending') is never touched: the delivery
  in progress decides its fate, and cancelling it would race the SMTP
  transaction already under way.

Each change is a conditional UPDATE checked by its row count, like a
worker's claim, so an admin and a worker acting at the same moment cannot
both win. Every message changed gets a log row, and the whole action one
audit entry, in the same transaction as the change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .audit import insert_audit
from .db import Connection, transaction
from .ledger import LogEntry, insert_log

MAX_IDS_IN_AUDIT = 20


@dataclass
class ActionReport:
    """What an action did: the ids it changed, and why it left the others alone."""

    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _why_not(row: Any, action: str) -> str | None:
    """Why ``action`` cannot apply to this message now (None: it can)."""
    if row is None:
        return "no such message"
    status = row["status"]
    if status == "sending":
        return "it is being delivered right now"
    if action == "retry":
        if status == "queued":
            return "it is already queued"
        if status not in ("deferred", "failed"):
            return f"it is {status}; only deferred and failed messages can be retried"
        if status == "failed" and not row["has_body"]:
            return "its content was deleted after the retention period, so it cannot be sent again"
        return None
    if status not in ("queued", "deferred"):
        return f"it is {status}; only waiting messages can be cancelled"
    return None


def _audit_detail(verb: str, ids: list[str]) -> str:
    shown = ", ".join(ids[:MAX_IDS_IN_AUDIT])
    more = f" and {len(ids) - MAX_IDS_IN_AUDIT} more" if len(ids) > MAX_IDS_IN_AUDIT else ""
    return f"{verb} {len(ids)} message(s): {shown}{more}"


class Interventions:
    """Mixed into ``Store``, which provides the connection."""

    def conn(self) -> Connection:
        raise NotImplementedError

    def _rows(self, conn: Connection, ids: list[str]) -> dict[str, Any]:
        marks = ", ".join("?" for _ in ids)
        return {r["id"]: r for r in conn.execute(
            "SELECT id, status, from_addr, subject, CASE WHEN body IS NULL THEN 0 ELSE 1 END AS has_body"
            f" FROM messages WHERE id IN ({marks})", ids)}

    def _recipients_text(self, conn: Connection, message_id: str) -> str:
        rows = conn.execute("SELECT address FROM recipients WHERE message_id = ? ORDER BY position", (message_id,))
        return ", ".join(r[0] for r in rows)

    def retry_now(self, ids: list[str], actor: str, ip: str, now: float | None = None) -> ActionReport:
        """Make deferred and failed messages due now. Enqueue ``report.done`` afterwards."""
        now = time.time() if now is None else now
        report = ActionReport()
        ids = list(dict.fromkeys(ids))
        if not ids:
            return report
        conn = self.conn()
        with transaction(conn):
            rows = self._rows(conn, ids)
            for message_id in ids:
                row: Any = rows.get(message_id)
                reason = _why_not(row, "retry")
                if reason is None:
                    # claims = attempts: a message failed for being interrupted too often starts afresh.
                    changed = conn.execute(
                        "UPDATE messages SET status = 'queued', next_attempt_at = ?, enqueued_at = ?, updated_at = ?,"
                        " finished_at = NULL, claims = attempts WHERE id = ? AND status = ?"
                        " AND (status = 'deferred' OR body IS NOT NULL)",
                        (now, now, now, message_id, row["status"])).rowcount
                    reason = None if changed == 1 else "it changed meanwhile; reload the page"
                if reason is not None:
                    report.skipped[message_id] = reason
                    continue
                conn.execute("UPDATE recipients SET status = 'pending', code = NULL, reply = NULL, updated_at = ?"
                             " WHERE message_id = ? AND status = 'failed'", (now, message_id))
                insert_log(conn, LogEntry("retry", "queued", message_id=message_id, source_ip=ip or None,
                                          detail=f"retry now by {actor} (it was {row['status']})",
                                          sender=row["from_addr"], subject=row["subject"], ts=now,
                                          recipients=self._recipients_text(conn, message_id)))
                report.done.append(message_id)
            if report.done:
                insert_audit(conn, actor, ip, "message.retry", _audit_detail("retried", report.done), ts=now)
        return report

    def cancel(self, ids: list[str], actor: str, ip: str, now: float | None = None) -> ActionReport:
        """Cancel waiting messages; any other state is left as it is, with the reason."""
        now = time.time() if now is None else now
        report = ActionReport()
        ids = list(dict.fromkeys(ids))
        if not ids:
            return report
        conn = self.conn()
        reason_text = f"cancelled by {actor}"
        with transaction(conn):
            rows = self._rows(conn, ids)
            for message_id in ids:
                row: Any = rows.get(message_id)
                reason = _why_not(row, "cancel")
                if reason is None:
                    changed = conn.execute(
                        "UPDATE messages SET status = 'cancelled', finished_at = ?, updated_at = ?, last_error = ?,"
                        " lease_owner = NULL, lease_expires_at = NULL WHERE id = ? AND status IN ('queued', 'deferred')",
                        (now, now, reason_text, message_id)).rowcount
                    reason = None if changed == 1 else "it is being delivered right now"
                if reason is not None:
                    report.skipped[message_id] = reason
                    continue
                conn.execute("UPDATE recipients SET status = 'cancelled', updated_at = ? WHERE message_id = ?"
                             " AND status IN ('pending', 'deferred')", (now, message_id))
                insert_log(conn, LogEntry("cancel", "cancelled", message_id=message_id, source_ip=ip or None,
                                          detail=reason_text, sender=row["from_addr"], subject=row["subject"],
                                          ts=now, recipients=self._recipients_text(conn, message_id)))
                report.done.append(message_id)
            if report.done:
                insert_audit(conn, actor, ip, "message.cancel", _audit_detail("cancelled", report.done), ts=now)
        return report
