"""/metrics after a known workload: exactly those counts, summed over every process.

Two web processes share one store (SQLite, then PostgreSQL with Redis);
worker A delivers the first half of the workload and stops, worker B the
second. The SMTP server refuses fail*@ (550) and defers defer*@ (451); the
retry delay is an hour, so each deferred message is tried once. Both web
processes then answer the scrape with the same numbers, counted by
processes of which one has already exited.
"""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import Relay, RelayProcess, SmtpServer, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.backends]
TOKEN = "metrics-token-for-the-test-0123456789"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, module_backend_env: dict[str, str]) -> Iterator[Relay]:
    relay = Relay(tmp_path_factory.mktemp("metrics"), RELAY_METRICS="1", RELAY_METRICS_TOKEN=TOKEN,
                  RELAY_WORKER_THREADS="4", **module_backend_env)
    relay.configure("retry_base_seconds=3600", "retry_max_seconds=3600", "allowed_from=example.org")
    try:
        yield relay
    finally:
        relay.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_a_scrape_shows_exactly_the_workload_across_processes(relay: Relay) -> None:
    second_web = RelayProcess("web", relay.env, relay.cwd, port=free_port())
    with SmtpServer("none") as server:
        for i in range(3):
            server.behaviour.rcpt_replies[f"fail{i}@example.com"] = "550 5.1.1 no such mailbox"
        for i in range(2):
            server.behaviour.rcpt_replies[f"defer{i}@example.com"] = "451 4.3.0 try again later"
        relay.configure(*server.settings())
        relay.start_web()
        second_web.start()
        webs = [relay.http, httpx.Client(base_url=second_web.url, timeout=30)]
        sent_by = iter(range(100))

        def send(to: list[str], **overrides: Any) -> httpx.Response:
            web = webs[next(sent_by) % 2]  # alternate between the two web processes
            body = {"from_email": "noreply@example.org", "to": to, "subject": "workload", "text": "t", **overrides}
            return web.post("/api/send", json=body, headers={"Authorization": f"Bearer {relay.key}"})

        def run(batch: list[tuple[list[str], str]]) -> None:
            ids = []
            for to, _ in batch:
                answer = send(to)
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
            for message_id, (_, state) in zip(ids, batch):
                relay.wait_status(message_id, state)

        try:
            first = relay.start_worker()
            run([(["ok0@example.com"], "sent"), (["ok1@example.com"], "sent"), (["ok2@example.com"], "sent"),
                 (["fail0@example.com"], "failed"), (["fail1@example.com"], "failed"),
                 (["defer0@example.com"], "deferred")])
            assert first.stop() == 0
            relay.start_worker()
            run([(["ok3@example.com"], "sent"), (["ok4@example.com"], "sent"), (["ok5@example.com"], "sent"),
                 (["fail2@example.com"], "failed"), (["defer1@example.com"], "deferred"),
                 (["ok6@example.com", "fail0@example.com"], "partial")])

            # Refused sends: two bad keys, one without recipients, one From outside the allowlist.
            for _ in range(2):
                assert webs[0].post("/api/send", json={"to": ["a@example.com"]},
                                    headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert send([]).status_code == 400
            assert send(["a@example.com"], from_email="someone@elsewhere.test").status_code == 403

            # The token is required: none, or a wrong one, is refused.
            assert webs[0].get("/metrics").status_code == 401
            assert webs[0].get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
            # Refusals for a wrong key reach the store with their web process's next flush (within a second).
            def unauthorized() -> float:
                scraped = samples(webs[0].get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text)
                return scraped.get(("tspro_relay_messages_rejected_total", (("reason", "unauthorized"),)), 0.0)

            wait_until(lambda: unauthorized() == 2, timeout=10, what="the refusals to be flushed")
            scrapes = []
            for web in webs:
                answer = web.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
                assert answer.status_code == 200
                assert answer.headers["content-type"].startswith("text/plain; version=")
                scrapes.append(samples(answer.text))
        finally:
            webs[1].close()
            second_web.stop()

    found = scrapes[0]
    assert value(found, "tspro_relay_messages_accepted_total") == 12
    assert value(found, "tspro_relay_messages_rejected_total", reason="unauthorized") == 2
    assert value(found, "tspro_relay_messages_rejected_total", reason="bad_request") == 1
    assert value(found, "tspro_relay_messages_rejected_total", reason="forbidden") == 1
    for outcome, count in (("sent", 6), ("failed", 3), ("deferred", 2), ("partial", 1)):
        assert value(found, "tspro_relay_delivery_attempts_total", outcome=outcome) == count, outcome
    for state, count in (("sent", 6), ("failed", 3), ("deferred", 2), ("partial", 1), ("queued", 0),
                         ("sending", 0)):
        assert value(found, "tspro_relay_messages", state=state) == count, state
    assert value(found, "tspro_relay_oldest_waiting_age_seconds") > 0  # the deferred ones wait
    assert value(found, "tspro_relay_delivery_duration_seconds_count") == 12
    assert value(found, "tspro_relay_delivery_duration_seconds_bucket", le="+Inf") == 12
    assert value(found, "tspro_relay_accept_duration_seconds_count") == 12
    assert value(found, "tspro_relay_accept_duration_seconds_sum") > 0
    assert value(found, "tspro_relay_workers_alive") == 1  # A stopped; B reports
    # Both web processes tell the same story (the age gauge moves with the clock).
    counters = {k: v for k, v in found.items() if not k[0].startswith(("tspro_relay_oldest", "tspro_relay_worker"))}
    assert counters == {k: v for k, v in scrapes[1].items() if k in counters}
    # ... and it was told by several processes: two workers delivered, two webs accepted.
    rows = relay.query("SELECT name, COUNT(DISTINCT process) FROM metric_counts"
                       " WHERE name IN ('delivery_attempts', 'messages_accepted') GROUP BY name")
    assert dict(rows) == {"delivery_attempts": 2, "messages_accepted": 2}
