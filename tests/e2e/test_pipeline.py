"""The whole send path with real processes: portal JSON -> web -> queue -> worker -> SMTP.

One `tspro-relay web` and one `tspro-relay worker` serve the module (on SQLite,
then on PostgreSQL with a Redis queue); each test points them at its own
aiosmtpd server with `tspro-relay config set`, which also shows that settings
reach running processes without a restart.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from support import (SMTP_PASSWORD, SMTP_USER, Certificates, Relay, RelayProcess, SmtpServer, cli, free_port,
                     relay_env)

pytestmark = pytest.mark.backends

PDF_BYTES = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
CSV_BYTES = "name,city\nÅsa,Malmö\n".encode() * 50
BODY_SECRET = "Welcome aboard! Your temporary password is Hx7-unique-body-text"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, certs: Certificates,
          module_backend_env: dict[str, str]) -> Iterator[Relay]:
    relay = Relay(tmp_path_factory.mktemp("relay"), SSL_CERT_FILE=str(certs.ca_file), RELAY_WORKER_THREADS="4",
                  **module_backend_env)
    relay.configure("retry_base_seconds=1", "retry_max_seconds=2")
    relay.start_web()
    relay.start_worker()
    try:
        yield relay
    finally:
        relay.close()


def portal_payload(to: Any) -> dict[str, Any]:
    return {
        "from_email": "noreply@example.org",
        "from_name": "Trusted Servants Pörtal",
        "to": to,
        "subject": "Reset your password ✓",
        "text": BODY_SECRET + "\n\nSecond paragraph with ünïcode.",
        "html": "<p>Welcome <b>aboard</b> — ünïcode</p>",
        "reply_to": "help@example.org",
        "reply_to_name": "Help Desk",
        "attachments": [
            {"filename": "minutes.pdf", "mime_type": "application/pdf",
             "content_b64": base64.b64encode(PDF_BYTES).decode()},
            {"filename": "roster.csv", "mime_type": "text/csv",
             "content_b64": base64.b64encode(CSV_BYTES).decode()},
        ],
    }


MODES = [
    pytest.param("none", False, id="plain"),
    pytest.param("starttls", True, id="starttls-auth"),
    pytest.param("ssl", True, id="implicit-tls-auth"),
]


@pytest.mark.parametrize("mode,auth", MODES)
@pytest.mark.parametrize("recipients", [["ann@example.com", "bob@example.net"],
                                        "ann@example.com; bob@example.net"], ids=["list", "string"])
def test_portal_message_arrives_intact(relay: Relay, certs: Certificates, mode: str, auth: bool,
                                       recipients: Any) -> None:
    with SmtpServer(mode, certs, auth=auth) as server:
        relay.configure(*server.settings(auth))
        response = relay.send(portal_payload(recipients))
        assert response.status_code == 202, response.text
        answer = response.json()
        assert answer["ok"] is True and answer["status"] == "queued"

        status = relay.wait_status(answer["id"], "sent", "failed")
        assert status["status"] == "sent", status
        assert [r["status"] for r in status["recipients"]] == ["sent", "sent"]
        assert status["recipients"][0]["code"] == 250
        assert status["attempts"][0]["status"] == "sent"

        assert len(server.received) == 1
        got = server.received[0]
        assert got.mail_from == "noreply@example.org"
        assert got.rcpt_tos == ["ann@example.com", "bob@example.net"]
        assert got.auth == (SMTP_USER if auth else None)
        assert b"\r\n" in got.content and b"\n" not in got.content.replace(b"\r\n", b"")

        msg = got.message
        assert msg["From"] == "Trusted Servants Pörtal <noreply@example.org>"
        assert msg["To"] == "ann@example.com, bob@example.net"
        assert msg["Reply-To"] == "Help Desk <help@example.org>"
        assert msg["Subject"] == "Reset your password ✓"
        assert msg["Message-ID"] == f"<{answer['id']}@example.org>"
        assert msg["Date"]
        assert msg.get_body(("plain",)).get_content().startswith(BODY_SECRET)
        assert "ünïcode" in msg.get_body(("plain",)).get_content()
        assert msg.get_body(("html",)).get_content().strip() == "<p>Welcome <b>aboard</b> — ünïcode</p>"
        attachments = list(msg.iter_attachments())
        assert [(a.get_filename(), a.get_content_type()) for a in attachments] == [
            ("minutes.pdf", "application/pdf"), ("roster.csv", "text/csv")]
        assert attachments[0].get_payload(decode=True) == PDF_BYTES
        assert attachments[1].get_payload(decode=True) == CSV_BYTES


def test_portal_without_a_sender_name_keeps_the_bare_address(relay: Relay, certs: Certificates) -> None:
    """What the portal sends when its site has no sender name: the From it would write over direct SMTP."""
    with SmtpServer("none", certs) as server:
        relay.configure(*server.settings(), "default_from=relay@example.org", "default_from_name=The Relay")
        response = relay.send({"from_email": "noreply@example.org", "from_name": "", "to": ["ann@example.com"],
                               "subject": "Hello", "text": "Body"})
        assert response.status_code == 202, response.text
        assert relay.wait_status(response.json()["id"], "sent", "failed")["status"] == "sent"
        assert server.received[0].message["From"] == "noreply@example.org"


def test_untrusted_certificate_defers_with_tls_error_until_verification_is_off(
        relay: Relay, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True, trusted=False) as server:
        relay.configure(*server.settings(auth=True), "smtp_tls_verify=true")
        response = relay.send(portal_payload(["ann@example.com"]))
        assert response.status_code == 202
        message_id = response.json()["id"]
        status = relay.wait_status(message_id, "deferred", "failed")
        assert status["status"] == "deferred"
        assert "TLS certificate verification failed" in status["last_error"]
        assert status["attempts"][0]["stage"] == "STARTTLS"
        assert server.received == []

        relay.configure("smtp_tls_verify=false")
        try:
            status = relay.wait_status(message_id, "sent", timeout=30)
        except AssertionError:
            raise AssertionError(f"{relay.status(message_id)}\n{relay.worker.output()}")
        assert len(server.received) == 1
        assert status["attempts"][-1]["status"] == "sent"


def test_secrets_never_reach_the_disk_in_clear(relay: Relay, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True) as server:
        relay.configure(*server.settings(auth=True), "smtp_tls_verify=true")
        message_id = relay.send(portal_payload(["ann@example.com"])).json()["id"]
        relay.wait_status(message_id, "sent")
    needles = [SMTP_PASSWORD.encode(), relay.key.encode(), BODY_SECRET.encode(),
               base64.b64encode(PDF_BYTES)[:40]]
    stored: dict[str, bytes] = {}
    if "RELAY_DATABASE_URL" in relay.env:
        # Every row of every table, as PostgreSQL prints it (bytea in hex, so the body is searched decoded).
        tables = [r[0] for r in relay.query("SELECT table_name FROM information_schema.tables"
                                            " WHERE table_schema = current_schema()")]
        for table in tables:
            text = "\n".join(r[0] for r in relay.query(f"SELECT CAST({table} AS TEXT) FROM {table}"))
            stored[table] = text.encode() + b"".join(
                bytes.fromhex(h) for h in re.findall(r"\\\\x([0-9a-f]+)", text))
        assert {"settings", "api_keys", "messages"} <= set(stored)
        assert not relay.data_dir.exists()
    else:
        files = [p for p in relay.data_dir.iterdir() if p.name.startswith(("relay.db", "queue.db"))]
        assert {p.name for p in files} >= {"relay.db", "relay.db-wal", "queue.db"}
        stored = {p.name: p.read_bytes() for p in files}
    for name, blob in stored.items():
        for needle in needles:
            assert needle not in blob, f"{needle[:12]!r}... found in clear in {name}"
    # The needles are real: the relay does hold them, encrypted.
    assert relay.key.startswith("tsr_") and len(relay.key) >= 43


def test_not_configured_answers_503_and_health_says_so(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data")
    web = RelayProcess("web", env, tmp_path, port=free_port()).start()
    try:
        key = cli(env, "api-key", "show", cwd=tmp_path).stdout.strip()
        assert httpx.get(f"{web.url}/healthz").json() == {"ok": True, "configured": False}
        response = httpx.post(f"{web.url}/api/send", headers={"Authorization": f"Bearer {key}"},
                              json=portal_payload(["ann@example.com"]))
        assert response.status_code == 503
        assert response.json() == {"ok": False, "error": response.json()["error"]}
        assert "not configured" in response.json()["error"]
        cli(env, "config", "set", "smtp_host=127.0.0.1", cwd=tmp_path)
        assert httpx.get(f"{web.url}/healthz").json() == {"ok": True, "configured": True}
    finally:
        web.stop()


def test_send_test_command_delivers_the_test_email(relay: Relay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "default_from=relay@example.org", "default_from_name=The Relay")
        out = cli(relay.env, "send-test", "--to", "admin@example.org", cwd=relay.cwd)
        message_id = out.stdout.strip()
        assert "Sent: the mail server answered 250" in out.stderr  # send-test waits for the outcome
        # Sent by no API key, so the API answers no key about it: the CLI reads the store.
        status = json.loads(cli(relay.env, "status", message_id, "--json", cwd=relay.cwd).stdout)
        assert status["status"] == "sent" and status["recipients"][0]["address"] == "admin@example.org"
        msg = server.received[0].message
        assert msg["Subject"] == "TS Pro Relay test email"
        assert msg["From"] == "The Relay <relay@example.org>"
        assert "This is a test email from TS Pro Relay" in msg.get_body(("plain",)).get_content()


def test_the_installed_package_finds_its_templates(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "from relay_core.resources import read_template; "
                          "print(read_template('emails/test.txt'))"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    assert "test email from TS Pro Relay" in out.stdout
