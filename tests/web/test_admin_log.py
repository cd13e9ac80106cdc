"""The Transaction Log page over HTTP: every kind of event, counters, filters, search, keyset pages,
the streamed CSV export (formula cells defused), Clear log behind its confirmation, and bad filters."""

from __future__ import annotations

import csv
import html
import io
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from admin_helpers import AdminClient, admin_client, admin_settings, field_error
from relay_core.store import ClaimedMessage, LogEntry


@pytest.fixture
def client(tmp_path: Path) -> Iterator[AdminClient]:
    with admin_client(admin_settings(tmp_path, RELAY_SEND_PER_HOUR="3")) as client:
        client.state.store.set_options({"smtp_host": "127.0.0.1", "default_from": "noreply@example.org"})
        yield client


def api_send(client: AdminClient, key: str | None = None, **fields: object) -> int:
    key = key or client.state.store.api_keys.reveal()
    payload = {"to": ["ann@example.com"], "subject": "Hello", "text": "hi", **fields}
    response = client.client.post("/api/send", json=payload, headers={"Authorization": f"Bearer {key}"})
    # A wrong key's refusal reaches the log with the web process's next flush (about a second
    # later, as one row for the minute): flush now, so the rows keep the order of the calls.
    future = client.state.flush_refusals()
    if future is not None:
        future.result(10)
    return response.status_code


def deliver(client: AdminClient, status: str, code: int, reply: str) -> None:
    """Let 'a worker' attempt the oldest queued message."""
    store = client.state.store
    message = next(m for m in store.messages.waiting() if m.status == "queued")
    claimed = store.messages.claim(message.id, "w1", 300)
    assert isinstance(claimed, ClaimedMessage)
    store.messages.record_attempt(claimed, status, next_attempt_at=4e9 if status == "deferred" else None,
                                  last_error=None if status == "sent" else reply,
                                  recipient_updates={r.position: (status, code, reply) for r in claimed.recipients},
                                  entry=LogEntry("attempt", status, message_id=claimed.id, stage="DATA", code=code,
                                        detail=f"{code} {reply}", sender=claimed.from_addr,
                                        recipients="ann@example.com", subject=claimed.subject))


def rows(page: str) -> list[tuple[str, str]]:
    """(status label, subject) of each row shown."""
    found = re.findall(r'<tr id="log-\d+">.*?<span class="badge [^"]*">([^<]*)</span>.*?'
                       r'<td data-label="Subject">([^<]*)</td>', page, re.S)
    return [(label, html.unescape(subject)) for label, subject in found]


def counters(page: str) -> dict[str, int]:
    return {name: int(n) for name, n in re.findall(r'<li class="counter-(\w+)"><span class="count">(\d+)</span>', page)}


def test_every_kind_of_event_with_its_columns_and_the_counters(client: AdminClient) -> None:
    attachment = {"filename": "a.txt", "mime_type": "text/plain", "content_b64": "aGk="}
    assert api_send(client, subject="With two files", attachments=[attachment, attachment]) == 202
    assert api_send(client, subject="Plain") == 202
    assert api_send(client, key="wrong-key") == 401
    assert api_send(client, to=[]) == 400
    assert api_send(client, subject="Third") == 202
    assert api_send(client, subject="Over the limit") == 429
    deliver(client, "sent", 250, "2.0.0 OK")
    deliver(client, "deferred", 451, "4.3.0 later")
    deliver(client, "failed", 550, "5.1.1 unknown user")

    page = client.get("/logs")
    assert page.status_code == 200
    labels = [label for label, _ in rows(page.text)]
    # One word per state: the badge says what the filter and the counter say.
    assert labels == ["Failed", "Deferred", "Sent", "Rate limited", "Accepted", "Rejected", "Unauthorized",
                      "Accepted", "Accepted"]
    # Every kind is counted, so the tiles add up to Total (Total 113 once stood over tiles adding up to 57).
    shown = counters(page.text)
    assert shown == {"total": 9, "accepted": 3, "sent": 1, "partial": 0, "deferred": 1, "failed": 1, "rejected": 1,
                     "rate_limited": 1, "unauthorized": 1, "retried": 0, "cancelled": 0, "cleared": 0}
    assert sum(n for name, n in shown.items() if name != "total") == shown["total"]
    at = page.text.rindex("With two files")  # its accepted row, the oldest
    first = page.text[at - 600:at + 200]
    assert '<td data-label="Attachments" class="num">2</td>' in first and "198.51.100.20" in first and "noreply@example.org" in first
    assert "550 5.1.1 unknown user" in page.text
    assert "1 request with a wrong API key from 198.51.100.20 in the minute from" in page.text


