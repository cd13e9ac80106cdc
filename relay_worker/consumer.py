"""The worker process: settings -> store -> queue -> Huey consumer.

SIGINT and SIGTERM are both graceful here: stop taking tasks, let in-flight
deliveries finish within ``GRACE_SECONDS``, then exit. Anything still leased
when the process ends is picked up by a sweeper once the lease expires.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid

from relay_core import crypto
from relay_core.config import Settings
from relay_core.delivery.attempt import Deliverer
from relay_core.health import mark_worker, unmark_worker
from relay_core.logs import fields, setup_logging
from relay_core.store import Store
from relay_core.tasks import build_queue, check_queue

from .sweeper import Sweeper

logger = logging.getLogger("relay.worker")
GRACE_SECONDS = 25.0


def main(settings: Settings) -> int:
    setup_logging(settings)
    check_queue(settings)  # before the store: a queue other hosts cannot see is refused first
    store = Store.open(settings, crypto.derive_keys(settings))
    store.bootstrap(settings)
    relay_queue = build_queue(settings)
    deliverer = Deliverer(store, overlap=True)  # a thread's next claim shares the batch of its last outcome

    def handle(message_id: str) -> None:
        try:
            outcome = deliverer.attempt(message_id)
        except Exception:
            logger.exception("delivery of %s failed unexpectedly; it will be retried after its lease", message_id,
                             extra=fields("delivery.crash", message_id=message_id))
            return
        if outcome is None:
            # Woken before it was due (a clock step, an early scheduler): wait for it again.
            due = store.messages.waiting_until(message_id, time.time())
            if due is not None:
                relay_queue.enqueue(message_id, eta=due)
        elif outcome.status == "deferred" and outcome.next_attempt_at is not None:
            # Only once the outcome is stored: a wake-up before that would find the message still sending.
            due = outcome.next_attempt_at
            outcome.then(lambda: relay_queue.enqueue(outcome.message_id, eta=due))

    relay_queue.bind(handle)
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    sweeper = Sweeper(store, relay_queue, name, dropped=deliverer.dropped_while_paused)
    sweeper.start()
    marker = mark_worker(settings, name)  # `tspro-relay healthcheck --worker` looks up this worker's heartbeat
    consumer = relay_queue.huey.create_consumer(
        workers=settings.worker_threads, worker_type="thread", periodic=False,
        initial_delay=0.05, backoff=1.2, max_delay=0.5, scheduler_interval=1,
        check_worker_health=True, shutdown_timeout=GRACE_SECONDS,
    )
    # Huey treats SIGTERM as "stop now"; containers send SIGTERM, so make it graceful too.
    consumer._signal_actions[signal.SIGTERM] = (False, True)
    logger.info("worker %s started with %d delivery threads", name, settings.worker_threads,
                extra=fields("worker.started", worker=name, threads=settings.worker_threads))
    # Huey sets its signal handlers only after its threads have started, and a thread may already be
    # delivering by then: a SIGTERM in between killed the process mid-delivery (exit -15), a SIGINT
    # raised KeyboardInterrupt past the graceful stop (exit 130). Set them before anything runs.
    consumer._set_signal_handlers()
    try:
        consumer.run()
    finally:
        sweeper.stop()
        deliverer.close()
        store.workers.forget(name)
        unmark_worker(marker)
        store.shutdown()
        logger.info("worker %s stopped", name, extra=fields("worker.stopped", worker=name))
    return 0
