"""A backup taken in the middle of a burst, restored on a new host, delivers what was waiting.

A real web and worker take a 1,000-message burst from eight concurrent
clients while a slow SMTP server keeps a backlog waiting. Part-way through,
`tspro-relay backup` runs. The copy must pass SQLite's integrity check and
hold every message whose 202 had arrived before the backup started. The old
relay then stops for good; a fresh data directory is restored from the copy
with `tspro-relay restore`, and its worker delivers exactly the messages the
backup held as waiting (or in flight), each once.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support import Relay, SmtpServer, cli, wait_until

pytestmark = pytest.mark.slow
BURST = 1000


def test_a_backup_during_a_burst_is_whole_and_restores_on_a_new_host(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = Relay(tmp_path / "old", RELAY_WORKER_THREADS="4")
    accepted: list[str] = []
    lock = threading.Lock()
    backup = tmp_path / "backup.db"
    try:
        with SmtpServer("none") as slow:
            slow.behaviour.delay = 0.5  # at most 8 deliveries a second: mail is still waiting at backup time
            # however slowly a loaded machine takes the sends (0.05 s let delivery keep up)
            old.configure(*slow.settings())
            old.start_web()
            old.start_worker()

            def send(i: int) -> None:
                response = old.send({"from_email": "noreply@example.org", "to": [f"u{i}@example.com"],
                                     "subject": f"burst {i}", "text": "body"})
                assert response.status_code == 202, response.text
                with lock:
                    accepted.append(response.json()["id"])

            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(send, i) for i in range(BURST)]
                wait_until(lambda: len(accepted) >= 300, timeout=180, what="300 accepted sends")
                with lock:
                    before_backup = set(accepted)
                cli(old.env, "backup", str(backup), cwd=old.cwd)
                with lock:
                    during = len(accepted) - len(before_backup)
                for future in futures:
                    future.result()
            assert len(accepted) == BURST and during > 0  # the burst went on while the backup ran
    finally:
        old.close()

    conn = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        in_backup = dict(conn.execute("SELECT id, status FROM messages").fetchall())
    finally:
        conn.close()
    assert before_backup <= in_backup.keys()
    waiting = {i for i, status in in_backup.items() if status in ("queued", "deferred", "sending")}
    assert waiting, "the backup should have caught part of the backlog still waiting"

    new = Relay(tmp_path / "new")  # a new host: a fresh data directory, the same secret
    try:
        shutil.rmtree(new.data_dir)  # Relay() ran `api-key show`, which made a store: start with nothing
        restored = cli(new.env, "restore", str(backup), cwd=new.cwd)
        assert f"{len(waiting)} waiting to be delivered" in restored.stdout
        with SmtpServer("none") as server:
            new.configure(f"smtp_port={server.port}")
            new.start_worker()
            wait_until(lambda: len(server.received) >= len(waiting), timeout=300, interval=0.2,
                       what=f"{len(waiting)} restored messages delivered")
            wait_until(lambda: new.counts().get("sent", 0) == len(in_backup), timeout=120,
                       what="every restored message recorded as sent")
            time.sleep(1)  # a second delivery of any of them would show up now
            delivered = [r.message["Message-ID"] for r in server.received]
        assert sorted(delivered) == sorted(f"<{i}@example.org>" for i in waiting)
    finally:
        new.close()
