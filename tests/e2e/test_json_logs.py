"""RELAY_LOG_FORMAT=json on real processes: every line one JSON object, never a secret.

A web and a worker run at DEBUG (the most that is ever logged) with JSON
logs; a portal message carrying a password in its body and an attachment is
sent once to a server that refuses the relay's SMTP password (deferred) and
once to one that takes it (sent). Then every line both processes wrote is
parsed, and searched for the secrets they handled.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import SECRET, SMTP_PASSWORD, Relay, SmtpServer

pytestmark = pytest.mark.slow

BODY = "Your temporary password is Jq-7-unique-welcome-body"
ATTACHMENT = b"attachment bytes that must never be logged 0123456789"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    relay = Relay(tmp_path, RELAY_LOG_FORMAT="json", RELAY_LOG_LEVEL="DEBUG")
    relay.configure("retry_base_seconds=1", "retry_max_seconds=1")
    try:
        yield relay
    finally:
        relay.close()


def parse(output: str) -> list[dict[str, Any]]:
    records = []
    for line in output.splitlines():
        record = json.loads(line)  # every line is one JSON object: nothing else is written
        assert isinstance(record, dict), line
        records.append(record)
    return records


def test_json_logs_carry_time_level_event_and_message_id_but_no_secret(relay: Relay) -> None:
    with SmtpServer("none", auth=True) as server:
        relay.configure(*server.settings(auth=True))
        relay.configure("smtp_password=not-the-right-password-77")
        relay.start_web()
        relay.start_worker()
        payload = {"from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": "Welcome",
                   "text": BODY, "attachments": [{"filename": "a.bin", "mime_type": "application/octet-stream",
                                                  "content_b64": base64.b64encode(ATTACHMENT).decode()}]}
        response = relay.send(payload)
        assert response.status_code == 202
        message_id = response.json()["id"]
        relay.wait_status(message_id, "deferred")
        relay.configure(f"smtp_password={SMTP_PASSWORD}")
        relay.wait_status(message_id, "sent")
        assert relay.send({"to": ["x@example.com"], "subject": "no sender"}).status_code == 400
        relay.close()
    assert relay.web is not None
    web, worker = parse(relay.web.output()), parse(relay.worker.output())

    for record in web + worker:
        assert {"time", "level", "event", "logger", "message"} <= record.keys(), record
        assert record["time"].endswith("Z") and record["time"][10] == "T"
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

    attempts = [r for r in worker if r["event"] == "delivery.attempt"]
    # Deferred until the right password is set (more than once when the CLI that sets it takes
    # longer than the one-second retry, as on a busy machine), then sent.
    outcomes = [(r["message_id"], r["status"], r["level"]) for r in attempts]
    assert outcomes[-1] == (message_id, "sent", "INFO")
    assert outcomes[:-1] and set(outcomes[:-1]) == {(message_id, "deferred", "INFO")}
    assert attempts[0]["stage"] == "AUTH" and attempts[-1]["code"] == 250
    assert any(r["event"] == "worker.started" and r.get("threads") for r in worker)
    assert any(r["event"] == "worker.stopped" for r in worker)
    assert any(r["logger"].startswith("uvicorn") for r in web)  # library records are JSON too

    everything = relay.web.output() + relay.worker.output()
    for secret in (SECRET, relay.key, SMTP_PASSWORD, "not-the-right-password-77", BODY,
                   base64.b64encode(ATTACHMENT).decode(), "admin-pass-123"):
        assert secret not in everything
