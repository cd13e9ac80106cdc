"""The HTTP contract of POST /api/send and friends, every error code included.

These run the real app (real store and SqliteHuey queue in tmp_path) through
Starlette's TestClient; nothing is mocked. "Nothing queued" is checked in
both the store and the queue.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import email
from email import policy
from typing import Any, Iterator

import pytest
from starlette.testclient import TestClient

from relay_core.config import Settings
from relay_core.delivery.attempt import render
from api_helpers import error_of, flush_refusals, payload, queued, running_client, settings_with


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with running_client(settings) as client:
        yield client


def test_accepts_and_queues(client: TestClient) -> None:
    response = client.post("/api/send", json=payload())
    assert response.status_code == 202
    body = response.json()
    assert body == {"ok": True, "id": body["id"], "status": "queued"}
    assert queued(client) == (1, 1)
    status = client.get(f"/api/messages/{body['id']}").json()
    assert status["status"] == "queued"
    assert status["recipients"] == [{"address": "a@example.com", "kind": "to", "status": "pending", "code": None,
                                     "reply": None}]
    assert status["attempts"] == [] and status["last_error"] is None
    assert {"ok", "id", "status", "created_at", "next_attempt_at", "last_error", "attempts",
            "recipients"} <= set(status)


def test_empty_post_tells_a_good_key_from_a_bad_one(client: TestClient) -> None:
    assert "empty" in error_of(client.post("/api/send", content=b""), 400)
    assert "API key" in error_of(client.post("/api/send", content=b"", headers={"Authorization": "Bearer nope"}), 401)
    assert "API key" in error_of(client.post("/api/send", content=b"", headers={"Authorization": ""}), 401)
    assert "API key" in error_of(client.post("/api/send", json=payload(), headers={"Authorization": "Basic abc"}), 401)
    assert queued(client) == (0, 0)


def test_bad_key_is_refused_before_the_body_is_read(client: TestClient) -> None:
    # A body far over the cap, but the key is wrong: 401, not 413.
    huge = b"x" * (40 * 1024 * 1024)
    error_of(client.post("/api/send", content=huge, headers={"Authorization": "Bearer wrong"}), 401)


def test_unauthorized_attempts_are_logged_with_source_ip(client: TestClient) -> None:
    client.post("/api/send", json=payload(), headers={"Authorization": "Bearer stolen"})
    client.post("/api/send", json=payload(), headers={"Authorization": "Bearer stolen"})
    client.post("/api/send", json=payload(to=[]))
    flush_refusals(client)
    rows = client.app.state.relay.store.conn().execute(
        "SELECT event, status, code, source_ip, detail FROM log ORDER BY id").fetchall()
    assert [tuple(r)[:4] for r in rows] == [("rejected", "rejected", 400, "203.0.113.7"),
                                           ("unauthorized", "rejected", 401, "203.0.113.7")]
    assert rows[1]["detail"].startswith("2 requests with a wrong API key from 203.0.113.7 in the minute from ")


@pytest.mark.parametrize("body,fragment", [
    (b"[1, 2]", "JSON object"),
    (b'"text"', "JSON object"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "JSON"),
])
def test_not_a_json_object(client: TestClient, body: bytes, fragment: str) -> None:
    assert fragment in error_of(client.post("/api/send", content=body), 400)
    assert queued(client) == (0, 0)


@pytest.mark.parametrize("changes,fragment", [
    ({"from_email": "not-an-address"}, "from_email"),
    ({"to": None}, "'to' is required"),
    ({"to": []}, "no recipient"),
    ({"to": ""}, "no recipient"),
    ({"to": ["ok@example.com", "broken"]}, "not a valid email"),
    ({"to": ["a@example.com, b@example.com"]}, "not a valid email"),
    ({"to": [3]}, "must be a string"),
    ({"to": 5}, "list of addresses"),
    ({"text": "", "html": None, "subject": ""}, "message is empty"),
    ({"reply_to": "nope"}, "reply_to"),
    ({"attachments": {"a": 1}}, "must be a list"),
    ({"attachments": [{"filename": "a.txt", "content_b64": "%%%"}]}, "base64"),
    ({"attachments": [{"filename": "a.txt", "content_b64": "YWJj!"}]}, "base64"),
    ({"attachments": [{"filename": "a.txt"}]}, "content_b64"),
    ({"attachments": [{"filename": "a.txt", "mime_type": "pdf", "content_b64": "YWJj"}]}, "MIME type"),
])
def test_invalid_fields(client: TestClient, changes: dict[str, Any], fragment: str) -> None:
    assert fragment in error_of(client.post("/api/send", json=payload(**changes)), 400)
    assert queued(client) == (0, 0)


def test_recipient_limit(client: TestClient) -> None:
    hundred = [f"user{i}@example.com" for i in range(100)]
    assert client.post("/api/send", json=payload(to=hundred)).status_code == 202
    error = error_of(client.post("/api/send", json=payload(to=hundred + ["one-more@example.com"])), 400)
    assert "101 recipients" in error
    assert queued(client) == (1, 1)


def test_comma_and_semicolon_string_recipients(client: TestClient) -> None:
    response = client.post("/api/send", json=payload(to="a@example.com, b@example.com;c@example.com"))
    status = client.get(f"/api/messages/{response.json()['id']}").json()
    assert [r["address"] for r in status["recipients"]] == ["a@example.com", "b@example.com", "c@example.com"]


@pytest.mark.parametrize("field,value", [
    ("subject", "Hi\r\nBcc: victim@example.com"),
    ("subject", "Hi\nX-Injected: 1"),
    ("from_name", "Portal\rBcc: x@example.com"),
    ("from_email", "noreply@example.org\r\nBcc: x@example.com"),
    ("reply_to", "x@example.org\nBcc: y@example.com"),
    ("reply_to_name", "Help\r\nBcc: y@example.com"),
    ("to", ["a@example.com\r\nBcc: y@example.com"]),
    ("to", "a@example.com\nBcc: y@example.com"),
    ("subject", "Hi\x0bBcc: x@example.com"),  # vertical tab: the email package splits lines on it
    ("subject", "Hi\x0cBcc : x@example.com"),
    ("from_name", "Portal\u2028Bcc: x@example.com"),
    ("reply_to_name", "Help\x85Bcc: x@example.com"),
    ("subject", "bell\x07"),
])
def test_header_injection_is_refused_and_nothing_queued(client: TestClient, field: str, value: Any) -> None:
    error = error_of(client.post("/api/send", json=payload(**{field: value})), 400)
    assert "line break" in error or "not a valid email" in error or "control characters" in error
    assert queued(client) == (0, 0)


def test_non_ascii_addresses_are_refused(client: TestClient) -> None:
    # No SMTPUTF8: a non-ASCII address would fail at RCPT after the 202.
    assert "not a valid email" in error_of(client.post("/api/send", json=payload(to=["ü@example.com"])), 400)
    assert "from_email" in error_of(client.post("/api/send", json=payload(from_email="ü@example.org")), 400)
    assert queued(client) == (0, 0)


def test_attachment_filename_with_line_break_is_refused(client: TestClient) -> None:
    att = {"filename": "a.txt\r\nX-Evil: 1", "mime_type": "text/plain", "content_b64": "YWJj"}
    assert "line break" in error_of(client.post("/api/send", json=payload(attachments=[att])), 400)


def test_default_from_fills_in_and_missing_both_is_400(settings: Settings) -> None:
    with running_client(settings) as client:
        error = error_of(client.post("/api/send", json=payload(from_email=None, from_name=None)), 400)
        assert "Default From" in error
        store = client.app.state.relay.store
        store.set_options({"default_from": "relay@example.org", "default_from_name": "The Relay"})
        response = client.post("/api/send", json=payload(from_email=None, from_name=None))
        assert response.status_code == 202
        claimed = store.messages.claim(response.json()["id"], "test", 60)
        assert claimed is not None
        msg = email.message_from_bytes(bytes(render(claimed)), policy=policy.default)
        assert msg["From"] == "The Relay <relay@example.org>"
        assert claimed.envelope_from == "relay@example.org"


def test_envelope_from_setting(settings: Settings) -> None:
    with running_client(settings, envelope_from="bounces@example.org") as client:
        response = client.post("/api/send", json=payload())
        claimed = client.app.state.relay.store.messages.claim(response.json()["id"], "test", 60)
        assert claimed is not None and claimed.envelope_from == "bounces@example.org"


@pytest.mark.parametrize("sender,allowed", [
    ("noreply@example.org", True),
    ("NoReply@Example.ORG", True),
    ("other@example.org", True),
    ("x@mail.example.org", False),
    ("x@evilexample.org", False),
    ("boss@partner.net", True),
    ("someone@partner.net", False),
])
def test_allowed_from(settings: Settings, sender: str, allowed: bool) -> None:
    with running_client(settings, allowed_from="Example.org, boss@partner.net") as client:
        response = client.post("/api/send", json=payload(from_email=sender))
        if allowed:
            assert response.status_code == 202, response.text
        else:
            assert "Allowed From" in error_of(response, 403)
            assert queued(client) == (0, 0)


def test_attachment_limit_is_exact_in_decoded_bytes(settings: Settings) -> None:
    limit = int(0.01 * 1024 * 1024)
    with running_client(settings, max_attach_mb="0.01") as client:  # 10485 bytes
        half = limit // 2
        exact = [{"filename": "a.bin", "content_b64": base64.b64encode(b"a" * half).decode()},
                 {"filename": "b.bin", "content_b64": base64.b64encode(b"b" * (limit - half)).decode()}]
        assert client.post("/api/send", json=payload(attachments=exact)).status_code == 202
        over = [exact[0], {"filename": "b.bin", "content_b64": base64.b64encode(b"b" * (limit - half + 1)).decode()}]
        error = error_of(client.post("/api/send", json=payload(attachments=over)), 413)
        assert str(limit + 1) in error
        assert queued(client) == (1, 1)


def test_attachment_count_is_capped_at_fifty(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    files = [{"filename": f"f{i}.txt", "content_b64": "eA=="} for i in range(51)]
    assert client.post("/api/send", json=payload(attachments=files[:50])).status_code == 202
    error = error_of(client.post("/api/send", json=payload(attachments=files)), 413)
    assert error == "The message has 51 attachments; the relay accepts at most 50 per message."
    assert queued(client) == (1, 1)
    flush_refusals(client)
    rows = client.app.state.relay.store.conn().execute(
        "SELECT code, detail FROM log WHERE event = 'rejected'").fetchall()
    assert [(r["code"], r["detail"]) for r in rows] == [(413, error)]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40]


def test_body_over_the_cap_is_413_with_or_without_content_length(settings: Settings) -> None:
    with running_client(settings, max_attach_mb="0.01") as client:
        cap = client.app.state.relay.store.options().max_body_bytes
        error_of(client.post("/api/send", content=b"{" + b" " * cap + b"}"), 413)

        def chunks() -> Iterator[bytes]:
            for _ in range(cap // 65536 + 2):
                yield b" " * 65536
        error_of(client.post("/api/send", content=chunks()), 413)
        assert queued(client) == (0, 0)


def test_body_over_the_cap_names_the_admins_limit_in_mb(settings: Settings) -> None:
    # The admin set "1" MB; a number of bytes they never set would not tell them what to change.
    with running_client(settings, max_attach_mb="1") as client:
        cap = client.app.state.relay.store.options().max_body_bytes
        error = error_of(client.post("/api/send", content=b"{" + b" " * cap + b"}"), 413)
        assert "1 MB" in error and "Max attachment size" in error and str(cap) not in error


def test_refused_rows_keep_sender_and_recipients_when_the_json_was_read(settings: Settings) -> None:
    with running_client(settings, allowed_from="example.org", max_attach_mb="0.001") as client:
        error_of(client.post("/api/send", json=payload(from_email="x@other.example", to=["a@example.com"],
                                                       cc=["c@example.com"])), 403)
        big = [{"filename": "a.bin", "content_b64": base64.b64encode(b"a" * 2000).decode()}]
        error_of(client.post("/api/send", json=payload(to="b@example.com", attachments=big)), 413)
        error_of(client.post("/api/send", content=b"{not json"), 400)
        rows = client.app.state.relay.store.conn().execute(
            "SELECT code, sender, recipients FROM log ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [(403, "x@other.example", "a@example.com, c@example.com"),
                                        (413, "noreply@example.org", "b@example.com"),
                                        (400, "", "")]


def test_not_configured_is_503(settings: Settings) -> None:
    with running_client(settings, smtp_host="") as client:
        assert "not configured" in error_of(client.post("/api/send", json=payload()), 503)
        assert queued(client) == (0, 0)
        assert client.get("/healthz").json() == {"ok": True, "configured": False}


def test_rate_limit_answers_429_with_retry_after(tmp_path: Any) -> None:
    settings = settings_with(tmp_path, RELAY_SEND_PER_HOUR="2")
    with running_client(settings) as client:
        assert client.post("/api/send", json=payload()).status_code == 202
        assert client.post("/api/send", json=payload()).status_code == 202
        response = client.post("/api/send", json=payload())
        assert "limit of 2 messages per hour" in error_of(response, 429)
        # The two sends leave the window an hour after the minute they were counted in.
        assert 3540 <= int(response.headers["Retry-After"]) <= 3600
        assert response.headers["RateLimit-Limit"] == "2" and response.headers["RateLimit-Remaining"] == "0"
        assert response.headers["RateLimit-Reset"] == response.headers["Retry-After"]
        assert queued(client) == (2, 2)


def test_idempotent_repeat_is_answered_even_when_limited_or_unconfigured(tmp_path: Any) -> None:
    settings = settings_with(tmp_path, RELAY_SEND_PER_HOUR="1")
    with running_client(settings) as client:
        first = client.post("/api/send", json=payload(), headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202
        again = client.post("/api/send", json=payload(), headers={"Idempotency-Key": "k1"})
        assert (again.status_code, again.json()) == (202, first.json())  # not 429
        client.app.state.relay.store.set_options({"smtp_host": ""})
        again = client.post("/api/send", json=payload(), headers={"Idempotency-Key": "k1"})
        assert (again.status_code, again.json()) == (202, first.json())  # not 503
        assert queued(client) == (1, 1)


def test_idempotency_key_replays_the_first_answer(client: TestClient) -> None:
    first = client.post("/api/send", json=payload(), headers={"Idempotency-Key": "reset-42"})
    again = client.post("/api/send", json=payload(), headers={"Idempotency-Key": "reset-42"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert queued(client) == (1, 1)
    other = client.post("/api/send", json=payload(subject="Different"), headers={"Idempotency-Key": "reset-42"})
    assert "different request body" in error_of(other, 409)
    assert client.post("/api/send", json=payload(), headers={"Idempotency-Key": "reset-43"}).status_code == 202
    assert queued(client) == (2, 2)


def test_every_api_answer_is_json(client: TestClient) -> None:
    assert "not allowed" in error_of(client.get("/api/send"), 405)
    assert "not allowed" in error_of(client.put("/api/send", json={}), 405)
    error_of(client.get("/api/nothing-here"), 404)
    assert "No message" in error_of(client.get("/api/messages/0123abc"), 404)
    error_of(client.get("/api/messages/0123abc", headers={"Authorization": "Bearer x"}), 401)


def test_a_key_reads_only_the_messages_it_sent(client: TestClient) -> None:
    # Another key's message answers as an unknown id does: its Bcc recipients are not that key's business.
    store = client.app.state.relay.store
    _, other_key = store.api_keys.add("newsletter")
    mine = client.post("/api/send", json=payload(bcc=["hidden@example.com"])).json()["id"]
    theirs = client.post("/api/send", json=payload(), headers={"Authorization": f"Bearer {other_key}"}).json()["id"]
    assert client.get(f"/api/messages/{mine}").status_code == 200
    unknown = error_of(client.get("/api/messages/0123abc"), 404)
    assert error_of(client.get(f"/api/messages/{theirs}"), 404) == unknown.replace("0123abc", theirs)
    as_other = {"Authorization": f"Bearer {other_key}"}
    assert client.get(f"/api/messages/{theirs}", headers=as_other).status_code == 200
    assert client.get(f"/api/messages/{mine}", headers=as_other).status_code == 404
    # The portal's key replaced (`api-key new`): the portal still follows what it sent before.
    client.headers["Authorization"] = f"Bearer {store.api_keys.new_primary()}"
    assert client.get(f"/api/messages/{mine}").status_code == 200
    assert client.get(f"/api/messages/{theirs}").status_code == 404


def test_health_endpoints(client: TestClient) -> None:
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"ok": True, "configured": True}
    error_of(client.get("/api/health", headers={"Authorization": "Bearer wrong"}), 401)
    health = client.get("/api/health").json()
    assert health["ok"] is False and health["configured"] is True  # no worker in this test
    assert health["smtp_configured"] is True and health["worker_alive"] is False
    assert "127.0.0.1" not in client.get("/healthz").text


def test_settings_changes_reach_the_running_app(client: TestClient) -> None:
    store = client.app.state.relay.store
    assert client.post("/api/send", json=payload(from_email="x@other.org")).status_code == 202
    # Another process (the CLI) changes the allowlist; no restart.
    from relay_core.store import Store
    other = Store(store.path, store.keys)
    other.set_options({"allowed_from": "example.org"})
    other.close()
    error_of(client.post("/api/send", json=payload(from_email="x@other.org")), 403)


def test_new_api_key_stops_the_old_one_at_once(client: TestClient) -> None:
    store = client.app.state.relay.store
    old = store.api_keys.reveal()
    new = store.api_keys.new_primary()
    error_of(client.post("/api/send", json=payload(), headers={"Authorization": f"Bearer {old}"}), 401)
    assert client.post("/api/send", json=payload(), headers={"Authorization": f"Bearer {new}"}).status_code == 202


@pytest.mark.parametrize("raised, status, words", [
    (RuntimeError("a bug"), 500, "internal error"),
    (sqlite3.OperationalError("disk I/O error"), 503, "store is unavailable"),
])
def test_an_error_inside_the_send_path_is_answered_by_the_error_middleware(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, raised: Exception, status: int, words: str) -> None:
    """POST /api/send's unexpected errors get the app's handlers (the contract's JSON, the security
    headers), and a bug still reaches the server, as from any route."""
    from relay_web import api

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(api, "parse_payload", broken)
    with running_client(settings, raise_server_exceptions=False) as client:
        response = client.post("/api/send", json=payload())
        assert response.status_code == status
        assert response.json()["ok"] is False and words in response.json()["error"]
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
        assert response.headers["cache-control"] == "no-store"
        assert queued(client) == (0, 0)
    with running_client(settings) as client:
        if status == 500:
            with pytest.raises(RuntimeError, match="a bug"):  # raised on, as ServerErrorMiddleware does
                client.post("/api/send", json=payload())
        else:
            assert client.post("/api/send", json=payload()).status_code == 503  # handled: not raised on


def test_a_store_that_could_not_write_is_answered_at_once_without_asking_it_again(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the writer says the store is down, the settings are not read again before answering (as
    they are before a refusal): that read would wait on the same store (PostgreSQL down: the pool's
    whole timeout again) and then answer less precisely."""
    from relay_core.errors import StoreUnavailable
    from relay_core.intake.group_commit import STORE_DOWN
    from relay_web import api

    async def store_down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable(STORE_DOWN)

    monkeypatch.setattr(api._Accept, "run", store_down)
    with running_client(settings) as client:
        store = client.app.state.relay.store
        reads = []
        monkeypatch.setattr(store, "revision", lambda *a: reads.append(a) or 0)
        response = client.post("/api/send", json=payload())
        assert response.status_code == 503 and response.json()["error"] == STORE_DOWN
        assert reads == []


