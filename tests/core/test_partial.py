"""The 'partial' state: some recipients delivered, the rest refused for good.

A real aiosmtpd server refuses one recipient with 550; the Deliverer records
the outcome in the store, on both backends, and retention treats the result
like a sent message.
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from relay_core.delivery.attempt import Deliverer
from relay_core.store import Store
from support import SmtpServer, store_message

pytestmark = pytest.mark.backends


@pytest.fixture
def server(store: Store) -> Iterator[SmtpServer]:
    with SmtpServer("none") as server:
        store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "none"})
        yield server


def prune_now(store: Store, now: float) -> dict[str, int]:
    return store.workers.prune(now, sent_body_seconds=60, failed_body_seconds=10**6, log_seconds=10**7,
                               log_max_rows=10**6, idempotency_seconds=86400)


def test_one_refused_recipient_makes_the_message_partial_and_final(store: Store, server: SmtpServer) -> None:
    server.behaviour.rcpt_replies = {"bob@example.com": "550 5.1.1 No such user"}
    deliverer = Deliverer(store)
    try:
        message_id = store_message(store, time.time(), to=["ann@example.com", "bob@example.com"])
        outcome = deliverer.attempt(message_id)
        assert outcome is not None and outcome.status == "partial"
        assert deliverer.attempt(message_id) is None  # final: never claimed again
    finally:
        deliverer.close()
    status = store.messages.status(message_id)
    assert status is not None and status["status"] == "partial" and status["finished_at"]
    assert [r["status"] for r in status["recipients"]] == ["sent", "failed"]
    assert "bob@example.com: 550" in status["last_error"] and status["next_attempt_at"] is None
    assert status["attempts"][0]["status"] == "partial"
    assert store.messages.counts() == {"partial": 1}
    assert [r.status for r in store.log.entries(status="partial")] == ["partial"]
    assert len(server.received) == 1 and server.received[0].rcpt_tos == ["ann@example.com"]

    # Retention: the body goes after retention_sent_hours, as for a sent message.
    body = "SELECT body IS NULL FROM messages WHERE id = ?"
    assert prune_now(store, time.time())["sent_bodies"] == 0
    assert store.conn().execute(body, (message_id,)).fetchone()[0] in (0, False)
    assert prune_now(store, time.time() + 120)["sent_bodies"] == 1
    assert store.conn().execute(body, (message_id,)).fetchone()[0] in (1, True)


def test_all_recipients_refused_is_failed_not_partial(store: Store, server: SmtpServer) -> None:
    server.behaviour.rcpt_replies = {"ann@example.com": "550 no", "bob@example.com": "550 no"}
    deliverer = Deliverer(store)
    try:
        message_id = store_message(store, time.time(), to=["ann@example.com", "bob@example.com"])
        outcome = deliverer.attempt(message_id)
    finally:
        deliverer.close()
    assert outcome is not None and outcome.status == "failed"
