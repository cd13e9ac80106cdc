"""Retry policy with an injected clock and seeded jitter; retention; pacing.

The Deliverer talks to a real aiosmtpd server; only time is injected, so the
backoff schedule is checked exactly without sleeping through it.
"""

from __future__ import annotations

import random
import time
from typing import Iterator

import pytest

from relay_core.delivery.attempt import Deliverer, backoff_delay
from relay_core.message import pack_stored, parse_payload
from relay_core.options import Options
from relay_core.store import NewMessage, Paced, Store, insert_message, transaction
from support import SmtpServer, store_message as queue_message, wait_until


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(store: Store) -> Iterator[SmtpServer]:
    with SmtpServer("none") as server:
        store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "none",
                           "retry_base_seconds": 60, "retry_max_seconds": 3600, "max_age_hours": 24.0})
        yield server


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    options = Options(retry_base_seconds=60, retry_max_seconds=3600)
    rng = random.Random(7)
    delays = [backoff_delay(n, options, rng) for n in range(1, 10)]
    nominal = [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    for delay, expected in zip(delays, nominal):
        assert expected * 0.85 <= delay <= expected * 1.15
    assert len({round(d, 6) for d in delays[-3:]}) == 3  # jitter: capped retries do not line up


def test_retry_schedule_follows_the_clock_until_max_age(store: Store, server: SmtpServer) -> None:
    server.behaviour.data_replies = ["451 4.3.0 try later"] * 100
    clock = Clock(1_800_000_000.0)
    deliverer = Deliverer(store, clock=clock, rng=random.Random(1))
    message_id = queue_message(store, created=clock.now)
    try:
        waits = []
        for _ in range(60):  # 6 doublings to the 1 h cap, then about 23 more to 24 h
            outcome = deliverer.attempt(message_id)
            assert outcome is not None
            if outcome.status != "deferred":
                break
            assert outcome.next_attempt_at is not None
            waits.append(outcome.next_attempt_at - clock.now)
            assert deliverer.attempt(message_id) is None  # not due yet: nothing happens
            clock.now = outcome.next_attempt_at
        assert outcome.status == "failed" and "gave up after" in outcome.detail
        assert 60 * 0.85 <= waits[0] <= 60 * 1.15
        assert all(later > earlier for earlier, later in zip(waits[:6], waits[1:6]))
        assert max(waits) <= 3600 * 1.15
        assert clock.now - 1_800_000_000.0 <= 24 * 3600
        status = store.messages.status(message_id)
        assert status is not None and status["status"] == "failed"
        assert len(status["attempts"]) == len(waits) + 1
    finally:
        deliverer.close()


def test_pacing_counts_deliveries_in_the_window(store: Store) -> None:
    now = 1_800_000_000.0
    ids = [queue_message(store, created=now) for _ in range(4)]
    limits = ((2, 60.0),)
    first = store.messages.claim(ids[0], "w", 60, now=now, limits=limits)
    second = store.messages.claim(ids[1], "w", 60, now=now + 1, limits=limits)
    third = store.messages.claim(ids[2], "w", 60, now=now + 2, limits=limits)
    assert not isinstance(first, Paced) and first is not None
    assert not isinstance(second, Paced) and second is not None
    assert isinstance(third, Paced) and now + 60 <= third.until <= now + 60 + 5.01
    assert "2 deliveries per minute" in third.reason
    status = store.messages.status(ids[2])
    assert status is not None and status["status"] == "deferred" and status["attempt_count"] == 0
    # Once the first delivery leaves the window, the next one may start.
    assert store.messages.claim(ids[2], "w", 60, now=now + 59, limits=limits) is None  # not due yet
    assert not isinstance(store.messages.claim(ids[2], "w", 60, now=third.until, limits=limits), Paced)


def test_retention_prunes_bodies_logs_and_old_messages(store: Store, server: SmtpServer) -> None:
    now = time.time()
    deliverer = Deliverer(store)
    sent_id = queue_message(store, created=now)
    assert deliverer.attempt(sent_id).status == "sent"  # type: ignore[union-attr]
    deliverer.close()
    waiting_id = queue_message(store, created=now)

    def body(message_id: str) -> object:
        return store.conn().execute("SELECT body FROM messages WHERE id = ?", (message_id,)).fetchone()[0]

    kwargs = dict(sent_body_seconds=3600, failed_body_seconds=7 * 86400, log_seconds=90 * 86400,
                  log_max_rows=1000, idempotency_seconds=86400)
    store.workers.prune(now + 60, **kwargs)  # type: ignore[arg-type]
    assert body(sent_id) is not None
    store.workers.prune(now + 3601, **kwargs)  # type: ignore[arg-type]
    assert body(sent_id) is None
    assert body(waiting_id) is not None  # never prune what is still to be delivered
    assert store.messages.status(sent_id)["status"] == "sent"  # type: ignore[index]
    store.workers.prune(now + 91 * 86400, **kwargs)  # type: ignore[arg-type]
    assert store.messages.status(sent_id) is None
    assert store.messages.status(waiting_id) is not None
    assert store.conn().execute("SELECT COUNT(*) FROM log WHERE message_id = ?", (sent_id,)).fetchone()[0] == 0


def test_log_is_bounded_by_row_count(store: Store) -> None:
    from relay_core.store import LogEntry
    for i in range(1500):
        store.conn().execute("INSERT INTO log (ts, event, status, detail) VALUES (?, 'rejected', 'rejected', ?)",
                             (time.time(), str(i)))
    store.workers.prune(time.time(), sent_body_seconds=1, failed_body_seconds=1, log_seconds=86400,
                        log_max_rows=1000, idempotency_seconds=1)
    rows = store.conn().execute("SELECT COUNT(*), MIN(detail + 0) FROM log").fetchone()
    assert rows[0] == 1000 and rows[1] == 500  # the newest are kept
    store.log.write(LogEntry("rejected", "rejected"))


def test_an_unexpected_error_is_recorded_as_a_deferred_attempt(store: Store, server: SmtpServer) -> None:
    # An envelope sender the settings would refuse today (non-ASCII), as older data may hold:
    # smtplib raises UnicodeEncodeError at MAIL, which is neither an SMTP nor a socket error.
    payload = {"from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": "s", "text": "t"}
    message = parse_payload(payload, Options())
    import json
    document = pack_stored(bytearray(json.dumps(payload).encode()), message)
    conn = store.conn()
    with transaction(conn):
        insert_message(conn, NewMessage("bad1", "api", None, time.time(), message.from_email, "", "bö@example.org",
                                        "s", "<bad1@example.org>", store.keys.encrypt_body(document, "bad1"),
                                        len(document), message.to))
    deliverer = Deliverer(store)
    try:
        outcome = deliverer.attempt("bad1")
        assert outcome is not None and outcome.status == "deferred"
        status = store.messages.status("bad1")
        assert status is not None and status["status"] == "deferred"
        assert status["attempts"][0]["stage"] == "internal"
        assert "UnicodeEncodeError" in status["last_error"]
        # The thread's connection was dropped, and the next message goes out normally.
        good = queue_message(store, created=time.time())
        assert deliverer.attempt(good).status == "sent"  # type: ignore[union-attr]
    finally:
        deliverer.close()


def test_a_message_whose_attempts_never_finish_is_failed_after_repeated_claims(store: Store) -> None:
    now = 1_800_000_000.0
    message_id = queue_message(store, created=now)
    from relay_core.store import MAX_UNRECORDED_CLAIMS
    for i in range(MAX_UNRECORDED_CLAIMS):
        # Each claimer dies (nothing recorded); the lease runs out and it is claimed again.
        assert store.messages.claim(message_id, f"w{i}", 60, now=now) is not None
        now += 61
    assert store.messages.claim(message_id, "last", 60, now=now) is None
    status = store.messages.status(message_id)
    assert status is not None and status["status"] == "failed"
    assert f"interrupted {MAX_UNRECORDED_CLAIMS} times" in status["last_error"]
    assert status["recipients"][0]["status"] == "failed"


def test_leases_are_renewed_while_a_slow_delivery_runs(store: Store, server: SmtpServer) -> None:
    import threading
    store.set_options({"lease_seconds": 5})
    server.behaviour.delay = 7.0  # DATA outlasts the lease
    message_id = queue_message(store, created=time.time())
    slow, other = Deliverer(store, identity="slow"), Deliverer(store, identity="other")
    outcomes = []
    thread = threading.Thread(target=lambda: outcomes.append(slow.attempt(message_id)))
    try:
        thread.start()
        wait_until(lambda: store.conn().execute("SELECT lease_owner FROM messages WHERE id = ?",
                                                (message_id,)).fetchone()[0], what="the slow claim")
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline and thread.is_alive():
            assert other.attempt(message_id) is None  # never claimable while the send runs
            time.sleep(0.5)
        thread.join(10)
        assert outcomes[0] is not None and outcomes[0].status == "sent"
        assert len(server.received) == 1
    finally:
        slow.close()
        other.close()


def test_the_writer_answers_around_a_cancelled_request(store: Store, settings: object) -> None:
    from relay_core.intake.group_commit import GroupCommit
    from relay_core.tasks import build_queue
    queue = build_queue(settings)  # type: ignore[arg-type]
    intake = GroupCommit(store, queue)
    ids = []

    def job(message_id: str):  # type: ignore[no-untyped-def]
        def write(conn):  # type: ignore[no-untyped-def]
            payload = {"from_email": "noreply@example.org", "to": ["a@example.com"], "subject": "s", "text": "t"}
            message = parse_payload(payload, Options())
            insert_message(conn, NewMessage(message_id, "api", None, time.time(), message.from_email, "",
                                            message.from_email, "s", "<x>", b"sealed", 6, message.to))
            return message_id, [message_id]
        ids.append(message_id)
        return write

    first = intake.submit(job("c1"))
    second = intake.submit(job("c2"))
    assert first.cancel()  # the client went away before the writer got to it
    intake.start()
    try:
        assert second.result(10) == "c2"
    finally:
        intake.stop()
    rows = {r[0] for r in store.conn().execute("SELECT id FROM messages")}
    assert rows == {"c1", "c2"}  # committed either way: the row stands, and it is queued
    assert queue.pending() == 2
