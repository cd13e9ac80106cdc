"""Microsoft 365 over OAuth 2.0 end to end: real web and worker processes, the stand-in authority, XOAUTH2 SMTP.

One story, in the order a volunteer lives it: connect with a device code
(`tspro-relay smtp connect microsoft`), send; the access token expires
between two messages and is refreshed before the second goes, with no failed
attempt; two workers refresh at once and the store keeps the refresh token
issued last; the grant is revoked, mail waits and /api/health says the one
sentence; connecting again delivers what waited, exactly once.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import captured_logs
from oauth_server import MAILBOX, AuthorizationServer, XOAuth2SmtpServer, microsoft_settings
from support import Certificates, Relay, cli, wait_until

pytestmark = pytest.mark.slow
SENTENCE = "The Microsoft 365 connection was revoked (AADSTS50173): reconnect it in Settings"


@pytest.fixture
def stand_ins(certs: Certificates) -> Iterator[tuple[AuthorizationServer, XOAuth2SmtpServer]]:
    with AuthorizationServer(certs, access_lifetime=4) as authority, XOAuth2SmtpServer(certs, authority) as smtp:
        yield authority, smtp


def connect(relay: Relay, authority: AuthorizationServer) -> str:
    """`tspro-relay smtp connect microsoft`, the person signing in once the code is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "relay_cli", "smtp", "connect", "microsoft"], env=relay.env,
                            cwd=relay.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    code = re.search(r"enter the code (\w+)", first)
    assert code and f"open {authority.base}/devicelogin" in first, first
    authority.approve(code.group(1))
    out, err = proc.communicate(timeout=60)
    captured_logs.keep("smtp connect", first + out + err)
    assert proc.returncode == 0, err
    return out


def send(relay: Relay, subject: str) -> str:
    response = relay.send({"from_email": MAILBOX, "to": ["ann@example.com"], "subject": subject, "text": "Hello"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_connect_send_refresh_rotate_revoke_reconnect(tmp_path: Path, certs: Certificates,
                                                       stand_ins: tuple[AuthorizationServer, XOAuth2SmtpServer]) -> None:
    authority, smtp = stand_ins
    relay = Relay(tmp_path, RELAY_WORKER_THREADS="2", RELAY_LOG_LEVEL="INFO")
    try:
        relay.configure(*microsoft_settings(smtp, authority, certs, mailbox=""), "retry_base_seconds=1",
                        "retry_max_seconds=2", "connection_idle_seconds=30")
        out = connect(relay, authority)
        assert out.endswith(f"Connected: the relay now sends as {MAILBOX} through Microsoft 365 "
                            "(smtp_auth=microsoft).\n")
        shown = cli(relay.env, "config", "show", cwd=relay.cwd).stdout
        assert "oauth_refresh_token = ********" in shown and "rt-" not in shown
        tested = cli(relay.env, "smtp", "test", cwd=relay.cwd).stdout
        assert tested == (f"Signed in to 127.0.0.1:{smtp.port} with an access token for {MAILBOX}. No mail was "
                          "sent.\n")
        assert smtp.received == [] and smtp.handler.exchanges[-1]["ok"]
        relay.start_web()
        relay.start_worker()

        # Send; then the access token lapses before the second message, which refreshes it first.
        first = relay.wait_status(send(relay, "one"), "sent")
        refreshes = authority.grants.count("refresh_token")
        wait_until(lambda: all(expiry < time.time() for _, expiry in authority.access.values()), timeout=15,
                   what="every access token to expire")
        second = relay.wait_status(send(relay, "two"), "sent")
        assert [a["status"] for a in first["attempts"] + second["attempts"]] == ["sent", "sent"]
        # At least one refresh (the worker's check of new settings may fetch a token of its own meanwhile).
        assert authority.grants.count("refresh_token") >= refreshes + 1
        assert all(e["ok"] for e in smtp.handler.exchanges)  # no token was ever refused

        # Two workers, each with its own token in memory, refresh at the same time.
        relay.start_worker()
        authority.token_delay = 1.0
        wait_until(lambda: all(expiry < time.time() for _, expiry in authority.access.values()), timeout=15,
                   what="every access token to expire")
        ids = [send(relay, f"burst {n}") for n in range(6)]
        for message_id in ids:
            assert [a["status"] for a in relay.wait_status(message_id, "sent")["attempts"]] == ["sent"]
        authority.token_delay = 0.0
        stored = relay.query("SELECT value FROM settings WHERE name = 'oauth_refresh_token'")[0][0]
        assert stored not in authority.issued_refresh  # encrypted at rest
        out = subprocess.run([sys.executable, "-c", "import sys; from relay_core import crypto, config; "
                              "print(crypto.derive_keys(config.load_settings()).decrypt_text(sys.argv[1]))", stored],
                             env=relay.env, capture_output=True, text=True, check=True).stdout.strip()
        assert out == authority.newest_refresh_token()
        print(f"refresh grants during the burst: {authority.grants.count('refresh_token') - refreshes - 1}")

        # Revoked: mail waits, the health sentence names the fix, nothing fails. (A signed-in SMTP session
        # outlives a revocation, at Microsoft too: close each one, so the next message signs in again.)
        relay.configure("connection_idle_seconds=0")
        authority.revoke()
        waiting = send(relay, "waits")
        status = relay.wait_status(waiting, "deferred")
        assert status["last_error"] == f"AUTH: {SENTENCE}"
        health = relay.http.get("/api/health", headers={"Authorization": f"Bearer {relay.key}"}).json()
        assert health["ok"] is False and SENTENCE + "." in health["error"]
        retried = wait_until(lambda: (s := relay.status(waiting))["status"] == "deferred" and len(s["attempts"]) >= 3
                             and s, timeout=30, what="two more attempts")
        assert {a["status"] for a in retried["attempts"]} == {"deferred"}  # waiting, never failed

        # Connected again: what waited goes, once.
        authority.restore()
        connect(relay, authority)
        relay.wait_status(waiting, "sent", timeout=30)
        health = relay.http.get("/api/health", headers={"Authorization": f"Bearer {relay.key}"}).json()
        assert SENTENCE not in str(health["error"])
        subjects = [r.message["Subject"] for r in smtp.received]
        assert subjects.count("waits") == 1 and len(subjects) == 9
        logs = "".join(worker.output() for worker in relay.workers)
        assert logs.count(SENTENCE) >= 1
    finally:
        relay.close()
