"""The worker's group commit (delivery.DeliveryWrites) on both backends.

Claims and outcomes that arrive together are written in one transaction; a
write the store refuses (here a trigger that refuses one message's row, the
way a full disk or a broken row would) costs only that message, as on the
accept path. The worker's threads hand over an outcome without waiting for
its commit (``overlap``); what depends on it still waits for it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Iterator

import pytest

from relay_core.delivery.attempt import Deliverer, DeliveryWrites
from relay_core.store.ledger import AttemptOutcome, ClaimedMessage
from relay_core.store import LogEntry, Store, transaction
from support import SmtpServer, store_message

pytestmark = pytest.mark.backends


@pytest.fixture
def writes(store: Store) -> Iterator[DeliveryWrites]:
    writes = DeliveryWrites(store)
    yield writes
    writes.close()


def refuse_updates_of(store: Store, message_id: str) -> None:
    """From now on the store refuses every change to this message's row."""
    conn = store.conn()
    with transaction(conn):
        if store.database.dialect == "sqlite":
            conn.execute(f"CREATE TRIGGER refuse BEFORE UPDATE ON messages WHEN OLD.id = '{message_id}'"
                         " BEGIN SELECT RAISE(ABORT, 'this row cannot be written'); END")
        else:
            conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                         f" IF OLD.id = '{message_id}' THEN RAISE EXCEPTION 'this row cannot be written'; END IF;"
                         " RETURN NEW; END $$")
            conn.execute("CREATE TRIGGER refuse BEFORE UPDATE ON messages FOR EACH ROW EXECUTE FUNCTION refuse()")


def sent(claimed: ClaimedMessage) -> AttemptOutcome:
    now = time.time()
    entry = LogEntry("attempt", "sent", message_id=claimed.id, stage="DATA", code=250, detail="250 OK",
                     duration_ms=12, ts=now)
    return AttemptOutcome(claimed.id, claimed.lease_owner, "sent", None, None,
                          {r.position: ("sent", 250, "OK") for r in claimed.recipients}, entry, now)


def hold_the_writer(writes: DeliveryWrites) -> threading.Event:
    """Keep the writer thread busy in a batch of its own until the event is set, so that whatever is
    submitted meanwhile arrives together, in the next batch."""
    go, busy = threading.Event(), threading.Event()

    def wait(conn: object) -> tuple[None, list[str]]:
        busy.set()
        go.wait(30)
        return None, []

    writes.start()
    writes.intake.submit(wait)
    assert busy.wait(30)
    return go


def test_outcomes_arriving_together_share_one_batch_and_one_failure_costs_only_its_message(
        store: Store, writes: DeliveryWrites) -> None:
    ids = [store_message(store, created=time.time()) for _ in range(4)]
    claims = [store.messages.claim(i, "worker-1", 300) for i in ids]
    assert all(isinstance(c, ClaimedMessage) for c in claims)
    refuse_updates_of(store, ids[2])

    go = hold_the_writer(writes)
    stored: list[Future[bool]] = [writes.record(sent(c)) for c in claims]  # type: ignore[arg-type]
    batches = writes.intake.batches
    go.set()

    results = []
    for future in stored:
        try:
            results.append(future.result(30))
        except Exception as exc:
            results.append(exc)
    assert writes.intake.batches == batches + 2  # the held one, then all four outcomes together
    assert results[:2] == [True, True] and results[3] is True
    assert "this row cannot be written" in str(results[2])
    states = {i: store.messages.status(i) for i in ids}
    assert [states[i]["status"] for i in ids] == ["sent", "sent", "sending", "sent"]  # type: ignore[index]
    # The refused one lost nothing either: still leased, it is taken again when its lease runs out.
    assert [len(states[i]["attempts"]) for i in ids] == [1, 1, 0, 1]  # type: ignore[index]
    assert store.conn().execute("SELECT lease_owner FROM messages WHERE id = ?", (ids[2],)).fetchone()[0] \
        == "worker-1"


def test_claims_and_outcomes_together_and_a_refused_claim_costs_only_its_message(
        store: Store, writes: DeliveryWrites) -> None:
    now = time.time()
    done, refused, fresh = (store_message(store, created=now) for _ in range(3))
    claimed = store.messages.claim(done, "worker-1", 300)
    assert isinstance(claimed, ClaimedMessage)
    refuse_updates_of(store, refused)

    go = hold_the_writer(writes)
    results: dict[str, object] = {}

    def claim(message_id: str) -> None:
        try:
            results[message_id] = writes.claim(message_id, "worker-2", now + 1)[1]
        except Exception as exc:
            results[message_id] = exc

    threads = [threading.Thread(target=claim, args=(i,)) for i in (refused, fresh, done)]
    for thread in threads:
        thread.start()
    outcome = writes.record(sent(claimed))
    while writes.intake._jobs.qsize() < 4:  # all four waiting: they go in one batch
        time.sleep(0.01)
    go.set()
    for thread in threads:
        thread.join(30)
    assert outcome.result(30) is True
    assert "this row cannot be written" in str(results[refused])
    taken = results[fresh]
    assert isinstance(taken, ClaimedMessage) and taken.lease_owner == "worker-2"
    assert results[done] is None  # sent already, or still leased to worker-1: either way not taken twice
    assert [store.messages.status(i)["status"] for i in (done, refused, fresh)] \
        == ["sent", "queued", "sending"]  # type: ignore[index]


