"""What the real portal sends and reads, through the real app.

The app runs with its lifespan (real store, real SqliteHuey queue in
tmp_path) under Starlette's TestClient; the rendered message is checked by
claiming it from the store and rendering it as the worker would.
"""

from __future__ import annotations

import base64
import email
import time
from email import policy
from email.message import EmailMessage
from typing import Any, Iterator

import pytest
from starlette.testclient import TestClient

from relay_core.config import Settings
from relay_core.delivery.attempt import render
from relay_core.store import Store
from api_helpers import error_of, payload, queued, running_client


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with running_client(settings, default_from="relay@example.org", default_from_name="The Relay") as client:
        yield client


def store_of(client: TestClient) -> Store:
    return client.app.state.relay.store


def rendered(client: TestClient, message_id: str) -> EmailMessage:
    claimed = store_of(client).messages.claim(message_id, "test", 60)
    assert claimed is not None and not isinstance(claimed, float)
    return email.message_from_bytes(bytes(render(claimed)), policy=policy.default)  # type: ignore[return-value]


def accepted(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/api/send", json=body)
    assert response.status_code == 202, response.text
    return response.json()


# -- /api/health: would mail flow now? --------------------------------------------------------------------
def test_health_is_not_ok_without_a_worker_and_says_why(client: TestClient) -> None:
    health = client.get("/api/health").json()
    assert health["ok"] is False and health["configured"] is True and health["worker_alive"] is False
    assert "No delivery worker is running" in health["error"]
    store_of(client).workers.heartbeat("w1", 1, "host", time.time())
    health = client.get("/api/health").json()
    assert health["ok"] is True and health["error"] is None and health["worker_alive"] is True


def test_health_is_not_ok_while_paused_and_healthz_is_unchanged(client: TestClient) -> None:
    store = store_of(client)
    store.workers.heartbeat("w1", 1, "host", time.time())
    store.set_options({"delivery_paused": True})
    health = client.get("/api/health").json()
    assert health["ok"] is False and health["delivery_paused"] is True
    assert "Delivery is paused" in health["error"]
    # /healthz stays a liveness probe: same two fields, whatever the worker or the pause.
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"ok": True, "configured": True}
    # Paused, the API still accepts and queues.
    assert accepted(client, payload())["status"] == "queued"
    assert queued(client) == (1, 1)


def test_health_not_configured_sentence(settings: Settings) -> None:
    with running_client(settings, smtp_host="") as client:
        store_of(client).workers.heartbeat("w1", 1, "host", time.time())
        health = client.get("/api/health").json()
        assert (health["ok"], health["configured"]) == (False, False)
        assert health["error"].startswith("SMTP delivery is not configured")


# -- the sender ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_from_name_with_a_from_email_gives_the_bare_address(client: TestClient, name: str) -> None:
    answer = accepted(client, payload(from_name=name))
    assert rendered(client, answer["id"])["From"] == "noreply@example.org"


@pytest.mark.parametrize("address", ["", "   "])
def test_an_empty_from_email_uses_the_default_from(client: TestClient, address: str) -> None:
    answer = accepted(client, payload(from_email=address, from_name=""))
    assert rendered(client, answer["id"])["From"] == "The Relay <relay@example.org>"


# -- attachments and bodies ------------------------------------------------------------------------------------
def test_a_mime_type_with_parameters_is_accepted_and_kept(client: TestClient) -> None:
    csv = "name,city\nÅsa,Malmö\n".encode()
    answer = accepted(client, payload(attachments=[
        {"filename": "a.txt", "mime_type": "text/plain; charset=utf-8", "content_b64": "aGVsbG8="},
        {"filename": "r.csv", "mime_type": "text/csv", "content_b64": base64.b64encode(csv).decode()}]))
    first, second = rendered(client, answer["id"]).iter_attachments()
    assert (first.get_content_type(), first.get_content_charset()) == ("text/plain", "utf-8")
    assert (second.get_content_type(), second.get_content_charset()) == ("text/csv", "utf-8")
    assert second.get_payload(decode=True) == csv


def test_a_malformed_mime_type_parameter_is_400_and_nothing_queued(client: TestClient) -> None:
    bad = {"filename": "a.txt", "mime_type": "text/plain; charset", "content_b64": "aGVsbG8="}
    assert "mime_type" in error_of(client.post("/api/send", json=payload(attachments=[bad])), 400)
    assert queued(client) == (0, 0)


def test_an_empty_text_body_with_a_subject_is_accepted(client: TestClient) -> None:
    answer = accepted(client, payload(text="", html=None))
    body = rendered(client, answer["id"]).get_body(("plain",))
    assert body is not None and body.get_content().strip() == ""
    assert "message is empty" in error_of(client.post("/api/send", json=payload(text="", subject="")), 400)


# -- recipients ---------------------------------------------------------------------------------------------------
def test_cc_and_bcc_are_delivered_and_bcc_stays_out_of_the_headers(client: TestClient) -> None:
    answer = accepted(client, payload(to=["a@example.com"], cc="c@example.com", bcc=["b@example.com"]))
    assert "ignored" not in answer
    status = client.get(f"/api/messages/{answer['id']}").json()
    assert [(r["address"], r["kind"]) for r in status["recipients"]] == [
        ("a@example.com", "to"), ("c@example.com", "cc"), ("b@example.com", "bcc")]
    msg = rendered(client, answer["id"])
    assert msg["To"] == "a@example.com" and msg["Cc"] == "c@example.com" and msg["Bcc"] is None
    assert b"b@example.com" not in msg.as_bytes()


def test_cc_and_bcc_count_toward_the_cap_and_are_validated(client: TestClient) -> None:
    to = [f"t{i}@example.com" for i in range(60)]
    bcc = [f"b{i}@example.com" for i in range(41)]
    assert "101 recipients" in error_of(client.post("/api/send", json=payload(to=to, bcc=bcc)), 400)
    assert "'cc'" in error_of(client.post("/api/send", json=payload(cc=["nope"])), 400)
    assert queued(client) == (0, 0)


def test_unknown_fields_are_named_in_the_answer_and_the_log(client: TestClient) -> None:
    answer = accepted(client, payload(reply_too="help@example.org", priority="high"))
    assert answer["ignored"] == ["priority", "reply_too"]
    again = client.post("/api/send", json=payload(reply_too="x"), headers={"Idempotency-Key": "k"})
    assert client.post("/api/send", json=payload(reply_too="x"), headers={"Idempotency-Key": "k"}).json() == \
        again.json() and again.json()["ignored"] == ["reply_too"]
    row = store_of(client).conn().execute(
        "SELECT detail FROM log WHERE message_id = ?", (answer["id"],)).fetchone()
    assert "ignored unknown field(s): priority, reply_too" in row["detail"]
