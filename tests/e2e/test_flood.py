"""A flood of wrong keys from one address against a real `tspro-relay web` and worker (SQLite, then PostgreSQL).

10,000 POST /api/send with a wrong key arrive from 127.0.0.1 on 32 keep-alive
connections (tests/loadgen.py: httpx is too slow to make a flood) while the
portal's key sends 40 messages through httpx. Before, every refusal was an
fsync'd log row: a flood pushed the real history out of the bounded log.
Now the log gains one aggregated row per minute and reason with the count,
every earlier row is still there (with ``log_max_rows`` at its minimum and
the sweeper pruning every second), the wrong keys get 401 up to the budget
and 429 with Retry-After after it, and every good send is accepted and
delivered. No timing is asserted (bench/bench_flood.py measures the good
key's latency during a flood); the flood itself is bounded in count and time.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from loadgen import flood, request_bytes
from support import Relay, SmtpServer, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.backends]
FLOOD = 10_000
GOOD = 40
BUDGET = 100


def test_a_wrong_key_flood_leaves_the_log_and_the_good_key_alone(tmp_path: Path, backend_env: dict[str, str]) -> None:
    relay = Relay(tmp_path, RELAY_WORKER_THREADS="4", **backend_env)
    with SmtpServer("none") as server:
        try:
            relay.configure(*server.settings(), "log_max_rows=1000", "sweep_seconds=1")
            relay.start_web()
            relay.start_worker()
            # The history the flood must not push out.
            earlier = [relay.send({"from_email": "noreply@example.org", "to": [f"h{i}@example.com"], "subject": "s",
                                   "text": "t"}).json()["id"] for i in range(5)]
            for message_id in earlier:
                relay.wait_status(message_id, "sent")
            history = relay.query("SELECT id, event, message_id FROM log ORDER BY id")
            assert len(history) == 10  # accepted + attempt for each

            port = relay.web.port  # type: ignore[union-attr]
            body = json.dumps({"from_email": "x@example.org", "to": ["victim@example.com"], "subject": "s",
                               "text": "t"}).encode()
            attack = request_bytes("POST", "/api/send", port, {"Authorization": "Bearer tsr_" + "f" * 43,
                                                               "Content-Type": "application/json"}, body)
            good_answers: list[int] = []
            good_ids: list[str] = []

            def portal() -> None:
                for i in range(GOOD):
                    answer = relay.send({"from_email": "noreply@example.org", "to": [f"g{i}@example.com"],
                                         "subject": "during the flood", "text": "t"})
                    good_answers.append(answer.status_code)
                    if answer.status_code == 202:
                        good_ids.append(answer.json()["id"])

            sender = threading.Thread(target=portal)
            sender.start()
            began = time.time()
            result = flood(port, attack, FLOOD, connections=32, timeout=300)
            minutes = int(time.time() // 60) - int(began // 60) + 1  # each minute has a budget of its own
            sender.join(120)

            # Every wrong key was refused: 401 up to the budget in each minute the flood spanned, then 429.
            assert result.total == FLOOD and set(result.statuses) <= {401, 429}, result.statuses
            assert BUDGET <= result.statuses[401] <= BUDGET * minutes, (result.statuses, minutes)
            assert result.statuses[429] >= FLOOD - BUDGET * minutes
            assert len(result.retry_after) == result.statuses[429] and all(1 <= s <= 60 for s in result.retry_after)

            # The good key was never refused, and everything it sent is delivered.
            assert good_answers == [202] * GOOD
            for message_id in good_ids:
                relay.wait_status(message_id, "sent", timeout=60)
            delivered = {r.rcpt_tos[0] for r in server.received}
            assert {f"g{i}@example.com" for i in range(GOOD)} <= delivered

            # The log: the history intact, plus the good sends and a few aggregated rows, no more.
            wait_until(lambda: relay.query("SELECT COUNT(*) FROM log WHERE event = 'unauthorized'")[0][0]
                       and _counted(relay) == FLOOD, timeout=20, what="the refusals to be written")
            rows = relay.query("SELECT id, event, message_id FROM log ORDER BY id")
            assert rows[:len(history)] == history
            unauthorized = relay.query("SELECT code, detail FROM log WHERE event = 'unauthorized'")
            assert 1 <= len(unauthorized) <= minutes, unauthorized  # one per minute (and reason)
            assert len(rows) == len(history) + 2 * GOOD + len(unauthorized)
            assert all(code == 401 and "with a wrong API key from 127.0.0.1" in detail for code, detail in unauthorized)
        finally:
            relay.close()
    assert "tsr_" + "f" * 43 not in relay.web.output()  # type: ignore[union-attr]


def _counted(relay: Relay) -> int:
    """The refusals the aggregated rows account for (their sentences start with the count)."""
    return sum(int(re.match(r"(\d+) request", detail).group(1))  # type: ignore[union-attr]
               for (detail,) in relay.query("SELECT detail FROM log WHERE event = 'unauthorized'"))
