"""What an admin may do to a message: retry it now, or cancel it.

A message a worker holds ('sending') is never cancelled: the delivery under way
decides its fate. Each change is a conditional UPDATE checked by its row count,
like a worker's claim, so an admin and a worker acting at once cannot both win;
the log rows and the action's audit entry commit with the change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .audit import insert_audit
from ..db import Connection, transaction
from .part import Part
from .logbook import LogEntry, insert_log

MAX_IDS_IN_AUDIT = 20


@dataclass
class ActionReport:
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _why_not(row: Any, action: str) -> str | None:
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


class Interventions(Part):
    def _rows(self, conn: Connection, ids: list[str]) -> dict[str, Any]:
        marks = ", ".join("?" for _ in ids)
        return {r["id"]: r for r in conn.execute(
            "SELECT id, status, from_addr, subject, CASE WHEN body IS NULL THEN 0 ELSE 1 END AS has_body"
            f" FROM messages WHERE id IN ({marks})", ids)}

    def _recipients_text(self, conn: Connection, message_id: str) -> str:
        rows = conn.execute("SELECT address FROM recipients WHERE message_id = ? ORDER BY position", (message_id,))
        return ", ".join(r[0] for r in rows)

    def _act(self, ids: list[str], action: str, verb: str, actor: str, ip: str, now: float,
             change: Callable[[Connection, str, Any], LogEntry | str]) -> ActionReport:
        """Apply ``change`` to each message ``action`` applies to, in one transaction with one audit row.

        ``change(conn, message_id, row)`` makes the change and returns its log row, or the reason
        it could not (the message changed since it was read).
        """
        report = ActionReport()
        ids = list(dict.fromkeys(ids))
        if not ids:
            return report
        conn = self.conn()
        with transaction(conn):
            rows = self._rows(conn, ids)
            for message_id in ids:
                row: Any = rows.get(message_id)
                outcome = _why_not(row, action) or change(conn, message_id, row)
                if isinstance(outcome, str):
                    report.skipped[message_id] = outcome
                    continue
                insert_log(conn, outcome)
                report.done.append(message_id)
            if report.done:
                insert_audit(conn, actor, ip, f"message.{action}", _audit_detail(verb, report.done), ts=now)
        return report

    def retry_now(self, ids: list[str], actor: str, ip: str, now: float | None = None) -> ActionReport:
        at = time.time() if now is None else now

        def change(conn: Connection, message_id: str, row: Any) -> LogEntry | str:
            # claims = attempts: a message failed for being interrupted too often starts afresh.
            changed = conn.execute(
                "UPDATE messages SET status = 'queued', next_attempt_at = ?, enqueued_at = ?, updated_at = ?,"
                " finished_at = NULL, claims = attempts WHERE id = ? AND status = ?"
                " AND (status = 'deferred' OR body IS NOT NULL)",
                (at, at, at, message_id, row["status"])).rowcount
            if changed != 1:
                return "it changed meanwhile; reload the page"
            conn.execute("UPDATE recipients SET status = 'pending', code = NULL, reply = NULL, updated_at = ?"
                         " WHERE message_id = ? AND status = 'failed'", (at, message_id))
            return LogEntry("retry", "queued", message_id=message_id, source_ip=ip or None,
                            detail=f"retry now by {actor} (it was {row['status']})",
                            sender=row["from_addr"], subject=row["subject"], ts=at,
                            recipients=self._recipients_text(conn, message_id))

        return self._act(ids, "retry", "retried", actor, ip, at, change)

    def cancel(self, ids: list[str], actor: str, ip: str, now: float | None = None) -> ActionReport:
        at = time.time() if now is None else now
        reason_text = f"cancelled by {actor}"

        def change(conn: Connection, message_id: str, row: Any) -> LogEntry | str:
            changed = conn.execute(
                "UPDATE messages SET status = 'cancelled', finished_at = ?, updated_at = ?, last_error = ?,"
                " lease_owner = NULL, lease_expires_at = NULL WHERE id = ? AND status IN ('queued', 'deferred')",
                (at, at, reason_text, message_id)).rowcount
            if changed != 1:
                return "it is being delivered right now"
            conn.execute("UPDATE recipients SET status = 'cancelled', updated_at = ? WHERE message_id = ?"
                         " AND status IN ('pending', 'deferred')", (at, message_id))
            return LogEntry("cancel", "cancelled", message_id=message_id, source_ip=ip or None,
                            detail=reason_text, sender=row["from_addr"], subject=row["subject"], ts=at,
                            recipients=self._recipients_text(conn, message_id))

        return self._act(ids, "cancel", "cancelled", actor, ip, at, change)
