"""GET /metrics in-process: off by default, the token, the format, and what feeds the numbers.

The cross-process story (several webs and workers, one truth) is
tests/e2e/test_metrics.py; these check the endpoint's own rules and the
store rows behind it.
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relay_core.store import metrics
from relay_core.store import transaction
from api_helpers import flush_refusals, payload, running_client, settings_with


def scrape_values(text: str) -> dict[str, float]:
    return {s.name + str(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_are_off_unless_asked_for(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path)) as client:
        answer = client.get("/metrics")
        assert answer.status_code == 404 and "RELAY_METRICS=1" in answer.text


def test_without_a_token_anyone_on_the_network_may_scrape(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path, RELAY_METRICS="1")) as client:
        del client.headers["Authorization"]
        answer = client.get("/metrics")
        assert answer.status_code == 200
        assert "tspro_relay_messages_accepted_total 0.0" in answer.text


def test_with_a_token_only_its_bearer_may_scrape(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, RELAY_METRICS="1", RELAY_METRICS_TOKEN="s3cret-token-value")
    with running_client(settings) as client:
        key = client.headers.pop("Authorization")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                        {"Authorization": "Basic czNjcmV0LXRva2VuLXZhbHVl"}):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        answer = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token-value"})
        assert answer.status_code == 200
        assert "s3cret-token-value" not in answer.text


def test_accepts_rejections_and_latency_are_counted_in_the_store(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path, RELAY_METRICS="1")) as client:
        for _ in range(3):
            assert client.post("/api/send", json=payload()).status_code == 202
        assert client.post("/api/send", json=payload(to=[])).status_code == 400
        assert client.post("/api/send", json=payload(), headers={"Authorization": "Bearer no"}).status_code == 401
        # An idempotent repeat is the first answer, not a second message.
        for _ in range(2):
            assert client.post("/api/send", json=payload(), headers={"Idempotency-Key": "k1"}).status_code == 202
        flush_refusals(client)  # what the web process does about once a second
        found = scrape_values(client.get("/metrics").text)
    assert found["tspro_relay_messages_accepted_total[]"] == 4
    assert found["tspro_relay_messages_rejected_total[('reason', 'bad_request')]"] == 1
    assert found["tspro_relay_messages_rejected_total[('reason', 'unauthorized')]"] == 1
    assert found["tspro_relay_accept_duration_seconds_count[]"] == 4
    assert found["tspro_relay_messages[('state', 'queued')]"] == 4
    assert found["tspro_relay_oldest_waiting_age_seconds[]"] >= 0


def test_quiet_processes_are_folded_without_changing_any_total(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path, RELAY_METRICS="1")) as client:
        store = client.app.state.relay.store
        conn = store.conn()
        long_ago = time.time() - 2 * metrics.FOLD_AFTER_SECONDS
        with transaction(conn):
            for process, count in (("gone-1", 5), ("gone-2", 7)):
                conn.execute("INSERT INTO metric_counts (process, name, label, value, updated_at)"
                             " VALUES (?, 'delivery_attempts', 'sent', ?, ?)", (process, count, long_ago))
            metrics.count_attempt(conn, "sent", 120)  # this process: recent, stays its own
        before = metrics.totals(conn)
        assert metrics.fold(conn, time.time()) == 2
        assert metrics.totals(conn) == before
        processes = {r[0] for r in conn.execute("SELECT process FROM metric_counts")}
        assert "gone-1" not in processes and "*" in processes and metrics.process_id() in processes
