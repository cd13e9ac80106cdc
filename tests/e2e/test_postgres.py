"""Scaling out on PostgreSQL, as an operator does it, with real processes throughout.

- Separate hosts: the web process and two workers, each with a data
  directory of its own, sharing nothing but the PostgreSQL and Redis URLs;
  one worker is SIGKILLed in the middle of a 1,000-message burst.
- The move: a SQLite relay that has sent, failed, deferred and queued mail
  is moved with `tspro-relay migrate-store`, then started on PostgreSQL.

The PostgreSQL cluster and redis-server are the session's throwaway ones
(conftest.py); each test has a fresh database.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

from relay_core.config import load_settings
from relay_core.store import Store
from services import PostgresCluster
from support import Relay, RelayProcess, SmtpServer, cli, free_port, relay_env, wait_until

MESSAGE_ID = re.compile(rb"^Message-ID: <([0-9a-f]+)@", re.MULTILINE)


def delivered_ids(server: SmtpServer) -> Counter[str]:
    ids: Counter[str] = Counter()
    for received in list(server.received):
        match = MESSAGE_ID.search(received.content)
        assert match, received.content[:300]
        ids[match.group(1).decode()] += 1
    return ids


def payload(i: int, to: str | None = None) -> dict[str, Any]:
    return {"from_email": "noreply@example.org", "to": [to or f"member{i}@example.com"],
            "subject": f"Message {i}", "text": f"Body of message {i}"}


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def test_web_and_two_workers_on_separate_hosts_share_only_postgresql_and_redis(
        tmp_path: Path, pg_url: str, redis_url: str) -> None:
    hosts = {name: tmp_path / name for name in ("admin", "web", "worker-a", "worker-b")}
    envs = {}
    for name, home in hosts.items():
        home.mkdir()
        envs[name] = relay_env(home / "data", RELAY_DATABASE_URL=pg_url, RELAY_QUEUE_URL=redis_url,
                               RELAY_WORKER_THREADS="4")
    processes: list[RelayProcess] = []
    try:
        with SmtpServer("none") as server:
            server.behaviour.delay = 0.01  # long enough for the kill to land mid-burst
            cli(envs["admin"], "config", "set", *server.settings(), "lease_seconds=5", "sweep_seconds=1",
                cwd=hosts["admin"])
            key = cli(envs["admin"], "api-key", "show", cwd=hosts["admin"]).stdout.strip()
            web = RelayProcess("web", envs["web"], hosts["web"], port=free_port()).start()
            processes.append(web)
            with httpx.Client(base_url=web.url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
                def send(i: int) -> str:
                    response = http.post("/api/send", json=payload(i))
                    assert response.status_code == 202, response.text
                    return str(response.json()["id"])

                with ThreadPoolExecutor(8) as pool:
                    first = list(pool.map(send, range(500)))
                    workers = [RelayProcess("worker", envs[name], hosts[name]).start()
                               for name in ("worker-a", "worker-b")]
                    processes.extend(workers)
                    ids = first + list(pool.map(send, range(500, 1000)))
            victim = workers[0]
            assert victim.proc is not None
            wait_until(lambda: len(server.received) >= 300, timeout=60, what="300 deliveries")
            victim.kill()
            # The victim's leases at the moment of the kill: its deliveries in flight.
            in_flight = {r[0] for r in query(pg_url, "SELECT id FROM messages WHERE status = 'sending'"
                                             " AND lease_owner LIKE %s", (f"%:{victim.proc.pid}:%",))}
            sent_at_kill = len(server.received)
            assert sent_at_kill < 1000, "the kill should land in the middle of the burst"
            wait_until(lambda: query(pg_url, "SELECT status, COUNT(*) FROM messages GROUP BY status")
                       == [("sent", 1000)], timeout=120, what="all 1,000 messages sent")
            delivered = delivered_ids(server)
            assert set(delivered) == set(ids)
            duplicates = {i: n for i, n in delivered.items() if n > 1}
            assert set(duplicates) <= in_flight and all(n == 2 for n in duplicates.values())
            print(f"killed after {sent_at_kill} deliveries with {len(in_flight)} in flight; "
                  f"duplicates: {len(duplicates)}")
            assert all(r.rcpt_tos for r in server.received)
    finally:
        for proc in processes:
            proc.stop()
    # Nothing was written where another host would have had to see it.
    for name, home in hosts.items():
        assert not (home / "data").exists(), f"{name} wrote into its data directory"


def test_a_store_other_hosts_share_with_a_queue_they_cannot_is_refused_in_one_sentence(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "data", RELAY_DATABASE_URL="postgresql://relay:pw-Secret9@127.0.0.1:9/relay")
    for role in (["web", "--port", str(free_port())], ["worker"], ["run", "--port", str(free_port())]):
        result = cli(env, *role, cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr
        assert "set RELAY_QUEUE_URL=redis://" in result.stderr and "Traceback" not in result.stderr
    # With a queue, an unreachable database is named (password masked) instead of a traceback.
    result = cli({**env, "RELAY_QUEUE_URL": "redis://127.0.0.1:9/0"}, "config", "show", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Cannot connect to the PostgreSQL database postgresql://relay:***@127.0.0.1:9/relay" in result.stderr
    assert "pw-Secret9" not in result.stderr
    assert not (tmp_path / "data").exists()


def _refused(env: dict[str, str], cwd: Path, target: str) -> str:
    result = cli(env, "migrate-store", "--to", target, cwd=cwd, check=False)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    return result.stderr


def test_migrate_store_moves_a_sqlite_relay_and_its_waiting_mail_is_delivered(
        tmp_path: Path, pg_url: str, redis_url: str, pg_cluster: PostgresCluster) -> None:
    (tmp_path / "old").mkdir()
    old = Relay(tmp_path / "old", RELAY_WORKER_THREADS="2")
    new: Relay | None = None
    try:
        with SmtpServer("none") as server:
            server.behaviour.rcpt_replies = {"refused@example.com": "550 5.1.1 No such user",
                                             "later@example.com": "451 4.2.0 Try again later"}
            old.configure(*server.settings(), "retry_base_seconds=2", "retry_max_seconds=4", "sweep_seconds=1",
                          "default_from_name=The Portal", "allowed_from=example.org")
            spare = cli(old.env, "api-key", "add", "--label", "spare", cwd=old.cwd).stdout.strip()
            old.start_web()
            old.start_worker()

            def send(relay: Relay, i: int, to: str | None = None, **headers: str) -> str:
                response = relay.send(payload(i, to), **headers)
                assert response.status_code == 202, response.text
                return str(response.json()["id"])

            sent = [send(old, i) for i in range(3)]
            failed = send(old, 3, "refused@example.com")
            deferred = send(old, 4, "later@example.com")
            idempotent = send(old, 5, **{"Idempotency-Key": "order-5"})
            for message_id in (*sent, idempotent):
                old.wait_status(message_id, "sent")
            old.wait_status(failed, "failed")
            old.wait_status(deferred, "deferred")
            old.workers.pop().stop()
            assert old.status(deferred)["status"] == "deferred"
            queued = [send(old, i) for i in range(6, 9)]  # no worker now: these stay queued
            before = {"config": json.loads(cli(old.env, "config", "show", "--json", cwd=old.cwd).stdout),
                      "counts": old.counts(),
                      "log": old.query("SELECT COUNT(*) FROM log")[0][0],
                      "failed": old.status(failed), "sent": old.status(sent[0])}
            assert before["counts"] == {"sent": 4, "failed": 1, "deferred": 1, "queued": 3}

            # Refused while a relay process has relay.db open, and the target is left alone.
            assert "is using" in _refused(old.env, old.cwd, pg_url)
            assert query(pg_url, "SELECT COUNT(*) FROM information_schema.tables"
                                 " WHERE table_schema = 'public'") == [(0,)]
            assert old.web is not None
            old.web.stop()
            # Refused into a database that already holds tables.
            name, busy = pg_cluster.create_database()
            try:
                query(busy, "CREATE TABLE someone_elses (id INTEGER)")
                assert "is not empty" in _refused(old.env, old.cwd, busy)
            finally:
                pg_cluster.drop_database(name)

            moved = cli(old.env, "migrate-store", "--to", pg_url, cwd=old.cwd)
            report = moved.stdout
            assert "postgres@127.0.0.1" in report and re.search(r"messages\s+9 row", report)
            assert "1 deferred, 1 failed, 3 queued, 4 sent (4 waiting for delivery)" in report
            # The SQLite store now refuses to run, so its waiting mail cannot go out twice.
            again = cli(old.env, "config", "show", cwd=old.cwd, check=False)
            assert again.returncode == 2 and "was moved to PostgreSQL" in again.stderr
            assert "Traceback" not in again.stderr

            server.behaviour.rcpt_replies = {}
            (tmp_path / "new").mkdir()
            new = Relay(tmp_path / "new", RELAY_DATABASE_URL=pg_url, RELAY_QUEUE_URL=redis_url,
                        RELAY_WORKER_THREADS="2")
            assert new.key == old.key  # the portal's key moved with the store
            assert json.loads(cli(new.env, "config", "show", "--json", cwd=new.cwd).stdout) == before["config"]
            new.start_web()
            new.start_worker()
            for message_id in (*queued, deferred):
                status = new.wait_status(message_id, "sent", timeout=60)
                assert status["recipients"][0]["status"] == "sent"
            assert new.status(failed) == before["failed"]
            assert new.status(sent[0]) == before["sent"]
            later = [r for r in server.received if r.rcpt_tos == ["later@example.com"]]
            assert len(later) == 1 and b"Body of message 4" in later[0].content
            assert delivered_ids(server)[queued[0]] == 1
            # The idempotency answer moved: a repeat gets the first answer and queues nothing.
            repeat = new.send(payload(5), **{"Idempotency-Key": "order-5"})
            assert repeat.status_code == 202 and repeat.json()["id"] == idempotent
            # The extra key works, the admin login too, and the log holds every earlier row.
            assert new.send(payload(9), Authorization=f"Bearer {spare}").status_code == 202
            store = Store.open(load_settings(new.env))
            try:
                assert store.admin.check_password("admin", "admin-pass-123")
                assert [k.label for k in store.api_keys.all()] == ["portal", "spare"]
            finally:
                store.shutdown()
            assert new.query("SELECT COUNT(*) FROM log")[0][0] >= before["log"] + 5
            assert not (tmp_path / "new" / "data").exists()
    finally:
        old.close()
        if new is not None:
            new.close()


def test_the_relay_answers_503_while_postgresql_is_down_and_recovers_by_itself(
        tmp_path: Path, redis_url: str) -> None:
    """The database restarts under a running web and worker: sends get 503 (nothing
    accepted that is not stored), and afterwards both carry on without a restart."""
    cluster = PostgresCluster().start()  # a cluster of its own: this test stops it
    relay: Relay | None = None
    try:
        _, url = cluster.create_database()
        relay = Relay(tmp_path, RELAY_DATABASE_URL=url, RELAY_QUEUE_URL=redis_url, RELAY_WORKER_THREADS="2")
        with SmtpServer("none") as server:
            relay.configure(*server.settings(), "sweep_seconds=1", "lease_seconds=5")
            relay.start_web()
            relay.start_worker()
            first = [relay.send(payload(i)).json()["id"] for i in range(5)]
            for message_id in first:
                relay.wait_status(message_id, "sent")
            cluster.halt()
            down = relay.send(payload(5))
            assert down.status_code == 503, down.text
            assert down.json()["ok"] is False and "unavailable" in down.json()["error"]
            assert relay.http.get("/healthz").status_code == 503
            cluster.start()
            answers = wait_until(lambda: (r := relay.send(payload(6))).status_code == 202 and r, timeout=60,
                                 what="a send accepted after the restart")  # type: ignore[union-attr]
            later = [answers.json()["id"]] + [relay.send(payload(i)).json()["id"] for i in range(7, 10)]
            for message_id in later:
                relay.wait_status(message_id, "sent", timeout=60)
            delivered = delivered_ids(server)
            assert set(delivered) == set(first + later) and max(delivered.values()) == 1
    finally:
        if relay is not None:
            relay.close()
        cluster.stop()
