"""Send limits per API key: how many messages a key may have accepted in the last hour.

The count lives in the store (one row per key and minute) so every web process
shares it, and is taken inside the accept's own group-commit transaction: no
fsync of its own, and a refused send rolls its count back with its job. The
window is the last 60 whole minutes, so a slot frees at a known moment, which
Retry-After and RateLimit-Reset state. There is no default limit: the portal
does not retry a 429, so one would drop legitimate bulk mail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .accounts import ApiKey
from ..db import Connection, serialize, transaction
from .part import Part
from ..options import Options

MINUTE = 60
WINDOW_MINUTES = 60


@dataclass(frozen=True)
class Quota:
    limit: int
    remaining: int
    reset: int  # seconds until the oldest send still counted leaves the window
    retry_after: int = 0  # > 0: refused; seconds until a slot frees

    def headers(self) -> dict[str, str]:
        headers = {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset)}
        if self.retry_after:
            headers["Retry-After"] = str(self.retry_after)
        return headers


def effective_limit(key: ApiKey, options: Options, environment_default: int) -> int:
    if key.per_hour is not None:
        return key.per_hour
    if options.send_per_hour is not None:
        return options.send_per_hour
    return environment_default


def _seconds_until(moment: float, now: float) -> int:
    return max(1, math.ceil(moment - now))


class SendLimits(Part):
    def take_send(self, conn: Connection, key_id: int, limit: int, now: float) -> Quota:
        """Count one send for ``key_id`` inside the caller's transaction, unless the key is at its limit."""
        serialize(conn, "tspro-relay send limits")  # one count at a time across web processes
        minute = int(now // MINUTE)
        rows, used, refusal = self._standing(conn, key_id, limit, now)
        if refusal is not None:
            return refusal
        conn.execute("INSERT INTO send_counts (api_key_id, minute, n) VALUES (?, ?, 1)"
                     " ON CONFLICT (api_key_id, minute) DO UPDATE SET n = send_counts.n + 1", (key_id, minute))
        oldest = int(rows[0]["minute"]) if rows else minute
        return Quota(limit, limit - used - 1, _seconds_until((oldest + WINDOW_MINUTES) * MINUTE, now))

    def refusal(self, key_id: int, limit: int, now: float) -> Quota | None:
        """The key's refusal if it is at its limit now, read without counting: the web asks this
        before reading a body (``take_send``, in the accept's transaction, still decides)."""
        return self._standing(self.conn(), key_id, limit, now)[2]

    def _standing(self, conn: Connection, key_id: int, limit: int,
                  now: float) -> tuple[list[Any], int, Quota | None]:
        minute = int(now // MINUTE)
        rows = conn.execute("SELECT minute, n FROM send_counts WHERE api_key_id = ? AND minute > ?"
                            " ORDER BY minute", (key_id, minute - WINDOW_MINUTES)).fetchall()
        used = sum(int(r["n"]) for r in rows)
        if used < limit:
            return rows, used, None
        # The slot frees when enough of the oldest minutes have left the window.
        left = used
        frees_at = (minute + WINDOW_MINUTES) * MINUTE
        for row in rows:
            left -= int(row["n"])
            if left < limit:
                frees_at = (int(row["minute"]) + WINDOW_MINUTES) * MINUTE
                break
        wait = _seconds_until(frees_at, now)
        return rows, used, Quota(limit, 0, wait, retry_after=wait)

    def sends_in_window(self, key_id: int, now: float) -> int:
        row = self.conn().execute("SELECT COALESCE(SUM(n), 0) FROM send_counts WHERE api_key_id = ? AND minute > ?",
                                  (key_id, int(now // MINUTE) - WINDOW_MINUTES)).fetchone()
        return int(row[0])

    def prune_send_counts(self, now: float) -> int:
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("DELETE FROM send_counts WHERE minute <= ?", (int(now // MINUTE) - WINDOW_MINUTES,))
        return cur.rowcount
