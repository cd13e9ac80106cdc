"""Prometheus metrics whose numbers live in the store, so every process reports one truth.

Counters and histogram buckets are rows of ``metric_counts``, one row per
process, metric and label, which that process alone adds to: the worker in
the same transaction that records an attempt's outcome, the web in each
group commit (the accepted count) and in each rejection's log write. No two
processes ever update the same row, so PostgreSQL row locks never make one
wait for another; a scrape sums the rows. Rows of processes that have been
quiet for an hour are folded into one row per metric by the sweeper, so the
table stays small and totals never go down (a Prometheus counter must not).

Gauges — messages per state, the age of the oldest waiting message, worker
heartbeats — are read from the messages and workers tables at scrape time.

Accept latency is known only after the group commit: the web process keeps it
in memory until its next commit (``relay_web.latency``).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Iterable

from ..db import Connection, serialize, transaction

PREFIX = "tspro_relay_"
ACCEPTED = "messages_accepted"
REJECTED = "messages_rejected"
ATTEMPTS = "delivery_attempts"
OUTCOMES = ("sent", "partial", "deferred", "failed")
STATES = ("queued", "sending", "deferred", "sent", "partial", "failed", "cancelled")
WAITING = ("queued", "deferred")
WORKER_ALIVE_SECONDS = 60.0
FOLD_AFTER_SECONDS = 3600.0

# Upper bounds in seconds; +Inf is implied.
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ACCEPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HISTOGRAMS = {"delivery_duration_seconds": DELIVERY_BUCKETS, "accept_duration_seconds": ACCEPT_BUCKETS}

_process: tuple[int, str] | None = None


def process_id() -> str:
    """This process's name in ``metric_counts`` (new after a fork)."""
    global _process
    if _process is None or _process[0] != os.getpid():
        _process = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    return _process[1]


def speak_for(process: str) -> None:
    """Count under another process's name from now on: the web process's writer child counts
    what it stores as the web process it serves, whichever of the two stores a send."""
    global _process
    _process = (os.getpid(), process)


# -- writing (inside the caller's transaction) ---------------------------------------------------
_UPSERT = ("INSERT INTO metric_counts (process, name, label, value, updated_at) VALUES (?, ?, ?, ?, ?)"
           " ON CONFLICT (process, name, label) DO UPDATE"
           " SET value = metric_counts.value + excluded.value, updated_at = excluded.updated_at")


def add(conn: Connection, deltas: dict[tuple[str, str], float], now: float | None = None) -> None:
    now = time.time() if now is None else now
    me = process_id()
    conn.insert_rows(_UPSERT, [(me, name, label, value, now) for (name, label), value in sorted(deltas.items())
                               if value])


def _bucket(value: float, bounds: tuple[float, ...]) -> str:
    for bound in bounds:
        if value <= bound:
            return repr(bound)
    return "+Inf"


def observations(name: str, values: Iterable[float]) -> dict[tuple[str, str], float]:
    """Histogram deltas: a count per bucket (not cumulative; the scrape adds them up), sum, count."""
    bounds = HISTOGRAMS[name]
    deltas: dict[tuple[str, str], float] = {}
    for value in values:
        key = (f"{name}_bucket", _bucket(value, bounds))
        deltas[key] = deltas.get(key, 0.0) + 1
        deltas[(f"{name}_sum", "")] = deltas.get((f"{name}_sum", ""), 0.0) + value
        deltas[(f"{name}_count", "")] = deltas.get((f"{name}_count", ""), 0.0) + 1
    return deltas


def count_attempt(conn: Connection, outcome: str, duration_ms: int | None, now: float | None = None) -> None:
    deltas = {(ATTEMPTS, outcome): 1.0}
    if duration_ms is not None:
        deltas.update(observations("delivery_duration_seconds", [duration_ms / 1000.0]))
    add(conn, deltas, now)


def count_rejection(conn: Connection, reason: str) -> None:
    add(conn, {(REJECTED, reason): 1.0})


def fold(conn: Connection, now: float) -> int:
    """Merge the rows of processes quiet for an hour into the ``*`` rows; returns how many went.

    In one transaction: a row's value moves, it is never counted twice or lost. A
    process that is only quiet, not gone, simply starts a new row of its own.
    """
    before = now - FOLD_AFTER_SECONDS
    with transaction(conn):
        # Two sweepers folding at once would both add the same rows to '*' (PostgreSQL
        # lets both read them); one at a time, the second finds nothing left to fold.
        serialize(conn, "tspro-relay metrics fold")
        quiet = conn.execute("SELECT name, label, SUM(value) FROM metric_counts WHERE process <> '*'"
                             " AND updated_at < ? GROUP BY name, label", (before,)).fetchall()
        if not quiet:
            return 0
        conn.executemany(_UPSERT, [("*", r[0], r[1], r[2], now) for r in quiet])
        return int(conn.execute("DELETE FROM metric_counts WHERE process <> '*' AND updated_at < ?",
                                (before,)).rowcount)


# -- reading (at scrape time) -----------------------------------------------------------------------
def totals(conn: Connection) -> dict[tuple[str, str], float]:
    rows = conn.execute("SELECT name, label, SUM(value) FROM metric_counts GROUP BY name, label").fetchall()
    return {(r[0], r[1]): float(r[2]) for r in rows}


def message_states(conn: Connection) -> dict[str, int]:
    counts = {state: 0 for state in STATES}
    for row in conn.execute("SELECT status, COUNT(*) FROM messages GROUP BY status").fetchall():
        counts[row[0]] = int(row[1])
    return counts


def oldest_waiting(conn: Connection) -> float | None:
    row = conn.execute("SELECT MIN(created_at) FROM messages WHERE status IN ('queued', 'deferred')").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def worker_heartbeats(conn: Connection) -> dict[str, float]:
    return {r[0]: float(r[1]) for r in conn.execute("SELECT name, heartbeat_at FROM workers").fetchall()}
