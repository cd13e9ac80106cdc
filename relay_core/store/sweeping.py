"""What the sweeper does to the store: find messages whose wake-up call was lost, and retention."""

from __future__ import annotations

from ..db import serialize, transaction
from .part import Part
from .logbook import HOUR, forget_log_rows


class Sweeping(Part):
    def waiting_count(self, now: float) -> int:
        return self.conn().execute(
            "SELECT (SELECT COUNT(*) FROM messages WHERE status = 'queued')"
            " + (SELECT COUNT(*) FROM messages WHERE status = 'deferred' AND next_attempt_at <= ?)",
            (now,)).fetchone()[0]

    def sweep(self, now: float, stale_after: float, include_waiting: bool = True,
              limit: int = 1000) -> list[str]:
        """Ids that need a new wake-up call; marks them enqueued now.

        Always: sending with an expired lease (its task was consumed). With
        ``include_waiting``: queued with no enqueue for ``stale_after`` seconds,
        and deferred messages due for that long.
        """
        conn = self.conn()
        with transaction(conn):
            rows = conn.execute(
                "SELECT id FROM messages WHERE"
                " (status = 'sending' AND lease_expires_at < ?)"
                " OR (? AND status = 'queued' AND COALESCE(enqueued_at, 0) < ?)"
                " OR (? AND status = 'deferred' AND next_attempt_at <= ? AND COALESCE(enqueued_at, 0) < ?)"
                " ORDER BY next_attempt_at LIMIT ?",
                (now, include_waiting, now - stale_after, include_waiting, now - stale_after,
                 now - stale_after, limit),
            ).fetchall()
            ids = [r[0] for r in rows]
            conn.executemany("UPDATE messages SET enqueued_at = ? WHERE id = ?", [(now, i) for i in ids])
        return ids

    def prune(self, now: float, *, sent_body_seconds: float, failed_body_seconds: float,
              log_seconds: float, log_max_rows: int, idempotency_seconds: float) -> dict[str, int]:
        """Retention: drop finished bodies, old log rows and old idempotency answers."""
        conn = self.conn()
        with transaction(conn):
            # Sweepers prune one at a time: on PostgreSQL two could both take the same rows
            # out of the hourly counts before either deleted them.
            serialize(conn, "tspro-relay prune")
            sent = conn.execute(
                "UPDATE messages SET body = NULL WHERE body IS NOT NULL AND status IN ('sent', 'partial')"
                " AND finished_at < ?",
                (now - sent_body_seconds,)).rowcount
            failed = conn.execute(
                "UPDATE messages SET body = NULL WHERE body IS NOT NULL AND status IN ('failed', 'cancelled')"
                " AND finished_at < ?", (now - failed_body_seconds,)).rowcount
            # Whole hours go, so the hourly counts (logbook.py) drop whole buckets.
            cutoff = (now - log_seconds) // HOUR * HOUR
            forget_log_rows(conn, "ts < ?", (cutoff,))
            old_log = conn.execute("DELETE FROM log WHERE ts < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM messages WHERE finished_at < ?", (now - log_seconds,))
            excess = 0
            # The ids span at least as many rows as the log holds: while the span fits, nothing is over
            # the cap, and the OFFSET walk (a million index entries, every sweep) is skipped.
            low, high = conn.execute("SELECT MIN(id), MAX(id) FROM log").fetchone()
            over = low is not None and high - low + 1 > log_max_rows
            last = conn.execute("SELECT id FROM log ORDER BY id DESC LIMIT 1 OFFSET ?",
                                (log_max_rows,)).fetchone() if over else None
            if last is not None:
                forget_log_rows(conn, "id <= ?", (last[0],))
                excess = conn.execute("DELETE FROM log WHERE id <= ?", (last[0],)).rowcount
            conn.execute("DELETE FROM pacing WHERE ts < ?", (now - 86400,))
            idem = conn.execute("DELETE FROM idempotency WHERE created_at < ?",
                                (now - idempotency_seconds,)).rowcount
        return {"sent_bodies": sent, "failed_bodies": failed, "log_rows": old_log + excess, "idempotency": idem}