def test_the_log_is_searchable_by_the_message_id_the_api_returned(client: AdminClient) -> None:
    key = client.state.store.api_keys.reveal()
    ids = [client.client.post("/api/send", json={"to": ["ann@example.com"], "subject": subject, "text": "hi"},
                              headers={"Authorization": f"Bearer {key}"}).json()["id"] for subject in ("One", "Two")]
    deliver(client, "sent", 250, "OK")
    page = client.get("/logs", params={"q": ids[0]})
    assert rows(page.text) == [("Sent", "One"), ("Accepted", "One")]
    assert f'href="/messages/{ids[0]}"' in page.text and ids[1] not in page.text


def test_filter_by_status_time_and_search(client: AdminClient) -> None:
    for subject in ("Reset your password", "Welcome aboard", "Your invoice"):
        assert api_send(client, subject=subject, to=[f"{subject.split()[-1].lower()}@example.com"]) == 202
    assert api_send(client, key="nope") == 401
    deliver(client, "sent", 250, "OK")

    def shown(**params: str) -> list[tuple[str, str]]:
        page = client.get("/logs", params=params)
        assert page.status_code == 200
        return rows(page.text)

    assert shown(status="unauthorized") == [("Unauthorized", "—")]
    assert shown(status="sent") == [("Sent", "Reset your password")]
    assert shown(q="password") == [("Sent", "Reset your password"), ("Accepted", "Reset your password")]
    assert shown(q="aboard@example") == [("Accepted", "Welcome aboard")]
    assert shown(q="invoice", status="accepted") == [("Accepted", "Your invoice")]
    assert shown(q="nothing-like-this") == []
    assert len(shown(range="hour")) == 5
    assert shown(range="custom", **{"from": "2001-01-01", "to": "2001-01-02"}) == []
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert len(shown(range="custom", **{"from": today})) == 5
    page = client.get("/logs", params={"range": "hour", "status": "sent"})
    assert counters(page.text)["total"] == 5 and "(last hour)" in page.text


def test_bad_filters_are_explained_next_to_their_fields(client: AdminClient) -> None:
    page = client.get("/logs", params={"status": "exploded", "from": "yesterday", "q": "%%%"})
    assert page.status_code == 200
    assert "There is no status 'exploded'" in field_error(page.text, "status")
    assert "Give a date and time" in field_error(page.text, "from")
    assert "letters or digits" in field_error(page.text, "q")
    page = client.get("/logs", params={"range": "custom", "from": "2026-05-02", "to": "2026-05-01"})
    assert "“To” must be after “From”" in html.unescape(field_error(page.text, "to"))
    page = client.get("/logs", params={"range": "week", "from": "2026-05-02"})
    assert "Between the dates below" in html.unescape(field_error(page.text, "range"))
    assert client.get("/logs", params={"before": "x; DROP TABLE log", "after": "-5"}).status_code == 200


