"""Pausing delivery: accept and queue, deliver nothing, lose nothing.

A paused worker drops the wake-ups it takes (the store, not the queue, is the
truth), so resuming must wake every waiting message again: ``resume`` does,
and each sweeper does when it sees the setting cleared elsewhere.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..store import Store

if TYPE_CHECKING:
    from ..tasks import RelayQueue


def pause(store: Store, audit: tuple[str, str] | None = None) -> None:
    """Pause delivery; ``audit`` (who, from which IP) records it in the audit trail with the change."""
    store.set_options({"delivery_paused": True},
                      (*audit, "delivery.pause", "paused delivery") if audit else None)


def resume(store: Store, relay_queue: RelayQueue | None, audit: tuple[str, str] | None = None) -> int:
    """Clear the pause and re-enqueue every message waiting now; how many."""
    store.set_options({"delivery_paused": False},
                      (*audit, "delivery.resume", "resumed delivery") if audit else None)
    return wake_waiting(store, relay_queue)


def wake_waiting(store: Store, relay_queue: RelayQueue | None, now: float | None = None) -> int:
    """Enqueue a wake-up for every queued, due-deferred or lease-expired message."""
    if relay_queue is None:
        return 0
    now = time.time() if now is None else now
    total = 0
    for _ in range(10_000):  # bounded: each round marks what it took as enqueued now
        ids = store.workers.sweep(now, stale_after=0.0, include_waiting=True)
        if not ids:
            break
        relay_queue.enqueue_many(ids)
        total += len(ids)
    return total
