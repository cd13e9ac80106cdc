"""The Queue page and a message's page over HTTP (the real app under Starlette's TestClient).

Messages arrive through the real API (POST /api/send with the relay's key);
no worker runs, so they stay queued until a test moves them on with a
worker's own claim and record_attempt. Every form is checked for what it
refuses: a missing or wrong CSRF token and a foreign Origin get 403 and
change nothing.
"""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from admin_helpers import AdminClient, admin_client, admin_settings, token_in
from relay_core.delivery.probe import UPSTREAM_SETTINGS
from relay_core.store import ClaimedMessage, LogEntry, Store


@pytest.fixture
def client(tmp_path: Path) -> Iterator[AdminClient]:
    with admin_client(admin_settings(tmp_path)) as client:
        client.state.store.set_options({"smtp_host": "127.0.0.1", "default_from": "noreply@example.org"})
        yield client


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminClient]:
    """One relay for tests that only need theirs to be unchanged."""
    with admin_client(admin_settings(tmp_path_factory.mktemp("queue"))) as client:
        client.state.store.set_options({"smtp_host": "127.0.0.1", "default_from": "noreply@example.org"})
        yield client


def send(client: AdminClient, **fields: Any) -> str:
    key = client.state.store.api_keys.reveal()
    payload = {"from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hello",
               "text": "the text part", **fields}
    response = client.client.post("/api/send", json=payload, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def attempt(store: Store, message_id: str, status: str, code: int = 451,
            reply: str = "4.3.0 try again later") -> None:
    """What a worker records after one attempt (deferred an hour, or failed)."""
    claimed = store.messages.claim(message_id, "w1", 300)
    assert isinstance(claimed, ClaimedMessage)
    updates = {r.position: (status, code, reply) for r in claimed.recipients}
    ok = store.messages.record_attempt(claimed, status, next_attempt_at=None if status != "deferred" else 4e9,
                                       last_error=f"DATA: {code} {reply}", recipient_updates=updates,
                                       entry=LogEntry("attempt", status, message_id=message_id, stage="DATA", code=code,
                                             detail=f"{code} {reply}", duration_ms=42))
    assert ok


def pending(client: AdminClient) -> int:
    """Wake-ups in the queue, once every earlier 202's is there (the writer answers a batch, then
    enqueues it: an empty job run after them means theirs are in)."""
    client.state.intake.submit(lambda conn: (None, [])).result(10)
    return int(client.state.queue.pending())


def status(client: AdminClient, message_id: str) -> str:
    record = client.state.store.messages.record(message_id)
    assert record is not None
    return record.status


def note(response: httpx.Response, client: AdminClient) -> str:
    """Follow an action's redirect and read the note it carried."""
    assert response.status_code == 303, response.text[:300]
    page = client.get(response.headers["location"])
    assert page.status_code == 200
    match = re.search(r'<p class="card-result (ok|bad)" role="status">([^<]*)</p>', page.text)
    assert match, "no note on the page"
    return html.unescape(match.group(2))


# -- the page ---------------------------------------------------------------------------------------
def test_dashboard_shows_counts_oldest_waiting_worker_chart_and_lists(client: AdminClient) -> None:
    store = client.state.store
    first = send(client, subject="First in line")
    deferred = send(client, subject="Server said later")
    attempt(store, deferred, "deferred")
    failed = send(client, subject="Refused for good")
    attempt(store, failed, "failed", code=550, reply="5.1.1 no such user")
    sent = send(client)
    attempt(store, sent, "sent", code=250, reply="2.0.0 OK")

    page = client.get("/")
    assert page.status_code == 200
    text = page.text
    counts = dict(re.findall(r'<li class="count-(\w+)"><span class="count">(\d+)</span>', text))
    assert counts == {"queued": "1", "sending": "0", "deferred": "1", "failed": "1", "sent": "1", "partial": "0"}
    assert "The oldest waiting message was received" in text
    assert "No worker has reported in the last minute" in text
    assert "Last delivery attempt" in text and "2.0.0 OK" in text
    # The chart: SVG with a title and description, a legend with totals, the numbers as a table.
    assert '<svg class="chart-svg"' in text and "<title id=\"chart-title\">" in text
    assert "Over the last 24 hours: 1 sent, 1 deferred, 1 failed." in text
    assert "Sent (1)" in text and "Deferred (1)" in text and "Failed (1)" in text
    assert text.count('class="bar bar-') == 3
    # The lists: waiting (oldest first) and failed, each row linking to its message.
    waiting = text[text.index('id="waiting"'):text.index('id="failed"')]
    assert waiting.index(first) < waiting.index(deferred) and failed not in waiting and sent not in waiting
    failed_part = text[text.index('id="failed"'):]
    assert f'href="/messages/{failed}"' in failed_part and "5.1.1 no such user" in failed_part
    assert 'data-refresh="5"' in text  # app.js keeps it current


def test_retry_now_one_and_in_bulk(client: AdminClient) -> None:
    store = client.state.store
    deferred = send(client)
    attempt(store, deferred, "deferred")
    failed = send(client, to=["ann@example.com", "bob@example.com"])
    attempt(store, failed, "failed", code=550, reply="5.7.1 refused")
    queued_before = pending(client)

    response = client.post("/queue/retry", {"only": deferred, "ids": failed}, token_from="/")
    assert note(response, client) == "Queued for delivery now: 1 message."
    assert status(client, deferred) == "queued" and status(client, failed) == "failed"

    response = client.post("/queue/retry", {"ids": [failed, deferred]}, token_from="/")  # type: ignore[dict-item]
    assert note(response, client) == (f"Queued for delivery now: 1 message. Left alone: {deferred} "
                                      "(it is already queued).")
    record = store.messages.record(failed)
    assert record is not None and record.status == "queued"
    assert [r.status for r in record.recipients] == ["pending", "pending"]
    assert pending(client) == queued_before + 2  # each retried message was enqueued
    [audit, first_audit] = store.log.audit_entries(action_prefix="message.retry")
    assert audit.detail == f"retried 1 message(s): {failed}" and audit.ip == "198.51.100.20"
    assert first_audit.actor == "admin"


def test_cancel_asks_first_then_cancels_waiting_messages_only(client: AdminClient) -> None:
    store = client.state.store
    queued, other = send(client), send(client)
    sending = send(client)
    store.messages.claim(sending, "w1", 300)

    asked = client.post("/queue/cancel", {"ids": queued}, token_from="/")
    assert asked.status_code == 200 and "Cancel this message?" in asked.text
    assert f'name="id_list" value="{queued}"' in asked.text and status(client, queued) == "queued"

    response = client.post("/queue/cancel", {"id_list": f"{queued},{sending}", "confirmed": "yes"},
                           token_from="/")
    assert note(response, client) == f"Cancelled 1 message. Left alone: {sending} (it is being delivered right now)."
    assert (status(client, queued), status(client, sending), status(client, other)) == ("cancelled", "sending",
                                                                                         "queued")
    assert [r.kind for r in store.log.of_message(queued)] == ["accepted", "cancelled"]


def test_nothing_selected_and_unknown_ids_are_explained(client: AdminClient) -> None:
    for path in ("/queue/retry", "/queue/cancel"):
        response = client.post(path, {"confirmed": "yes"}, token_from="/")
        assert note(response, client).startswith("Nothing was selected: tick the messages first")
    response = client.post("/queue/retry", {"ids": "no-such-id"}, token_from="/")
    assert note(response, client) == "Left alone: no-such-id (no such message)."
    assert client.state.store.log.audit_entries(action_prefix="message.") == []


def test_back_goes_only_to_local_pages(client: AdminClient) -> None:
    message_id = send(client)
    for back, expected in ((f"/messages/{message_id}", f"/messages/{message_id}?note="),
                           ("//evil.example/x", "/?note="), ("https://evil.example/", "/?note=")):
        response = client.post("/queue/retry", {"ids": message_id, "back": back}, token_from="/")
        assert response.headers["location"].startswith(expected)


def test_a_note_cannot_be_forged_or_replayed_by_another_session(client: AdminClient, tmp_path: Path) -> None:
    response = client.post("/queue/retry", {}, token_from="/")
    location = response.headers["location"]
    assert "Nothing was selected" in client.get(location).text
    assert "card-result" not in client.get("/?note=Your+session+expired").text
    with admin_client(admin_settings(tmp_path / "other")) as other:
        assert "Nothing was selected" not in other.get(location).text


def test_pause_and_resume_are_audited_and_the_page_says_so(client: AdminClient) -> None:
    store = client.state.store
    response = client.post("/queue/pause", {}, token_from="/")
    assert response.status_code == 303 and store.options().delivery_paused is True
    page = client.get(response.headers["location"]).text
    assert 'id="paused-banner"' in page and "Delivery is paused." in page and "Resume delivery" in page
    key = store.api_keys.reveal()
    health = client.client.get("/api/health", headers={"Authorization": f"Bearer {key}"}).json()
    assert health["ok"] is False and health["delivery_paused"] is True and "paused" in health["error"]
    waiting = send(client)  # still accepted while paused
    queued_before = pending(client)
    response = client.post("/queue/resume", {}, token_from="/")
    assert note(response, client) == "Delivery resumed; 1 waiting message woken."
    assert store.options().delivery_paused is False and status(client, waiting) == "queued"
    assert pending(client) == queued_before + 1
    assert "paused-banner" not in client.get("/").text
    actions = [(a.action, a.detail) for a in store.log.audit_entries(action_prefix="delivery.")]
    assert actions == [("delivery.resume", "resumed delivery"), ("delivery.pause", "paused delivery")]


def test_a_failing_mail_server_is_named_in_plain_words(client: AdminClient) -> None:
    store = client.state.store
    for _ in range(3):
        message_id = send(client)
        claimed = store.messages.claim(message_id, "w1", 300)
        assert isinstance(claimed, ClaimedMessage)
        detail = "AUTH: the mail server refuses the password (535 5.7.8 Authentication credentials invalid)"
        store.messages.record_attempt(claimed, "deferred", next_attempt_at=4e9, last_error=detail,
                                      recipient_updates={0: ("deferred", 535, "5.7.8 Authentication credentials invalid")},
                                      entry=LogEntry("attempt", "deferred", message_id=message_id, stage="AUTH", code=535,
                                            detail=detail))
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", client.get("/").text)).split())
    assert ("The mail server is failing: the last 3 delivery attempts failed at AUTH: the mail server refuses "
            "the password (535 5.7.8 Authentication credentials invalid)") in text


def page_text(client: AdminClient, path: str = "/") -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", client.get(path).text)).split())


def test_the_check_of_new_settings_shows_until_an_attempt_replaces_it(client: AdminClient) -> None:
    store = client.state.store
    changed = store.options_changed_at(UPSTREAM_SETTINGS)
    row = {"for": changed, "at": changed + 1, "state": "checking", "stage": None, "code": None, "detail": ""}
    store.conn().execute("INSERT INTO meta (name, value) VALUES ('upstream_probe', ?)", (json.dumps(row),))
    store.conn().commit()
    assert "Checking the new SMTP settings" in page_text(client)
    detail = "AUTH: the mail server 127.0.0.1 refuses the username or password (535 5.7.8 Authentication failed)"
    row.update(state="failed", stage="AUTH", code=535, detail=detail)
    store.conn().execute("UPDATE meta SET value = ? WHERE name = 'upstream_probe'", (json.dumps(row),))
    store.conn().commit()
    assert ("The mail server is failing: a check of the new SMTP settings failed at AUTH: the mail server "
            "127.0.0.1 refuses the username or password (535 5.7.8 Authentication failed)") in page_text(client)
    attempt(store, send(client), "sent", code=250, reply="2.0.0 OK")
    text = page_text(client)
    assert "is failing" not in text and "Last delivery attempt" in text


def test_a_message_being_sent_says_what_the_worker_is_doing(client: AdminClient) -> None:
    # An attempt is counted when it ends: for the seconds a worker connects, secures and signs in, the
    # message read "Sending" with 0 attempts and nothing else.
    store = client.state.store
    message_id = send(client)
    assert isinstance(store.messages.claim(message_id, "w1", 300), ClaimedMessage)
    said = "A worker is handing it to the mail server now (connecting, securing the connection, signing in"
    assert "1 message is being handed to the mail server now" in page_text(client)
    assert said in page_text(client, f"/messages/{message_id}")


def test_the_paused_queue_page_says_it_once_and_truly(client: AdminClient) -> None:
    send(client)
    client.state.store.workers.heartbeat("w1", 1, "host", time.time())
    response = client.post("/queue/pause", {}, token_from="/")
    assert response.status_code == 303
    page = client.get(response.headers["location"]).text
    assert page.count("Delivery is paused") == 1
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    assert "A worker is delivering" not in text and "as soon as a worker is free" not in text
    assert "when delivery is resumed" in text


FORMS = ["/queue/retry", "/queue/cancel", "/queue/pause", "/queue/resume", "/logs/clear", "/messages/{id}/body"]


@pytest.mark.parametrize("path", FORMS)
@pytest.mark.parametrize("how", ["no token", "wrong token", "foreign origin", "no origin"])
def test_forms_refuse_forged_posts_and_change_nothing(shared: AdminClient, path: str, how: str) -> None:
    client = shared
    store = client.state.store
    message_id = send(client)
    attempt(store, message_id, "deferred")
    before = (status(client, message_id), len(store.log.audit_entries(limit=100)), store.log.counters().total,
              store.options().delivery_paused)
    fields = {"ids": message_id, "confirmed": "yes"}
    kwargs: dict[str, Any] = {"token_from": "/"}
    if how == "no token":
        kwargs["token"] = None
    elif how == "wrong token":
        kwargs["token"] = "0" * 64
    elif how == "foreign origin":
        kwargs["origin"] = "https://evil.example"
    else:
        kwargs["origin"] = None
    response = client.post(path.replace("{id}", message_id), fields, **kwargs)
    assert response.status_code == 403
    assert "nothing changed" in response.text.lower() or "nothing" in response.text.lower()
    assert (status(client, message_id), len(store.log.audit_entries(limit=100)), store.log.counters().total,
            store.options().delivery_paused) == before


# -- a message's page ---------------------------------------------------------------------------------
def test_message_page_shows_envelope_headers_attachments_recipients_and_timeline(client: AdminClient) -> None:
    store = client.state.store
    attachment = {"filename": "minutes.pdf", "mime_type": "application/pdf", "content_b64": "JVBERi0xLjQK" * 100}
    message_id = send(client, to=["ann@example.com", "bob@example.com"], subject="Minutes <draft>",
                      cc=["carol@example.com"], bcc=["dave@example.com"],
                      reply_to="help@example.org", reply_to_name="Help desk", attachments=[attachment],
                      html="<p>secret <b>words</b></p>", text="the password is hunter2")
    attempt(store, message_id, "deferred", reply="4.2.2 mailbox full")

    page = client.get(f"/messages/{message_id}")
    assert page.status_code == 200
    text = page.text
    assert "noreply@example.org" in text and "ann@example.com" in text and "bob@example.com" in text
    assert "Minutes &lt;draft&gt;" in text
    assert f"&lt;{message_id}@example.org&gt;" in text
    assert "Help desk &lt;help@example.org&gt;" in text
    headers = dict(re.findall(r"<dt>([\w-]+)</dt><dd[^>]*>([^<]*)", text[text.index('id="headers"'):]))
    assert headers["To"] == "ann@example.com, bob@example.com" and headers["Cc"] == "carol@example.com"
    assert headers["Bcc"].strip() == "—" and "1 Bcc recipient: in the envelope only" in text
    envelope = text[text.index('id="envelope"'):text.index('id="headers"')]
    assert "dave@example.com" in envelope and "carol@example.com" in envelope
    kinds = re.findall(r'<td data-label="Address" class="mono">([^<]*)</td><td data-label="Kind">([^<]*)</td>', text)
    assert kinds == [("ann@example.com", "To"), ("bob@example.com", "To"), ("carol@example.com", "Cc"),
                     ("dave@example.com", "Bcc")]
    assert "minutes.pdf" in text and "application/pdf, 900 bytes" in text
    assert "4.2.2 mailbox full" in text and "42 ms" in text and "DATA" in text
    assert "hunter2" not in text and "secret" not in text  # the body is not shown by default
    assert "Show the body" in text and "Retry now" in text and "Cancel" in text


def test_showing_the_body_is_a_recorded_post_and_html_is_never_rendered(client: AdminClient) -> None:
    store = client.state.store
    message_id = send(client, html='<p onclick="x()">hi</p><script>alert(1)</script>', text="pass: <hunter2>")
    response = client.post(f"/messages/{message_id}/body", {}, token_from=f"/messages/{message_id}")
    assert response.status_code == 303
    location = response.headers["location"]
    assert location == f"/messages/{message_id}#body"  # no token in the address (history, proxies' logs)
    token = client.client.cookies.get("relay_show")
    assert token and f"Path=/messages/{message_id}" in response.headers["set-cookie"]
    page = client.get(location)
    assert "pass: &lt;hunter2&gt;" in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
    assert "pass: &lt;hunter2&gt;" not in client.get(location).text  # shown once: a reload hides it
    [audit] = store.log.audit_entries(action_prefix="message.body_viewed")
    assert (audit.actor, audit.ip, audit.detail) == ("admin", "198.51.100.20", f"body viewed: message {message_id}")
    # The token shows this message's body only, to this session only.
    other_id = send(client, text="another secret")
    client.client.cookies.set("relay_show", token, domain="testserver.local", path=f"/messages/{other_id}")
    assert "another secret" not in client.get(f"/messages/{other_id}").text
    client.client.cookies.set("relay_show", token, domain="testserver.local", path=f"/messages/{message_id}")
    client.replay_session_cookie("forged")
    assert client.get(location).status_code == 303  # signed out: to the sign-in page


def test_a_pruned_body_says_so(client: AdminClient) -> None:
    store = client.state.store
    message_id = send(client, attachments=[{"filename": "a.txt", "content_b64": "aGk="}])
    attempt(store, message_id, "sent", code=250, reply="2.0.0 OK")
    store.workers.prune(4e9, sent_body_seconds=1, failed_body_seconds=1, log_seconds=1e10, log_max_rows=10**9,
                        idempotency_seconds=1)
    page = client.get(f"/messages/{message_id}")
    assert "deleted after the retention period" in page.text
    assert "1 attachment(s)" in page.text and "Show the body" not in page.text


def test_unknown_message_is_404(client: AdminClient) -> None:
    response = client.get("/messages/does-not-exist")
    assert response.status_code == 404 and "No message with id" in response.text
    response = client.post("/messages/does-not-exist/body", {}, token_from="/")
    assert response.status_code == 404
    assert client.state.store.log.audit_entries(action_prefix="message.") == []


def test_token_in_pages() -> None:
    assert token_in('<input type="hidden" name="csrf_token" value="abc">') == "abc"
