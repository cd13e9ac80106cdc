"""One web process's count of refused API requests, handed to the store about once a second.

Counting in memory and writing one job a second keeps a client hammering the
API with a wrong key from making the relay fsync once per refusal or slowing a
good key's sends; the job answers the store's totals, so each process judges
the budget by every process's count (up to a second late). Addresses come
from ``relay_web.auth.client_ip``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from relay_core.db import Connection
from relay_core.store import Store
from relay_core.store.refusals import (DETAILED_PER_MINUTE, MAX_ADDRESSES, MINUTE, OTHER_ADDRESSES, UNAUTHENTICATED,
                                       Key, Tally)


@dataclass
class _Batch:
    items: list[tuple[tuple[str, int, str], Tally]]
    unauthenticated: dict[tuple[str, int], int] = field(default_factory=dict)



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

    def job(self, store: Store) -> tuple[_Batch, Callable[[Connection], tuple[Any, list[str]]]] | None:
        """The group-commit job writing what was counted, or None."""
        batch = self.take()
        if batch is None:
            return None

        def write(conn: Connection) -> tuple[Any, list[str]]:
            return store.log.record_refusals(conn, batch.items), []

        return batch, write
