"""The real portal's messages and health checks, end to end with real processes.

`tspro-relay web` and `tspro-relay worker` run as subprocesses against
aiosmtpd on loopback; what the portal reads (/api/health, /api/messages) and
what the mail server receives (EHLO, envelope, headers, parts) are checked
as they happen, never through a mock.
"""

from __future__ import annotations

import base64
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from relay_core.options import Options
from relay_core.delivery.smtp import helo_name
from support import SMTP_PASSWORD, Certificates, Relay, SmtpServer, cli, wait_until

BODY_TEXT = "Your temporary password is Zx9-body-never-logged"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, certs: Certificates) -> Iterator[Relay]:
    relay = Relay(tmp_path_factory.mktemp("first-contact"), SSL_CERT_FILE=str(certs.ca_file),
                  RELAY_WORKER_THREADS="2", RELAY_LOG_LEVEL="INFO")
    relay.configure("retry_base_seconds=30", "retry_max_seconds=60", "default_from=relay@example.org",
                    "default_from_name=The Relay")
    relay.start_web()
    relay.start_worker()
    yield relay
    relay.close()


def send(relay: Relay, **changes: Any) -> str:
    body = {"from_email": "noreply@example.org", "from_name": "Portal", "to": ["ann@example.com"],
            "subject": "Hello", "text": BODY_TEXT}
    body.update(changes)
    response = relay.send(body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def health(relay: Relay) -> dict[str, Any]:
    response = relay.http.get("/api/health", headers={"Authorization": f"Bearer {relay.key}"})
    assert response.status_code == 200
    return response.json()


def queue_tasks(relay: Relay) -> int:
    conn = sqlite3.connect(str(relay.data_dir / "queue.db"), timeout=30)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM task").fetchone()[0])
    finally:
        conn.close()


def claims(relay: Relay) -> int:
    conn = sqlite3.connect(str(relay.data_dir / "relay.db"), timeout=30)
    try:
        return int(conn.execute("SELECT COALESCE(SUM(claims), 0) FROM messages").fetchone()[0])
    finally:
        conn.close()


# -- what the portal sees -------------------------------------------------------------------------------------------
def test_health_follows_the_worker_and_pause_and_nothing_is_lost(tmp_path: Path) -> None:
    relay = Relay(tmp_path, RELAY_WORKER_THREADS="2")
    try:
        with SmtpServer("none") as server:
            relay.configure(*server.settings(), "sweep_seconds=3600")  # only a resume may wake them
            relay.start_web()
            answer = health(relay)
            assert answer["ok"] is False and answer["configured"] is True
            assert "No delivery worker is running" in answer["error"]
            relay.start_worker()
            wait_until(lambda: health(relay)["ok"], what="health ok with a worker")

            for how in ("command", "setting"):
                if how == "command":
                    assert "paused" in cli(relay.env, "pause", cwd=relay.cwd).stdout
                else:
                    relay.configure("delivery_paused=true")
                answer = health(relay)
                assert answer["ok"] is False and "Delivery is paused" in answer["error"]
                before, claimed_before = len(server.received), claims(relay)
                ids = [send(relay, to=[f"m{i}-{how}@example.com"]) for i in range(3)]
                # The worker takes each wake-up and drops it: the queue empties, nothing is claimed.
                wait_until(lambda: queue_tasks(relay) == 0, what="the paused worker to drain the queue")
                time.sleep(1.0)
                assert [relay.status(i)["status"] for i in ids] == ["queued"] * 3
                assert claims(relay) == claimed_before  # no claim, so no SMTP either
                assert len(server.received) == before and relay.status(ids[0])["attempts"] == []

                if how == "command":
                    out = cli(relay.env, "resume", cwd=relay.cwd).stdout
                    assert "resumed" in out and "3" in out
                else:
                    relay.configure("delivery_paused=false")  # the sweeper notices the change
                for message_id in ids:
                    relay.wait_status(message_id, "sent", timeout=30)
                assert len(server.received) == before + 3
                assert health(relay)["ok"] is True
    finally:
        relay.close()


def test_a_worker_restarted_while_paused_still_wakes_everything_on_resume(relay: Relay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "sweep_seconds=3600", "delivery_paused=true")
        try:
            ids = [send(relay, to=[f"restart{i}@example.com"]) for i in range(2)]
            wait_until(lambda: queue_tasks(relay) == 0, what="the paused worker to drain the queue")
            relay.workers.pop().kill()  # whatever it remembered about dropped wake-ups is gone
            relay.start_worker()
            time.sleep(1.0)
            assert [relay.status(i)["status"] for i in ids] == ["queued"] * 2 and server.received == []
            relay.configure("delivery_paused=false")  # no resume command: only the new worker can notice
            for message_id in ids:
                relay.wait_status(message_id, "sent", timeout=30)
        finally:
            relay.configure("delivery_paused=false", "sweep_seconds=30")


def test_a_wrong_password_makes_health_say_so(relay: Relay, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True) as server:
        # Short retries, so the fixed password is tried within seconds, not the module's 30 s.
        # Attempts still in flight with the old password when it is fixed are at most the two
        # worker threads: fewer than the three failures health needs to call the server failing.
        relay.configure(*server.settings(auth=True), "smtp_password=not-the-password",
                        "retry_base_seconds=3", "retry_max_seconds=6")
        try:
            ids = [send(relay) for _ in range(3)]
            for message_id in ids:
                relay.wait_status(message_id, "deferred")
            answer = health(relay)
            assert answer["ok"] is False and answer["upstream"]["failing"] is True
            assert "the mail server 127.0.0.1 refuses the username or password (535" in answer["error"]
            assert answer["upstream"]["stage"] == "AUTH" and answer["upstream"]["code"] == 535
            relay.configure(f"smtp_password={SMTP_PASSWORD}")  # fixed: the verdict clears at once
            assert health(relay)["ok"] is True
            for message_id in ids:
                relay.wait_status(message_id, "sent", timeout=60)
        finally:
            relay.configure("retry_base_seconds=30", "retry_max_seconds=60")


def test_new_settings_are_checked_at_once_without_a_message(relay: Relay, certs: Certificates) -> None:
    # Before: /api/health said ok until three real messages had failed with the new settings.
    with SmtpServer("starttls", certs, auth=True) as server:
        relay.configure(*server.settings(auth=True), "smtp_password=not-the-password")
        answer = wait_until(lambda: (a := health(relay))["upstream"]["failing"] and a, timeout=30,
                            what="the worker's check of the new settings")
        assert answer["ok"] is False and "a check of the new SMTP settings failed at AUTH" in answer["error"]
        assert answer["upstream"]["check"]["state"] == "failed" and answer["upstream"]["code"] == 535
        relay.configure(f"smtp_password={SMTP_PASSWORD}")
        answer = wait_until(lambda: (a := health(relay))["upstream"]["check"] and
                            a["upstream"]["check"]["state"] == "ok" and a, timeout=30,
                            what="the check of the fixed settings")
        assert answer["ok"] is True and "signed in as" in answer["upstream"]["check"]["detail"]
        assert server.received == []


def test_partly_refused_recipients_end_partial(relay: Relay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings())
        server.behaviour.rcpt_replies = {"bob@example.com": "550 5.1.1 No such user"}
        message_id = send(relay, to=["ann@example.com", "bob@example.com"])
        status = relay.wait_status(message_id, "partial", "sent", "failed")
        assert status["status"] == "partial" and "bob@example.com" in status["last_error"]
        assert [r["status"] for r in status["recipients"]] == ["sent", "failed"]
        assert status["attempts"][-1]["status"] == "partial"
        assert health(relay)["messages"].get("partial", 0) >= 1
        assert len(server.received) == 1


def test_cc_and_bcc_reach_the_envelope_and_bcc_never_the_headers(relay: Relay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings())
        message_id = send(relay, to="ann@example.com", cc=["cy@example.com"], bcc="hidden@example.com")
        relay.wait_status(message_id, "sent")
        (got,) = server.received
        assert got.rcpt_tos == ["ann@example.com", "cy@example.com", "hidden@example.com"]
        assert got.message["To"] == "ann@example.com" and got.message["Cc"] == "cy@example.com"
        assert b"hidden@example.com" not in got.content


def test_blank_from_name_empty_text_and_parameterised_types_arrive_as_meant(relay: Relay) -> None:
    csv = "name,city\nÅsa,Malmö\n".encode()
    with SmtpServer("none") as server:
        relay.configure(*server.settings())
        message_id = send(relay, from_name="", text="", attachments=[
            {"filename": "a.txt", "mime_type": "text/plain; charset=utf-8; format=flowed", "content_b64": "aGk="},
            {"filename": "r.csv", "mime_type": "text/csv", "content_b64": base64.b64encode(csv).decode()}])
        relay.wait_status(message_id, "sent")
        msg = server.received[0].message
        assert msg["From"] == "noreply@example.org"  # a from_email keeps its own (empty) name
        assert msg.get_body(("plain",)).get_content().strip() == ""
        first, second = msg.iter_attachments()
        assert (first.get_content_charset(), first.get_param("format")) == ("utf-8", "flowed")
        assert second.get_content_charset() == "utf-8" and second.get_payload(decode=True) == csv


def test_ehlo_uses_the_default_name_then_the_setting(relay: Relay) -> None:
    expected = helo_name(Options(default_from="relay@example.org"))
    assert expected and not expected.startswith("[") and not expected.replace(".", "").isdigit()
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "smtp_helo_name=")
        relay.wait_status(send(relay), "sent")
        relay.configure("smtp_helo_name=relay.example.net")
        relay.wait_status(send(relay), "sent")
        assert [r.helo for r in server.received] == [expected, "relay.example.net"]
    fqdn = socket.getfqdn()
    if "." not in fqdn or fqdn.startswith("localhost"):
        assert expected == "example.org"  # no dotted FQDN here: the Default From's domain


# -- what a new operator sees ----------------------------------------------------------------------------------------
def test_each_attempt_outcome_is_one_info_line_and_accepts_are_not(relay: Relay, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True, trusted=False) as server:
        relay.configure(*server.settings(auth=True), "smtp_tls_verify=true")
        message_id = send(relay, ignored_typo="x")
        relay.wait_status(message_id, "deferred")
    wait_until(lambda: message_id in relay.worker.output(), what="the worker's line")
    lines = [line for line in relay.worker.output().splitlines() if message_id in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert " INFO " in line and "deferred" in line and "STARTTLS" in line
    assert "TLS certificate verification failed" in line
    output = relay.worker.output() + relay.web.output()  # type: ignore[union-attr]
    for secret in (SMTP_PASSWORD, BODY_TEXT, relay.key):
        assert secret not in output
    assert message_id not in relay.web.output()  # type: ignore[union-attr]  # no console line per accept
