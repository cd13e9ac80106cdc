"""The queue as the admin pages read and change it (queueview.py, interventions.py), on both backends.

Messages are stored as the web process stores them (a real validated payload,
encrypted to its id) and brought to their states by a worker's own claim and
record_attempt, so what Retry now and Cancel meet is what a relay holds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay_core.message import new_message_id, pack_stored, parse_payload
from relay_core.options import Options
from relay_core.store import ClaimedMessage, LogEntry, NewMessage, Store, insert_message, transaction

pytestmark = pytest.mark.backends

T0 = 1_700_000_000.0


def stored(store: Store, created: float, to: list[str] | None = None, subject: str = "Hello",
           **extra: Any) -> str:
    payload = {"from_email": "noreply@example.org", "to": to or ["ann@example.com"], "subject": subject,
               "text": "the text part", **extra}
    message = parse_payload(payload, Options())
    message_id = new_message_id()
    document = pack_stored(bytearray(json.dumps(payload).encode()), message)
    record = NewMessage.accepted(message, message_id, store.keys.encrypt_body(bytes(document), message_id),
                                 created, Options(), "api", None)
    conn = store.conn()
    with transaction(conn):
        insert_message(conn, record)
    return message_id


def attempt(store: Store, message_id: str, status: str, now: float, code: int = 451) -> ClaimedMessage:
    """A worker's attempt ending in ``status`` (deferred for an hour, or failed)."""
    claimed = store.messages.claim(message_id, "w1", 300, now=now)
    assert isinstance(claimed, ClaimedMessage)
    updates = {r.position: (status, code, "the server said no") for r in claimed.recipients}
    assert store.messages.record_attempt(claimed, status, next_attempt_at=now + 3600 if status == "deferred" else None,
                                         last_error="DATA: the server said no", recipient_updates=updates,
                                         entry=LogEntry("attempt", status, message_id=message_id, stage="DATA", code=code,
                                               ts=now), now=now)
    return claimed


def state(store: Store, message_id: str) -> tuple[str, list[str]]:
    record = store.messages.record(message_id)
    assert record is not None
    return record.status, [r.status for r in record.recipients]


def test_counts_oldest_waiting_and_lists(store: Store) -> None:
    queued = [stored(store, T0 + i) for i in range(3)]
    deferred = stored(store, T0 - 50, to=["x@example.com", "y@example.com"])
    attempt(store, deferred, "deferred", T0 + 10)
    failed = [stored(store, T0 + 20 + i) for i in range(2)]
    for i, message_id in enumerate(failed):
        attempt(store, message_id, "failed", T0 + 30 + i, code=550)
    sent = stored(store, T0 + 40)
    attempt(store, sent, "sent", T0 + 41, code=250)
    store.messages.claim(queued[2], "w2", 300, now=T0 + 50)  # one being sent now

    counts = store.messages.queue_counts(now=T0 + 60)
    assert (counts.queued, counts.sending, counts.deferred, counts.failed) == (2, 1, 1, 2)
    assert (counts.sent_24h, counts.failed_24h, counts.waiting) == (1, 2, 3)
    assert counts.oldest_waiting_at == T0 - 50

    waiting = store.messages.waiting()
    assert [m.id for m in waiting] == [deferred, queued[0], queued[1]]
    assert waiting[0].recipients == ["x@example.com", "y@example.com"] and waiting[0].status == "deferred"
    assert [m.id for m in store.messages.failed()] == [failed[1], failed[0]]
    assert [m.id for m in store.messages.waiting(limit=1)] == [deferred]


def test_retry_now_makes_a_deferred_message_due_and_a_failed_one_queued(store: Store) -> None:
    deferred = stored(store, T0)
    attempt(store, deferred, "deferred", T0 + 1)
    failed = stored(store, T0 + 2, to=["a@example.com", "b@example.com"])
    attempt(store, failed, "failed", T0 + 3, code=550)

    report = store.messages.retry_now([deferred, failed, deferred], "admin", "192.0.2.7", now=T0 + 100)
    assert report.done == [deferred, failed] and report.skipped == {}
    assert state(store, deferred) == ("queued", ["deferred"])
    assert state(store, failed) == ("queued", ["pending", "pending"])
    record = store.messages.record(failed)
    assert record is not None and record.finished_at is None and record.next_attempt_at == T0 + 100
    # Due now: a worker's claim at that moment takes both.
    assert isinstance(store.messages.claim(deferred, "w", 300, now=T0 + 100), ClaimedMessage)
    assert isinstance(store.messages.claim(failed, "w", 300, now=T0 + 100), ClaimedMessage)

    rows = [r for r in store.log.of_message(failed) if r.kind == "retried"]
    assert len(rows) == 1 and rows[0].detail == "retry now by admin (it was failed)"
    assert rows[0].source_ip == "192.0.2.7" and rows[0].recipients == "a@example.com, b@example.com"
    [audit] = store.log.audit_entries(action_prefix="message.retry")
    assert audit.detail == f"retried 2 message(s): {deferred}, {failed}" and audit.ip == "192.0.2.7"


