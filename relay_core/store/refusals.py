"""Refused API requests: a budget per source address, and one log row per address and minute.

A client hammering the API with a wrong key must not be able to push the
real history out of the bounded transaction log, nor make the relay fsync
once per refusal, nor slow a good key's sends. So refusals are counted, not
written one by one:

- Requests with a missing or wrong key count against their address's budget
  (the ``bad_key_per_minute`` setting, 100 by default; 0 turns it off): up
  to the budget they are answered 401, beyond it 429 with Retry-After (the
  seconds left in the minute). A request with a good key is never refused
  for its address's failures, so a portal behind the same address as an
  attacker keeps sending. (Failed admin sign-ins have their own, stricter
  budget: five a minute per address or username, see ``sessions.py``.)
- Each web process counts in memory (``RefusalGate``) and, about once a
  second, hands what it counted to the group-commit writer as one job:
  ``record_refusals`` adds the counts to ``refusals`` (one row per address,
  minute and reason, shared by every process) and writes or updates the one
  log row that stands for them, with the count in its sentence. The job
  answers the store's totals, so each process judges the budget by every
  process's count (up to a second late).
- Refusals of requests with a good key (a 400, a 403...) keep a log row of
  their own, the first ``DETAILED_PER_MINUTE`` per address and minute in
  each process; the rest are counted into one row the same way.

Addresses come from ``relay_web.auth.client_ip`` (the peer, or the first
untrusted X-Forwarded-For hop behind a trusted proxy).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import metrics
from ..db import Connection, transaction
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
    """Refusals of one address, minute and reason not yet handed to the store."""

    first_at: float
    code: int
    label: str = "unauthorized"  # the metrics label (relay_core.store.metrics' messages_rejected)
    budget: int = 0
    count: int = 0
    limited: int = 0  # answered 429 rather than 401


@dataclass
class _Batch:
    items: list[tuple[tuple[str, int, str], Tally]]
    unauthenticated: dict[tuple[str, int], int] = field(default_factory=dict)


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


class RefusalGate:
    """One web process's view: this minute's refusals per address, and the store's totals."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[Key, Tally] = {}
        self._stored: dict[tuple[str, int], int] = {}  # unauthenticated, all processes, at the last flush
        self._local: dict[tuple[str, int], int] = {}  # unauthenticated, this process, not in _stored yet
        self._detailed: dict[tuple[str, int], int] = {}
        self._in_flight: _Batch | None = None

    @property
    def busy(self) -> bool:
        """Counts are waiting to be written, or being written."""
        with self._lock:
            return bool(self._pending) or self._in_flight is not None

    def _address(self, ip: str, minute: int) -> str:
        if (ip, minute) in self._local or (ip, minute) in self._stored or len(self._local) < MAX_ADDRESSES:
            return ip
        return OTHER_ADDRESSES

    def unauthenticated(self, ip: str, reason: str, budget: int, now: float | None = None) -> int:
        """Count a request refused for its key: 0 to answer 401, or the seconds to put in a 429's Retry-After."""
        now = self.clock() if now is None else now
        minute = int(now // MINUTE)
        with self._lock:
            ip = self._address(ip, minute)
            seen = self._stored.get((ip, minute), 0) + self._local.get((ip, minute), 0)
            over = budget > 0 and seen >= budget
            tally = self._pending.get((ip, minute, reason))
            if tally is None:
                tally = self._pending[(ip, minute, reason)] = Tally(now, 401)
            tally.count += 1
            tally.budget = budget
            if over:
                tally.limited += 1
            self._local[(ip, minute)] = self._local.get((ip, minute), 0) + 1
        return max(1, math.ceil((minute + 1) * MINUTE - now)) if over else 0

    def detailed(self, ip: str, now: float | None = None) -> bool:
        """Whether a refusal of a request with a good key gets a log row of its own."""
        now = self.clock() if now is None else now
        minute = int(now // MINUTE)
        with self._lock:
            if (ip, minute) not in self._detailed and len(self._detailed) >= MAX_ADDRESSES:
                return False  # too many addresses this minute: counted, not written one by one
            seen = self._detailed.get((ip, minute), 0)
            self._detailed[(ip, minute)] = seen + 1
            return seen < DETAILED_PER_MINUTE

    def counted(self, ip: str, status: int, label: str, now: float | None = None) -> None:
        """A refusal past the detailed ones: counted into its minute's row (``label``: its metrics label)."""
        now = self.clock() if now is None else now
        minute = int(now // MINUTE)
        with self._lock:
            ip = self._address(ip, minute)
            key = (ip, minute, f"refused:{status}:{label}")
            tally = self._pending.get(key)
            if tally is None:
                tally = self._pending[key] = Tally(now, status, label)
            tally.count += 1

    # -- handing the counts to the store -------------------------------------------------
    def take(self) -> _Batch | None:
        """What to write now (None: nothing, or a write still in flight); forgets old minutes."""
        with self._lock:
            if self._in_flight is not None or not self._pending:
                return None
            items = list(self._pending.items())
            self._pending = {}
            batch = _Batch(items)
            for (ip, minute, reason), tally in items:
                if reason in UNAUTHENTICATED:
                    batch.unauthenticated[(ip, minute)] = batch.unauthenticated.get((ip, minute), 0) + tally.count
            self._in_flight = batch
            current = int(self.clock() // MINUTE)
            for table in (self._stored, self._local, self._detailed):
                for key in [k for k in table if k[1] < current - 1]:
                    del table[key]
            return batch

    def written(self, batch: _Batch, totals: dict[tuple[str, int], int] | None) -> None:
        """The store took ``batch`` (``totals``: its counts now), or failed to (None: counted again later)."""
        with self._lock:
            self._in_flight = None
            if totals is None:
                for key, tally in batch.items:
                    kept = self._pending.get(key)
                    if kept is None:
                        self._pending[key] = tally
                    else:
                        kept.count += tally.count
                        kept.limited += tally.limited
                        kept.first_at = min(kept.first_at, tally.first_at)
                return
            for address_minute, sent in batch.unauthenticated.items():
                self._local[address_minute] = max(0, self._local.get(address_minute, 0) - sent)
            self._stored.update(totals)

    def job(self, store: "Refusals") -> tuple[_Batch, Callable[[Connection], tuple[Any, list[str]]]] | None:
        """The group-commit job writing what was counted, or None."""
        batch = self.take()
        if batch is None:
            return None

        def write(conn: Connection) -> tuple[Any, list[str]]:
            return store.record_refusals(conn, batch.items), []

        return batch, write


class Refusals:
    """Mixed into ``Store``, which provides the connection."""

    def conn(self) -> Connection:
        raise NotImplementedError

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
        """The id of the log row the minute's later addresses share (0: not written yet); None: none yet."""
        row = conn.execute("SELECT log_id FROM refusals WHERE ip = ? AND minute = ? AND reason = ?",
                           (MORE_ADDRESSES, minute, reason)).fetchone()
        return None if row is None else int(row["log_id"] or 0)

    def prune_refusals(self, now: float) -> int:
        """Drop counts older than a day (their log rows stay, under the log's own retention)."""
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("DELETE FROM refusals WHERE minute < ?", (int(now // MINUTE) - KEEP_MINUTES,))
        return cur.rowcount
