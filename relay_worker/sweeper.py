"""The sweeper: re-enqueue what the queue lost, prune what retention allows,
keep this worker's heartbeat fresh, and check new SMTP settings at once.

A thread rather than a Huey periodic task, which is scheduled by the minute;
several workers sweeping at once is harmless, as every wake-up is an
idempotent claim.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from relay_core.store import metrics
from relay_core.logs import fields
from relay_core.delivery.pausing import wake_waiting
from relay_core.delivery.probe import UPSTREAM_SETTINGS, check_new_settings
from relay_core.store import Store
from relay_core.tasks import RelayQueue

logger = logging.getLogger("relay.sweeper")


class Sweeper:
    def __init__(self, store: Store, relay_queue: RelayQueue, name: str,
                 clock: Callable[[], float] = time.time, dropped: threading.Event | None = None) -> None:
        self.store = store
        self.queue = relay_queue
        self.name = name
        self.clock = clock
        self.started_at = clock()
        self._stop = threading.Event()
        self.dropped = dropped or threading.Event()  # wake-ups this worker dropped while paused
        self._thread = threading.Thread(target=self._run, name="relay-sweeper", daemon=True)
        self._checked_for = 0.0  # the SMTP settings change this worker last had checked
        self._checker: threading.Thread | None = None

    def start(self) -> None:
        self.sweep_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def sweep_once(self) -> int:
        now = self.clock()
        options = self.store.options()
        self.store.workers.heartbeat(self.name, os.getpid(), socket.gethostname(), self.started_at, now=now)
        ids: list[str] = []
        if options.delivery_paused:
            # No re-enqueueing while paused (workers would only drop the wake-ups); instead,
            # wake everything waiting as soon as the pause is lifted.
            self.dropped.set()
        else:
            # While the queue holds at least as many tasks as there are messages
            # waiting, each may still be in it: re-enqueueing them would only pile
            # duplicates onto a backlog. Expired leases are always swept.
            include_waiting = self.queue.pending() < self.store.workers.waiting_count(now)
            ids = self.store.workers.sweep(now, stale_after=max(options.sweep_seconds, 5), include_waiting=include_waiting)
        if ids:
            self.queue.enqueue_many(ids)
            logger.info("re-enqueued %d message(s)", len(ids), extra=fields("sweep.requeued", count=len(ids)))
        pruned = self.store.workers.prune(
            now,
            sent_body_seconds=options.retention_sent_hours * 3600,
            failed_body_seconds=options.retention_failed_days * 86400,
            log_seconds=options.log_retention_days * 86400,
            log_max_rows=options.log_max_rows,
            idempotency_seconds=24 * 3600,
        )
        pruned["admin_sessions"] = self.store.admin.prune_sessions(now, options.session_idle_minutes * 60)
        pruned["send_counts"] = self.store.api_keys.prune_send_counts(now)
        pruned["refusals"] = self.store.log.prune_refusals(now)
        metrics.fold(self.store.conn(), now)
        if any(pruned.values()):
            logger.info("retention: %s", pruned, extra=fields("sweep.retention", count=sum(pruned.values())))
        return len(ids)

    def check_settings(self) -> None:
        """Check a change to the SMTP settings in a thread of its own: the check waits on the
        server's timeouts, and the heartbeat must not."""
        changed = self.store.options_changed_at(UPSTREAM_SETTINGS)
        if changed <= self._checked_for or (self._checker is not None and self._checker.is_alive()):
            return
        self._checked_for = changed

        def check() -> None:
            try:
                check_new_settings(self.store)
            except Exception:
                logger.exception("checking the new SMTP settings failed", extra=fields("probe.error"))
            finally:
                self.store.close()

        self._checker = threading.Thread(target=check, name="relay-settings-check", daemon=True)
        self._checker.start()

    def _run(self) -> None:
        heartbeat_every = 5.0
        last_sweep = last_beat = time.monotonic()
        # Checked every 2 s: how soon a resume from the UI or `config set` is noticed.
        while not self._stop.wait(2.0):
            try:
                options = self.store.options()
                self.check_settings()
                if self.dropped.is_set() and not options.delivery_paused:
                    # Resumed after this worker dropped wake-ups or skipped a sweep: wake everything now.
                    self.dropped.clear()
                    woken = wake_waiting(self.store, self.queue, self.clock())
                    logger.info("delivery resumed; woke %d waiting message(s)", woken)
                if time.monotonic() - last_sweep >= options.sweep_seconds:
                    last_sweep = last_beat = time.monotonic()
                    self.sweep_once()
                elif time.monotonic() - last_beat >= heartbeat_every:
                    last_beat = time.monotonic()
                    self.store.workers.heartbeat(self.name, os.getpid(), socket.gethostname(), self.started_at,
                                                 now=self.clock())
            except Exception:
                logger.exception("sweep failed; trying again next interval", extra=fields("sweep.error"))
        self.store.close()
