"""Failure classification, retries with backoff, per-recipient outcomes, pacing.

One web and one worker process serve the module (once on SQLite, once on
PostgreSQL with a Redis queue); each test gives them a fresh aiosmtpd server
that answers as the test needs.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from support import Relay, SmtpServer, wait_until

pytestmark = pytest.mark.backends


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, module_backend_env: dict[str, str]) -> Iterator[Relay]:
    relay = Relay(tmp_path_factory.mktemp("retries"), RELAY_WORKER_THREADS="4", **module_backend_env)
    relay.start_web()
    relay.start_worker()
    yield relay
    relay.close()


@pytest.fixture
def server(relay: Relay) -> Iterator[SmtpServer]:
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "retry_base_seconds=2", "retry_max_seconds=60",
                        "max_age_hours=24", "max_per_minute=0", "connection_idle_seconds=30")
        yield server


def send(relay: Relay, to: Any = ("ann@example.com",)) -> str:
    response = relay.send({"from_email": "noreply@example.org", "to": list(to), "subject": "Hi", "text": "Body"})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_451_twice_then_250_is_delivered_on_the_third_attempt_with_growing_gaps(
        relay: Relay, server: SmtpServer) -> None:
    server.behaviour.data_replies = ["451 4.3.0 Mailbox busy, try later", "451 4.3.0 Mailbox busy, try later"]
    message_id = send(relay)
    first = relay.wait_status(message_id, "deferred")
    assert first["attempts"][0]["code"] == 451 and first["attempts"][0]["stage"] == "DATA"
    assert first["next_attempt_at"] > first["attempts"][0]["at"]
    status = relay.wait_status(message_id, "sent", timeout=30)
    assert [a["status"] for a in status["attempts"]] == ["deferred", "deferred", "sent"]
    assert [a["code"] for a in status["attempts"]] == [451, 451, 250]
    assert len(server.received) == 1
    t = server.handler.attempt_times
    gaps = [t[1] - t[0], t[2] - t[1]]
    assert gaps[0] >= 1.5 and gaps[1] > gaps[0], gaps  # base 2 s ±15%, then about double
    assert status["last_error"] is None


def test_550_fails_after_one_attempt_with_the_reason(relay: Relay, server: SmtpServer) -> None:
    server.behaviour.data_replies = ["550 5.7.1 Message rejected as spam"]
    message_id = send(relay)
    status = relay.wait_status(message_id, "failed")
    assert len(status["attempts"]) == 1
    assert status["attempts"][0]["code"] == 550
    assert "550 5.7.1 Message rejected as spam" in status["last_error"]
    assert status["recipients"][0]["status"] == "failed"
    time.sleep(2.5)  # past the first retry delay: still one attempt, nothing delivered
    assert len(relay.status(message_id)["attempts"]) == 1
    assert server.received == []


def test_one_of_three_recipients_refused_the_others_delivered_once(relay: Relay, server: SmtpServer) -> None:
    server.behaviour.rcpt_replies = {"bob@example.com": "550 5.1.1 No such user"}
    message_id = send(relay, ["ann@example.com", "bob@example.com", "cy@example.com"])
    status = relay.wait_status(message_id, "partial", "sent")
    assert status["status"] == "partial"  # its own final state, not "sent" with an error
    assert [(r["address"], r["status"], r["code"]) for r in status["recipients"]] == [
        ("ann@example.com", "sent", 250), ("bob@example.com", "failed", 550), ("cy@example.com", "sent", 250)]
    assert "No such user" in status["recipients"][1]["reply"]
    assert status["attempts"][0]["status"] == "partial"
    assert "bob@example.com" in status["last_error"]
    time.sleep(2.5)
    assert len(server.received) == 1
    assert server.received[0].rcpt_tos == ["ann@example.com", "cy@example.com"]


def test_a_deferred_recipient_is_retried_alone(relay: Relay, server: SmtpServer) -> None:
    server.behaviour.rcpt_replies = {"bob@example.com": "450 4.2.1 Mailbox temporarily full"}
    message_id = send(relay, ["ann@example.com", "bob@example.com"])
    status = relay.wait_status(message_id, "deferred")
    assert [r["status"] for r in status["recipients"]] == ["sent", "deferred"]
    server.behaviour.rcpt_replies = {}
    status = relay.wait_status(message_id, "sent", timeout=30)
    assert [r["status"] for r in status["recipients"]] == ["sent", "sent"]
    assert [m.rcpt_tos for m in server.received] == [["ann@example.com"], ["bob@example.com"]]


def test_a_reply_that_says_when_to_retry_is_honoured(relay: Relay, server: SmtpServer) -> None:
    server.behaviour.data_replies = ["451 4.7.0 Rate limited, try again in 40 seconds"]
    message_id = send(relay)
    status = relay.wait_status(message_id, "deferred")
    assert status["next_attempt_at"] - status["attempts"][0]["at"] >= 40


def test_messages_older_than_max_age_end_failed_with_the_last_error(relay: Relay, server: SmtpServer) -> None:
    relay.configure("max_age_hours=0.001")  # 3.6 s
    server.behaviour.data_replies = ["421 4.3.2 Service shutting down"] * 10
    message_id = send(relay)
    status = relay.wait_status(message_id, "failed", timeout=30)
    assert "gave up after" in status["last_error"] and "421" in status["last_error"]
    assert status["recipients"][0]["status"] == "failed"
    assert server.received == []


def test_connection_refused_defers_with_the_stage(relay: Relay, server: SmtpServer) -> None:
    relay.configure("smtp_port=1")
    message_id = send(relay)
    status = relay.wait_status(message_id, "deferred")
    assert status["attempts"][0]["stage"] == "connect"
    assert "cannot connect to 127.0.0.1:1" in status["last_error"]
    relay.configure(f"smtp_port={server.port}")
    relay.wait_status(message_id, "sent", timeout=30)


def test_outbound_pacing_holds_messages_back_instead_of_rejecting(relay: Relay, server: SmtpServer) -> None:
    relay.configure("max_per_minute=3")
    try:
        ids = [send(relay, [f"user{i}@example.com"]) for i in range(5)]
        wait_until(lambda: len(server.received) == 3, what="three deliveries")
        statuses = wait_until(lambda: (s := [relay.status(i) for i in ids]) and
                              sorted(x["status"] for x in s) == ["deferred"] * 2 + ["sent"] * 3 and s,
                              what="two messages held back")
        held = [s for s in statuses if s["status"] == "deferred"]
        for s in held:
            assert "outbound limit of 3 deliveries per minute" in s["last_error"]
            assert s["attempts"] == []  # waiting is not an attempt
            assert 0 < s["next_attempt_at"] - time.time() <= 60 + 5  # a slot, spread by up to 5 s
        time.sleep(1.5)
        assert len(server.received) == 3
    finally:
        relay.configure("max_per_minute=0")