def test_a_handler_failing_on_a_refused_send_is_answered_as_an_internal_error(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ServerErrorMiddleware does for any route: the handler's own error gets the catch-all's 500."""
    from relay_web import api

    async def broken(request: Any, exc: Any) -> None:
        raise RuntimeError("the rejection log broke")

    monkeypatch.setattr(api, "log_rejection", broken)
    with running_client(settings, raise_server_exceptions=False) as client:
        response = client.post("/api/send", json={"to": "not an address"})
        assert response.status_code == 500 and "internal error" in response.json()["error"]
        assert response.headers["x-content-type-options"] == "nosniff"


# -- hostile bodies: a clear 400 and one line, never a traceback ---------------------------------------------------
HOSTILE = [
    pytest.param(b'{"to": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper", id="deep-nesting"),
    pytest.param(b'{"to": ["a@example.com"], "text": "x", "n": ' + b"9" * 5000 + b"}", "number", id="long-number"),
    # ~25-fold once decoded: 34 MB of this took the web process to 855 MiB
    pytest.param(b'{"to": ["a@example.com"], "text": "x", "attachments": [' + b"{}," * 600_000 + b"{}]}",
                 "JSON values", id="fragmented"),
]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("body,words", HOSTILE)
def test_hostile_json_is_a_400_without_a_traceback(settings: Settings, caplog: pytest.LogCaptureFixture,
                                                    body: bytes, words: str) -> None:
    with running_client(settings, raise_server_exceptions=False) as client:
        assert words in error_of(client.post("/api/send", content=body), 400)
        rows = client.app.state.relay.store.conn().execute("SELECT code FROM log").fetchall()
    assert [tuple(r) for r in rows] == [(400,)] and tracebacks(caplog) == []


def test_a_body_of_many_json_values_passes_just_under_the_bound_and_is_400_just_over(client: TestClient) -> None:
    from relay_web.api import MAX_JSON_VALUES
    base = json.dumps(payload(text=""))
    structure = base.count(",") + base.count("{") + base.count("[")
    under = json.dumps(payload(text="," * (MAX_JSON_VALUES - structure)))
    over = json.dumps(payload(text="," * (MAX_JSON_VALUES - structure + 1)))
    assert client.post("/api/send", content=under.encode()).status_code == 202
    assert "JSON values" in error_of(client.post("/api/send", content=over.encode()), 400)


@pytest.mark.parametrize("field,value", [
    ("text", "a\ud800b"), ("html", "<p>\udfff</p>"), ("from_name", "P\ud800"), ("subject", "\udc00"),
    ("attachments", [{"filename": "a\ud800.txt", "content_b64": "aGk="}]),
    ("attachments", [{"filename": "a.txt", "mime_type": "text/plain; name=\ud800", "content_b64": "aGk="}]),
    ("x\ud800", "a field name"),
])
def test_lone_surrogates_are_refused_at_intake(client: TestClient, field: str, value: Any) -> None:
    # Before: accepted, then failed "cannot be rendered" in the worker (or a 503 for a name or field name).
    body = json.dumps(payload(**{field: value})).encode()  # ensure_ascii: "\ud800" escapes, as a client sends them
    error = error_of(client.post("/api/send", content=body), 400)
    assert "lone surrogate" in error
    assert queued(client) == (0, 0)
    # A real pair is one character, and welcome.
    assert client.post("/api/send", content=json.dumps(payload(text="\U0001F600")).encode()).status_code == 202


def test_a_client_hanging_up_mid_body_writes_one_line(settings: Settings,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.web")
    with running_client(settings, raise_server_exceptions=False) as client:
        parts = [{"type": "http.request", "body": b'{"to": ["a@example.com"], "te', "more_body": True},
                 {"type": "http.disconnect"}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return parts.pop(0) if parts else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/api/send", "raw_path": b"/api/send", "query_string": b"",
                 "root_path": "", "client": ("203.0.113.7", 50000), "server": ("127.0.0.1", 8000),
                 "headers": [(b"host", b"relay.test"), (b"content-length", b"1000"),
                             (b"authorization", client.headers["Authorization"].encode()),
                             (b"content-type", b"application/json")], "app": client.app}
        client.portal.call(client.app, scope, receive, send)  # type: ignore[union-attr]
        assert queued(client) == (0, 0)
        rows = client.app.state.relay.store.conn().execute("SELECT code, detail FROM log").fetchall()
    assert tracebacks(caplog) == []  # once two ERROR tracebacks
    assert [(r[0], r[1]) for r in rows] == [(400, "The client closed the connection before its request body "
                                                  "arrived.")]
