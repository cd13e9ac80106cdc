"""The audit trail: who changed what, when, from where.

``detail`` is a sentence for people and never carries a secret's value;
actions are dotted names (``settings.smtp``, ``api_key.reveal``) so a page can
filter by prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..db import Connection, transaction
from .part import Part


@dataclass(frozen=True)
class AuditEntry:
    id: int
    ts: float
    actor: str
    ip: str
    action: str
    detail: str


def insert_audit(conn: Connection, actor: str, ip: str, action: str, detail: str = "",
                 ts: float | None = None) -> None:
    """Write one entry inside the caller's transaction (to commit it with the change it records)."""
    conn.execute("INSERT INTO audit (ts, actor, ip, action, detail) VALUES (?, ?, ?, ?, ?)",
                 (time.time() if ts is None else ts, actor, ip or "", action, detail))


COMMAND_LINE = ("command line", "")  # who and from where, for changes made with `tspro-relay`


class Audit(Part):
    def record_audit(self, actor: str, ip: str, action: str, detail: str = "", ts: float | None = None) -> None:
        conn = self.conn()
        with transaction(conn):
            insert_audit(conn, actor, ip, action, detail, ts)

    def audit_entries(self, limit: int = 50, before_id: int | None = None,
                      action_prefix: str = "") -> list[AuditEntry]:
        """Newest first; ``before_id`` pages back (keyset), ``action_prefix`` filters."""
        conn = self.conn()
        rows = conn.execute(
            "SELECT id, ts, actor, ip, action, detail FROM audit WHERE id < ? AND action LIKE ?"
            " ORDER BY id DESC LIMIT ?",
            (before_id if before_id is not None else 2**62, action_prefix.replace("%", "") + "%", limit),
        ).fetchall()
        return [AuditEntry(int(r["id"]), float(r["ts"]), r["actor"], r["ip"], r["action"], r["detail"])
                for r in rows]