def test_older_and_newer_pages(client: AdminClient) -> None:
    store = client.state.store
    conn = store.conn()
    from relay_core.store import insert_log, transaction
    with transaction(conn):
        for i in range(120):
            insert_log(conn, LogEntry("accepted", "queued", subject=f"message {i:03d}", ts=time.time() - 1000 + i))
    first = client.get("/logs")
    subjects = [s for _, s in rows(first.text)]
    assert subjects[0] == "message 119" and subjects[-1] == "message 070" and len(subjects) == 50
    older = re.search(r'href="(/logs\?before=\d+)"', first.text)
    assert older and "Newer" not in first.text
    second = client.get(html.unescape(older.group(1)))
    assert [s for _, s in rows(second.text)][0] == "message 069"
    newer = re.search(r'href="(/logs\?after=\d+)"', second.text)
    assert newer
    back = client.get(html.unescape(newer.group(1)))
    assert [s for _, s in rows(back.text)] == subjects
    third = client.get(html.unescape(re.search(r'href="(/logs\?before=\d+)"', second.text).group(1)))  # type: ignore[union-attr]
    assert [s for _, s in rows(third.text)][-1] == "message 000" and "Older" not in third.text


def test_csv_export_of_the_current_filter_is_streamed_and_defused(client: AdminClient) -> None:
    assert api_send(client, subject="=HYPERLINK(\"http://evil.example\")") == 202
    assert api_send(client, subject="+1 call now") == 202
    assert api_send(client, subject="@SUM(A1)", to=["-x@example.com"]) == 202
    assert api_send(client, key="nope") == 401
    with client.client.stream("GET", "/logs.csv", params={"status": "accepted"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert "content-length" not in response.headers  # streamed, not built whole
        disposition = response.headers["content-disposition"]
        assert re.fullmatch(r'attachment; filename="tspro-relay-log-\d{8}-\d{6}\.csv"', disposition)
        body = b"".join(response.iter_bytes())
    table = list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))
    assert table[0][:4] == ["time_utc", "status", "message_id", "sender"]
    assert [r[1] for r in table[1:]] == ["accepted"] * 3
    assert [r[5] for r in table[1:]] == ["'@SUM(A1)", "'+1 call now", "'=HYPERLINK(\"http://evil.example\")"]
    assert table[1][4] == "'-x@example.com" and table[1][7] == "198.51.100.20"


def test_clear_log_is_confirmed_and_audited(client: AdminClient) -> None:
    for _ in range(3):
        assert api_send(client) == 202
    asked = client.post("/logs/clear", {}, token_from="/logs")
    assert asked.status_code == 200 and "Clear the whole transaction log?" in asked.text
    assert client.state.store.log.counters().total == 3
    done = client.post("/logs/clear", {"confirmed": "yes"}, token_from="/logs")
    assert done.status_code == 303 and done.headers["location"] == "/logs?cleared=3"
    page = client.get(done.headers["location"])
    assert "The log was cleared (3 rows removed)." in page.text
    assert rows(page.text) == [("Log cleared", "—")] and "log cleared by admin" in page.text
    [audit] = client.state.store.log.audit_entries(action_prefix="log.")
    assert (audit.actor, audit.ip, audit.detail) == ("admin", "198.51.100.20", "cleared the transaction log (3 rows)")


def test_a_detail_does_not_repeat_its_stage(client: AdminClient) -> None:
    assert api_send(client, subject="Unreachable") == 202
    store = client.state.store
    message = next(m for m in store.messages.waiting() if m.status == "queued")
    claimed = store.messages.claim(message.id, "w1", 300)
    assert isinstance(claimed, ClaimedMessage)
    detail = "connect: cannot connect to 127.0.0.1:2525: Connection refused"
    store.messages.record_attempt(claimed, "deferred", next_attempt_at=4e9, last_error=detail,
                                  recipient_updates={r.position: ("deferred", None, None) for r in claimed.recipients},
                                  entry=LogEntry("attempt", "deferred", message_id=claimed.id, stage="connect", detail=detail))
    for path in ("/logs", f"/messages/{claimed.id}"):
        text = " ".join(re.sub(r"<[^>]+>", " ", client.get(path).text).split())
        assert "connect connect:" not in text and "cannot connect to 127.0.0.1:2525" in text, path
