"""Send limits across two real web processes sharing one store (relay.db).

A key with its own limit of 5 an hour sends alternately through both web
processes: the 6th is refused with 429 wherever it arrives, with an honest
Retry-After (when the minute of the first send leaves the hour window) and
RateLimit-* headers, while the portal's key (unlimited) keeps sending
through both. A worker delivers every accepted message to aiosmtpd, and
nothing refused reaches it. (That the count stays exact when two
processes accept for one key at once, on SQLite and on PostgreSQL, is
tests/core/test_limits_store.py's.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from support import Relay, RelayProcess, SmtpServer, cli, free_port

pytestmark = pytest.mark.slow
LIMIT = 5


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    relay = Relay(tmp_path_factory.mktemp("limits"), RELAY_WORKER_THREADS="2")
    try:
        yield relay
    finally:
        relay.close()


def message(to: str) -> dict[str, Any]:
    return {"from_email": "noreply@example.org", "to": [to], "subject": "limits", "text": "t"}


def test_a_keys_limit_is_shared_by_two_web_processes(relay: Relay, tmp_path: Path) -> None:
    limited = cli(relay.env, "api-key", "add", "--label", "limited", "--per-hour", str(LIMIT),
                  cwd=relay.cwd).stdout.strip()
    with SmtpServer("none") as server:
        relay.configure(*server.settings())
        relay.start_web()
        second = RelayProcess("web", relay.env, relay.cwd, port=free_port()).start()
        webs = [relay.http, httpx.Client(base_url=second.url, timeout=30)]
        try:
            relay.start_worker()
            first_sent_at = time.time()
            answers = [webs[i % 2].post("/api/send", json=message(f"l{i}@example.com"),
                                        headers={"Authorization": f"Bearer {limited}"}) for i in range(LIMIT + 2)]
            portal = [webs[i % 2].post("/api/send", json=message(f"p{i}@example.com"),
                                       headers={"Authorization": f"Bearer {relay.key}"}) for i in range(4)]
        finally:
            webs[1].close()
            second.stop()

        assert [a.status_code for a in answers] == [202] * LIMIT + [429, 429]
        assert [a.headers["RateLimit-Remaining"] for a in answers] == [str(LIMIT - 1 - i) for i in range(LIMIT)] + \
            ["0", "0"]
        assert all(a.headers["RateLimit-Limit"] == str(LIMIT) for a in answers)
        # Honest: a slot frees when the minute of the first send leaves the hour window.
        frees_at = (int(first_sent_at // 60) + 60) * 60
        for refused in answers[LIMIT:]:
            assert "reached its limit of 5 messages per hour" in refused.json()["error"]
            assert abs(int(refused.headers["Retry-After"]) - (frees_at - time.time())) <= 5
            assert refused.headers["RateLimit-Reset"] == refused.headers["Retry-After"]
        assert [p.status_code for p in portal] == [202] * 4 and "RateLimit-Limit" not in portal[0].headers

        ids = [a.json()["id"] for a in answers[:LIMIT] + portal]
        for message_id in ids:
            relay.wait_status(message_id, "sent", timeout=60)
        time.sleep(0.5)  # nothing else may arrive
        delivered = sorted(r.rcpt_tos[0] for r in server.received)
        assert delivered == sorted([f"l{i}@example.com" for i in range(LIMIT)] + [f"p{i}@example.com" for i in range(4)])
        counted = relay.query("SELECT SUM(n) FROM send_counts")[0][0]
        assert counted == LIMIT  # the refused ones were not counted