def test_the_settings_are_read_again_only_when_their_revision_moves(store: Store, writes: DeliveryWrites) -> None:
    message_id = store_message(store, created=time.time())
    options, _ = writes.claim("no-such-message", "w", time.time())
    again, _ = writes.claim("no-such-message", "w", time.time())
    assert again is options  # the same object: nothing was read but the revision
    store.set_options({"delivery_paused": True})
    paused, claimed = writes.claim(message_id, "w", time.time())
    assert paused is not options and paused.delivery_paused
    assert claimed == "paused" and store.messages.status(message_id)["status"] == "queued"  # type: ignore[index]


@pytest.fixture
def server(store: Store) -> Iterator[SmtpServer]:
    with SmtpServer("none") as server:
        store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "none"})
        yield server


def test_an_overlapping_thread_hands_over_its_outcome_and_what_depends_on_it_waits(
        store: Store, server: SmtpServer) -> None:
    server.behaviour.data_replies = ["451 4.3.0 try later", "250 OK"]
    deliverer = Deliverer(store, overlap=True)
    first, second = (store_message(store, created=time.time()) for _ in range(2))
    seen: list[str] = []
    try:
        deferred = deliverer.attempt(first)
        assert deferred is not None and deferred.status == "deferred" and deferred.stored is not None
        ran = threading.Event()
        deferred.then(lambda: (seen.append(store.messages.status(first)["status"]), ran.set()))  # type: ignore[index]
        done = deliverer.attempt(second)  # waits for the first's outcome before handing over its own
        assert deferred.stored.done() and deferred.stored.result() is True
        assert ran.wait(30)  # (the future's callbacks run just after its waiters are woken)
        assert seen == ["deferred"]  # run once the outcome was stored, and it saw it stored
        assert done is not None and done.status == "sent"
        deliverer.wait_for_last_outcome()
        assert store.messages.status(second)["status"] == "sent"  # type: ignore[index]
    finally:
        deliverer.close()


def test_a_body_the_budget_has_no_room_for_is_left_out_of_the_claim_and_read_when_there_is(
        store: Store) -> None:
    """A claim brings its body only if it fits beside what the other threads keep; a thread
    whose body was left out waits for room, reads it from the store and sends it whole."""
    with SmtpServer("none") as server:
        store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "none"})
        deliverer = Deliverer(store, render_budget=10)  # smaller than any sealed body
        budget = deliverer.render_budget
        message_id = store_message(store, created=time.time())
        outcomes: list[object] = []
        budget.used = 5  # as if another thread kept part of it
        thread = threading.Thread(target=lambda: outcomes.append(deliverer.attempt(message_id)))
        try:
            thread.start()
            for _ in range(3000):  # claimed (without its body, which did not fit): now it waits for room
                if store.messages.status(message_id)["status"] == "sending":  # type: ignore[index]
                    break
                time.sleep(0.01)
            assert not server.received and budget.used == 5  # the claim held nothing once made
            budget.release(5)  # the other thread is done: alone, the message goes whatever its size
            thread.join(30)
        finally:
            deliverer.close()
    assert [getattr(o, "status", None) for o in outcomes] == ["sent"]
    assert [r.rcpt_tos for r in server.received] == [["ann@example.com"]]
    assert budget.used == 0 and budget.peak > 10


def test_an_outcome_whose_flush_fails_is_not_reported_stored(store: Store) -> None:
    """With the log flushed apart from the commit (SQLite), an outcome is reported stored only
    once flushed: when the flush fails, what depends on it never runs."""
    writes = DeliveryWrites(store)
    failures = []

    def failing_flush() -> None:
        failures.append(True)
        raise OSError(5, "Input/output error")

    for intake in writes.intakes:
        intake.flush = failing_flush
    try:
        message_id = store_message(store, created=time.time())
        _, claimed = writes.claim(message_id, "w", time.time())
        assert isinstance(claimed, ClaimedMessage)
        stored = writes.record(sent(claimed))
        with pytest.raises(Exception, match="could not store"):
            stored.result(30)
        assert failures
    finally:
        writes.close()
