"""Send limits across two real web processes sharing one store (SQLite, then PostgreSQL).

A key with its own limit of 5 an hour sends alternately through both web
processes: the 6th is refused with 429 wherever it arrives, with an honest
Retry-After (when the minute of the first send leaves the hour window) and
RateLimit-* headers, while the portal's key (unlimited) keeps sending
through both, and key checks (empty POSTs) through either are not counted.
A worker delivers every accepted message to aiosmtpd, and nothing refused
reaches it.

Retry-After is also taken at its word: a second key (limit 2) had its two
sends counted 59 minutes ago (by the store's own counting, in this
process), so its slot frees at the next whole minute. Its 429 says so;
ten seconds before that moment it is still refused, and once the
Retry-After of the first 429 has passed, its next send is accepted and
delivered. (That the count stays exact when two processes accept for one
key at once is tests/core/test_limits_store.py's.)
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from relay_core.config import load_settings
from relay_core.store import Store, transaction
from support import Relay, RelayProcess, SmtpServer, cli, free_port

pytestmark = [pytest.mark.slow, pytest.mark.backends]
LIMIT = 5
SOON_LIMIT = 2


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, module_backend_env: dict[str, str]) -> Iterator[Relay]:
    relay = Relay(tmp_path_factory.mktemp("limits"), RELAY_WORKER_THREADS="2", **module_backend_env)
    try:
        yield relay
    finally:
        relay.close()


def message(to: str) -> dict[str, Any]:
    return {"from_email": "noreply@example.org", "to": [to], "subject": "limits", "text": "t"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def count_sends_an_hour_ago(relay: Relay, label: str, n: int) -> float:
    """Count ``n`` sends for the key in the minute 59 minutes before this one; returns when that
    minute leaves the window (the next whole minute, at least 20 s away)."""
    if time.time() % 60 > 40:  # too close to the boundary for the checks before it
        time.sleep(61 - time.time() % 60)
    store = Store.open(load_settings({k: v for k, v in relay.env.items() if k.startswith("RELAY_")}))
    try:
        key_id = next(k.id for k in store.api_keys.all() if k.label == label)
        then = time.time() - 59 * 60
        conn = store.conn()
        with transaction(conn):
            for _ in range(n):
                assert store.api_keys.take_send(conn, key_id, n, then).retry_after == 0
    finally:
        store.shutdown()
    return (int(then // 60) + 60) * 60.0


def test_a_keys_limit_is_shared_by_two_web_processes(relay: Relay, tmp_path: Path) -> None:
    limited = cli(relay.env, "api-key", "add", "--label", "limited", "--per-hour", str(LIMIT),
                  cwd=relay.cwd).stdout.strip()
    soon = cli(relay.env, "api-key", "add", "--label", "soon", "--per-hour", str(SOON_LIMIT),
               cwd=relay.cwd).stdout.strip()
    with SmtpServer("none") as server:
        relay.configure(*server.settings())
        relay.start_web()
        second = RelayProcess("web", relay.env, relay.cwd, port=free_port()).start()
        webs = [relay.http, httpx.Client(base_url=second.url, timeout=30)]
        try:
            relay.start_worker()
            if time.time() % 60 > 50:  # the first send's minute must be the one read here
                time.sleep(61 - time.time() % 60)
            first_sent_at = time.time()
            answers = []
            asked = []  # (sent, answered) times of each send: Retry-After is checked against these
            for i in range(LIMIT + 2):
                sent = time.time()
                answers.append(webs[i % 2].post("/api/send", json=message(f"l{i}@example.com"),
                                                headers=bearer(limited)))
                asked.append((sent, time.time()))
                if i < 2:  # a key check through each process: 400, not a send
                    check = webs[i % 2].post("/api/send", headers=bearer(limited))
                    assert check.status_code == 400 and check.json()["ok"] is False
            portal = [webs[i % 2].post("/api/send", json=message(f"p{i}@example.com"),
                                       headers=bearer(relay.key)) for i in range(4)]
        finally:
            webs[1].close()
            second.stop()

        # The 429 at exactly the limit, in whichever process; the portal's key unaffected.
        assert [a.status_code for a in answers] == [202] * LIMIT + [429, 429]
        assert [a.headers["RateLimit-Remaining"] for a in answers] == [str(LIMIT - 1 - i) for i in range(LIMIT)] + \
            ["0", "0"]
        assert all(a.headers["RateLimit-Limit"] == str(LIMIT) for a in answers)
        # Honest: a slot frees when the minute of the first send leaves the hour window.
        frees_at = (int(first_sent_at // 60) + 60) * 60
        # Checked against when each was asked and answered, not against now: stopping the
        # second process can take seconds on a loaded machine.
        for refused, (sent, answered) in zip(answers[LIMIT:], asked[LIMIT:]):
            assert "reached its limit of 5 messages per hour" in refused.json()["error"]
            assert frees_at - answered - 1 <= int(refused.headers["Retry-After"]) <= frees_at - sent + 1
            assert refused.headers["RateLimit-Reset"] == refused.headers["Retry-After"]
        assert [p.status_code for p in portal] == [202] * 4 and "RateLimit-Limit" not in portal[0].headers

        for answer, key in [(a, limited) for a in answers[:LIMIT]] + [(p, None) for p in portal]:
            relay.wait_status(answer.json()["id"], "sent", timeout=120, key=key)

        # The key whose sends were counted 59 minutes ago: its Retry-After, taken at its word.
        soon_frees_at = count_sends_an_hour_ago(relay, "soon", SOON_LIMIT)
        asked_at = time.time()
        soon_refused = relay.http.post("/api/send", json=message("s0@example.com"), headers=bearer(soon))
        answered_at = time.time()
        assert soon_refused.status_code == 429, soon_refused.text
        retry_after = int(soon_refused.headers["Retry-After"])
        # Exact to the second the relay answered in (somewhere between asking and the answer).
        assert math.ceil(soon_frees_at - answered_at) - 1 <= retry_after <= math.ceil(soon_frees_at - asked_at), \
            (retry_after, soon_frees_at - asked_at, soon_frees_at - answered_at)
        assert (soon_refused.headers["RateLimit-Limit"], soon_refused.headers["RateLimit-Remaining"]) == ("2", "0")
        # 10 s before the slot frees (3 s was too close: a loaded machine drifted past it).
        time.sleep(max(0.0, soon_frees_at - 10 - time.time()))
        early = relay.http.post("/api/send", json=message("s1@example.com"), headers=bearer(soon))
        assert early.status_code == 429 and int(early.headers["Retry-After"]) <= 11, early.headers
        # Taken at its word from when it arrived: the relay counted from its answer, not our asking.
        time.sleep(max(0.0, answered_at + retry_after - time.time()))
        freed = relay.http.post("/api/send", json=message("s2@example.com"), headers=bearer(soon))
        assert freed.status_code == 202, freed.text
        assert (freed.headers["RateLimit-Limit"], freed.headers["RateLimit-Remaining"]) == ("2", "1")
        relay.wait_status(freed.json()["id"], "sent", timeout=120, key=soon)

        time.sleep(0.5)  # nothing else may arrive
        delivered = sorted(r.rcpt_tos[0] for r in server.received)
        assert delivered == sorted([f"l{i}@example.com" for i in range(LIMIT)] + [f"p{i}@example.com" for i in range(4)]
                                   + ["s2@example.com"])
        counted = relay.query("SELECT SUM(c.n) FROM send_counts c JOIN api_keys k ON k.id = c.api_key_id"
                              " WHERE k.label = ?", ("limited",))[0][0]
        assert counted == LIMIT  # neither the refused sends nor the key checks were counted
