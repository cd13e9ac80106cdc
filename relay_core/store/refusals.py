"""Refused API requests, as the store keeps them: counts per address, minute and reason, and the
one log row that stands for each, so a flood of bad requests cannot push the real history out of
the bounded log (the web process counts them in memory first: ``relay_web.refusal_gate``).

Requests with a missing or wrong key count against their address's budget
(``bad_key_per_minute``); a request with a good key is never refused for its
address's failures. Refusals of requests with a good key keep a log row of their
own for the first ``DETAILED_PER_MINUTE`` per address and minute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import metrics
from ..db import Connection, transaction
from .part import Part
from .logbook import LogEntry, insert_log

MINUTE = 60
MISSING, WRONG = "missing key", "wrong key"
UNAUTHENTICATED = (MISSING, WRONG)
DETAILED_PER_MINUTE = 10
# Per minute and reason, the first addresses get a log row each; the rest share one (``MORE_ADDRESSES``
# in ``refusals`` holds its id), so a flood spread over many addresses adds few rows to the log.
ADDRESS_ROWS_PER_MINUTE = 20
MORE_ADDRESSES = "(more addresses)"
# Beyond this many addresses in one minute, new ones share one budget and one log row: an attacker
# with many addresses must not grow this process's memory, nor the log, without bound.
MAX_ADDRESSES = 5000
OTHER_ADDRESSES = "(other addresses)"
KEEP_MINUTES = 24 * 60


@dataclass
class Tally:
    first_at: float
    code: int
    label: str = "unauthorized"  # the metrics label (relay_core.store.metrics' messages_rejected)
    budget: int = 0
    count: int = 0
    limited: int = 0  # answered 429 rather than 401


Key = tuple[str, int, str]


def _when(minute: int) -> str:
    return time.strftime("%H:%M UTC", time.gmtime(minute * MINUTE))


def describe(ip: str, minute: int, reason: str, count: int, limited: int, budget: int,
             addresses: int = 0) -> str:
    """The sentence of an aggregated log row (``addresses``: how many share it, when it is the shared one)."""
    many = count != 1
    if addresses:
        ip = f"{addresses} more address{'es' if addresses != 1 else ''}"
    if reason in UNAUTHENTICATED:
        what = "no API key" if reason == MISSING else "a wrong API key"
        text = (f"{count} request{'s' if many else ''} with {what} from {ip} in the minute from {_when(minute)}, "
                f"refused")
        if limited:
            text += f"; {limited} of them answered 429 (over the limit of {budget} a minute)"
        return text + "."
    status = reason.split(":")[1]
    return (f"{count} more request{'s' if many else ''} refused with {status} from {ip} in the minute from "
            f"{_when(minute)} (the first {DETAILED_PER_MINUTE} of a minute are logged one by one).")


class Refusals(Part):
    def record_refusals(self, conn: Connection,
                        items: list[tuple[Key, Tally]]) -> dict[tuple[str, int], int]:
        """Add counted refusals and write their log rows, inside the caller's transaction.

        Returns, for each address and minute with refusals for a missing or
        wrong key, every process's count so far.
        """
        for (ip, minute, reason), tally in items:
            row = conn.execute(
                "INSERT INTO refusals (ip, minute, reason, n, limited) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (ip, minute, reason) DO UPDATE SET n = refusals.n + excluded.n,"
                " limited = refusals.limited + excluded.limited RETURNING n, limited, log_id",
                (ip, minute, reason, tally.count, tally.limited)).fetchone()
            log_id, shared = row["log_id"], self._shared_row(conn, minute, reason)
            if log_id is None and shared is None and conn.execute(
                    "SELECT COUNT(*) FROM refusals WHERE minute = ? AND reason = ? AND log_id IS NOT NULL",
                    (minute, reason)).fetchone()[0] >= ADDRESS_ROWS_PER_MINUTE:
                conn.execute("INSERT INTO refusals (ip, minute, reason, n, limited) VALUES (?, ?, ?, 0, 0)",
                             (MORE_ADDRESSES, minute, reason))
                shared = 0  # the shared row, not written yet
            if log_id is None and shared is not None:
                log_id = shared
                conn.execute("UPDATE refusals SET log_id = ? WHERE ip = ? AND minute = ? AND reason = ?",
                             (log_id, ip, minute, reason))
            if shared is not None and log_id == shared:
                many, n, limited = conn.execute(
                    "SELECT COUNT(*), SUM(n), SUM(limited) FROM refusals WHERE minute = ? AND reason = ?"
                    " AND log_id = ? AND ip <> ?", (minute, reason, log_id, MORE_ADDRESSES)).fetchone()
                detail = describe(ip, minute, reason, int(n), int(limited), tally.budget, addresses=int(many))
                ip = MORE_ADDRESSES
            else:
                detail = describe(ip, minute, reason, int(row["n"]), int(row["limited"]), tally.budget)
            # The minute's row, written once and then kept up to date (written again if an
            # admin cleared the log meanwhile).
            if not log_id or conn.execute("UPDATE log SET detail = ? WHERE id = ?",
                                          (detail, log_id)).rowcount == 0:
                event = "unauthorized" if reason in UNAUTHENTICATED else "rejected"
                new_id = insert_log(conn, LogEntry(event, "rejected", code=tally.code, detail=detail,
                                                   source_ip=None if ip == MORE_ADDRESSES else ip,
                                                   ts=tally.first_at))
                conn.execute("UPDATE refusals SET log_id = ? WHERE minute = ? AND reason = ?"
                             " AND (ip = ? OR (? AND log_id = ?))",
                             (new_id, minute, reason, ip, ip == MORE_ADDRESSES, log_id or 0))
            if reason in UNAUTHENTICATED:
                counts = {(metrics.REJECTED, "unauthorized"): tally.count - tally.limited,
                          (metrics.REJECTED, "rate_limited"): tally.limited}
            else:
                counts = {(metrics.REJECTED, tally.label): tally.count}
            metrics.add(conn, {k: v for k, v in counts.items() if v})
        totals = {}
        for ip, minute in {(ip, minute) for (ip, minute, reason), _ in items if reason in UNAUTHENTICATED}:
            totals[(ip, minute)] = int(conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM refusals WHERE ip = ? AND minute = ? AND reason IN (?, ?)",
                (ip, minute, *UNAUTHENTICATED)).fetchone()[0])
        return totals

    @staticmethod
    def _shared_row(conn: Connection, minute: int, reason: str) -> int | None:
        row = conn.execute("SELECT log_id FROM refusals WHERE ip = ? AND minute = ? AND reason = ?",
                           (MORE_ADDRESSES, minute, reason)).fetchone()
        return None if row is None else int(row["log_id"] or 0)

    def prune_refusals(self, now: float) -> int:
        """Drop counts older than a day (their log rows stay, under the log's own retention)."""
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("DELETE FROM refusals WHERE minute < ?", (int(now // MINUTE) - KEEP_MINUTES,))
        return cur.rowcount