def test_retry_refuses_what_it_cannot_retry_and_says_why(store: Store) -> None:
    queued = stored(store, T0)
    sending = stored(store, T0 + 1)
    store.messages.claim(sending, "w", 300, now=T0 + 2)
    sent = stored(store, T0 + 3)
    attempt(store, sent, "sent", T0 + 4, code=250)
    pruned = stored(store, T0 + 5)
    attempt(store, pruned, "failed", T0 + 6, code=550)
    store.workers.prune(T0 + 10**6, sent_body_seconds=10, failed_body_seconds=10, log_seconds=10**9,
                        log_max_rows=10**9, idempotency_seconds=10)

    report = store.messages.retry_now([queued, sending, sent, pruned, "nope"], "admin", "192.0.2.7", now=T0 + 10**6)
    assert report.done == []
    assert report.skipped == {
        queued: "it is already queued", sending: "it is being delivered right now",
        sent: "it is sent; only deferred and failed messages can be retried",
        pruned: "its content was deleted after the retention period, so it cannot be sent again",
        "nope": "no such message",
    }
    assert state(store, pruned)[0] == "failed" and state(store, sending)[0] == "sending"
    assert store.log.audit_entries(action_prefix="message.") == []


def test_cancel_only_touches_waiting_messages(store: Store) -> None:
    queued = stored(store, T0)
    deferred = stored(store, T0 + 1)
    attempt(store, deferred, "deferred", T0 + 2)
    sending = stored(store, T0 + 3)
    store.messages.claim(sending, "w", 300, now=T0 + 4)
    failed = stored(store, T0 + 5)
    attempt(store, failed, "failed", T0 + 6, code=550)

    report = store.messages.cancel([queued, deferred, sending, failed], "admin", "192.0.2.8", now=T0 + 20)
    assert report.done == [queued, deferred]
    assert report.skipped == {sending: "it is being delivered right now",
                              failed: "it is failed; only waiting messages can be cancelled"}
    assert state(store, queued) == ("cancelled", ["cancelled"])
    assert state(store, deferred) == ("cancelled", ["cancelled"])
    assert state(store, sending)[0] == "sending"
    assert store.messages.claim(queued, "w", 300, now=T0 + 10**5) is None  # never delivered
    [row] = [r for r in store.log.of_message(queued) if r.kind == "cancelled"]
    assert row.detail == "cancelled by admin"
    [audit] = store.log.audit_entries(action_prefix="message.cancel")
    assert audit.detail == f"cancelled 2 message(s): {queued}, {deferred}"


def test_nothing_selected_changes_nothing(store: Store) -> None:
    assert store.messages.retry_now([], "admin", "").done == [] and store.messages.cancel([], "admin", "").done == []
    assert store.log.audit_entries() == []


def test_message_record_and_document(store: Store) -> None:
    attachment = {"filename": "notes.txt", "mime_type": "text/plain", "content_b64": "aGVsbG8gd29ybGQ="}
    message_id = stored(store, T0, to=["ann@example.com", "bob@example.com"], subject="Minutes",
                        html="<p>the <b>html</b> part</p>", reply_to="help@example.org", attachments=[attachment])
    record = store.messages.record(message_id)
    assert record is not None
    assert (record.status, record.subject, record.attachments, record.has_body) == ("queued", "Minutes", 1, True)
    assert record.message_id_header == f"<{message_id}@example.org>"
    assert [(r.address, r.kind, r.status) for r in record.recipients] == [
        ("ann@example.com", "to", "pending"), ("bob@example.com", "to", "pending")]
    assert record.retryable is False and record.cancellable is True
    document = store.messages.document(message_id)
    assert document is not None
    assert (document.text, document.html, document.reply_to) == ("the text part", "<p>the <b>html</b> part</p>",
                                                                 "help@example.org")
    assert [(a.filename, a.size) for a in document.attachments] == [("notes.txt", 11)]
    assert store.messages.record("unknown") is None and store.messages.document("unknown") is None
