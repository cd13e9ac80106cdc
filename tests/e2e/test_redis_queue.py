"""RELAY_QUEUE_URL=redis://...: the same pipeline with RedisHuey as the wake-up queue.

Needs Debian's redis-server (installed by .ci/run); the session's server
(conftest.py) runs on a free loopback port with persistence off.
"""

from __future__ import annotations

from pathlib import Path

from support import Relay, SmtpServer, wait_until


def test_delivery_through_a_redis_queue(tmp_path: Path, redis_url: str) -> None:
    relay = Relay(tmp_path, RELAY_QUEUE_URL=redis_url, RELAY_WORKER_THREADS="4")
    try:
        with SmtpServer("none") as server:
            relay.configure(*server.settings(), "retry_base_seconds=1")
            server.behaviour.data_replies = ["451 4.3.0 try later"]  # one retry goes through the schedule
            relay.start_web()
            relay.start_worker()
            ids = []
            for i in range(20):
                response = relay.send({"from_email": "noreply@example.org", "to": [f"m{i}@example.com"],
                                       "subject": f"Redis {i}", "text": "Body"})
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
            wait_until(lambda: relay.counts() == {"sent": 20}, timeout=30, what="20 messages sent")
            assert len(server.received) == 20
            assert sum(len(relay.status(i)["attempts"]) for i in ids) == 21
        assert not (relay.data_dir / "queue.db").exists()
    finally:
        relay.close()
