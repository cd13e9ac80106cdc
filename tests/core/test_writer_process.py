"""The accept path's writer process (relay_core/writer_process.py), on both backends, as the web
process drives it: a real child process, a real store and queue; nothing is mocked.

Sends handed over in one turn of the event loop are committed together and answered only after the
commit; one checked against settings that have changed since is answered STALE and stored nowhere;
a row the store refuses costs only its own send; and the child's death fails what waits on it
instead of leaving it hanging. Then, with real `tspro-relay web` processes: a web process whose
child died stores sends itself, and a killed web process leaves no child behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from relay_core import metrics
from relay_core.config import Settings, load_settings
from relay_core.errors import StoreUnavailable
from relay_core.store import Store
from relay_core.tasks import build_queue
from relay_core.writer_process import NOT_STORED, OK, STALE, WRITER_GONE, WriterLink, _unreachable
from support import Relay, wait_until
from test_intake import accepted


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def with_link(settings: Settings, scenario: Callable[[WriterLink], Awaitable[Any]]) -> Any:
    """Run ``scenario`` against a started child; the child is stopped (and waited for) after it."""
    async def main() -> Any:
        link = WriterLink()
        await link.start(settings)
        try:
            return await scenario(link)
        finally:
            await link.stop()
    return asyncio.run(main())


async def settle(futures: list[asyncio.Future[str]]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)


def submit(link: WriterLink, revision: int, *message_ids: str) -> list[asyncio.Future[str]]:
    """Hand sends over in one turn of the event loop: they travel as one frame."""
    return [link.submit(revision, *accepted(message_id)) for message_id in message_ids]


def stored(store: Store) -> list[str]:
    return sorted(r[0] for r in store.conn().execute("SELECT id FROM messages"))


def test_sends_are_committed_together_answered_and_their_workers_woken(store: Store, settings: Settings) -> None:
    revision = store.revision()

    async def scenario(link: WriterLink) -> list[Any]:
        return await settle(submit(link, revision, "m1", "m2", "m3", "m4", "m5"))

    assert with_link(settings, scenario) == [OK] * 5
    conn = store.conn()
    assert stored(store) == ["m1", "m2", "m3", "m4", "m5"]
    assert conn.execute("SELECT COUNT(*) FROM recipients").fetchone()[0] == 10
    assert conn.execute("SELECT COUNT(*) FROM log WHERE event = 'accepted'").fetchone()[0] == 5
    assert metrics.totals(conn)[(metrics.ACCEPTED, "")] == 5
    # Counted as the process that started the child (the web process it serves), not as itself.
    assert [r[0] for r in conn.execute("SELECT DISTINCT process FROM metric_counts WHERE name = ?",
                                       (metrics.ACCEPTED,))] == [metrics.process_id()]
    for message_id, body in conn.execute("SELECT id, body FROM messages"):  # sealed by the child
        assert store.keys.decrypt_body(bytes(body), message_id) == f"doc of {message_id}".encode()
    assert build_queue(settings).pending() == 5  # one wake-up each, on queue.db or Redis


def test_a_send_checked_against_settings_that_changed_is_stale_and_stored_nowhere(store: Store,
                                                                                   settings: Settings) -> None:
    checked = store.revision()

    async def scenario(link: WriterLink) -> tuple[list[Any], list[Any]]:
        # One frame mixing the current revision and another one: only the other is left out.
        mixed = await settle(submit(link, checked, "m1") + submit(link, checked + 7, "m2")
                             + submit(link, checked, "m3"))
        store.set_options({"allowed_from": "example.org"})  # moves the revision on
        assert store.revision() != checked
        # All checked against the old one: the revision required with the rows no longer holds.
        late = await settle(submit(link, checked, "m4", "m5"))
        return mixed, late

    mixed, late = with_link(settings, scenario)
    assert mixed == [OK, STALE, OK]
    assert late == [STALE, STALE]
    assert stored(store) == ["m1", "m3"]
    assert metrics.totals(store.conn())[(metrics.ACCEPTED, "")] == 2


def test_a_row_the_store_refuses_costs_only_its_own_send(store: Store, settings: Settings) -> None:
    revision = store.revision()

    async def scenario(link: WriterLink) -> list[Any]:
        return await settle(submit(link, revision, "m1", "m2", "m1", "m3"))  # m1 twice

    answers = with_link(settings, scenario)
    assert answers[:2] == [OK, OK] and answers[3] == OK
    assert isinstance(answers[2], StoreUnavailable)
    assert stored(store) == ["m1", "m2", "m3"]
    assert store.keys.decrypt_body(bytes(store.conn().execute("SELECT body FROM messages WHERE id = 'm1'")
                                         .fetchone()[0]), "m1") == b"doc of m1"


def test_when_the_child_dies_what_waits_on_it_fails_and_the_link_says_so(store: Store, settings: Settings) -> None:
    revision = store.revision()

    async def scenario(link: WriterLink) -> tuple[list[Any], list[Any]]:
        before = await settle(submit(link, revision, "m1"))
        assert link.alive and link.pid is not None
        os.kill(link.pid, signal.SIGKILL)
        after = await settle(submit(link, revision, "m2"))
        return before, after

    before, after = with_link(settings, scenario)
    assert before == [OK]
    assert isinstance(after[0], StoreUnavailable) and after[0].message == WRITER_GONE
    assert stored(store) == ["m1"]


def test_a_child_that_cannot_open_the_store_fails_its_sends_and_says_why(settings: Settings,
                                                                       tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the data directory should be")
    broken = dataclasses.replace(settings, data_dir=blocked, database_url=None, queue_url="")

    async def scenario(link: WriterLink) -> tuple[list[Any], bool]:
        answers = await settle(submit(link, 1, "m1"))
        return answers, link.alive

    answers, alive = with_link(broken, scenario)
    # Never handed over (the child was not ready): not stored, and the answer says so.
    assert isinstance(answers[0], StoreUnavailable) and answers[0].message == NOT_STORED and not alive


def test_only_an_unreachable_store_stops_a_group_from_being_tried_one_by_one() -> None:
    import sqlite3

    import psycopg

    assert _unreachable(psycopg.OperationalError("connection refused"))  # the client's own: no SQLSTATE
    assert not _unreachable(psycopg.errors.UniqueViolation("duplicate key"))
    assert not _unreachable(psycopg.errors.DeadlockDetected("deadlock"))  # an OperationalError, class 40
    assert _unreachable(sqlite3.OperationalError("database is locked"))
    assert not _unreachable(sqlite3.IntegrityError("UNIQUE constraint failed"))


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def ended(pid: int) -> bool:
    """Gone, or exited and waiting to be reaped by init."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def payload(subject: str) -> dict[str, Any]:
    return {"from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": subject, "text": "t"}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    """A real `tspro-relay web` (SQLite) whose writer process is ready (it says so at INFO)."""
    relay = Relay(tmp_path, RELAY_LOG_LEVEL="INFO")
    try:
        relay.configure("smtp_host=127.0.0.1", "smtp_port=2525", "smtp_security=none")
        web = relay.start_web()
        wait_until(lambda: "store writer process is ready" in web.output(), timeout=20,
                   what="the web process's writer to start")
        yield relay
    finally:
        relay.close()


def send_one(relay: Relay, subject: str) -> str:
    answer = relay.send(payload(subject))
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def writer_of(relay: Relay) -> int:
    assert relay.web is not None and relay.web.proc is not None
    (child,) = children(relay.web.proc.pid)
    return child


def test_a_web_process_whose_writer_died_stores_sends_itself(relay: Relay) -> None:
    first = send_one(relay, "through the child")
    child = writer_of(relay)
    os.kill(child, signal.SIGKILL)
    web = relay.web
    assert web is not None
    wait_until(lambda: "store writer process stopped" in web.output(), timeout=10,
               what="the web process to notice its writer died")
    wait_until(lambda: not Path(f"/proc/{child}").exists(), timeout=10,
               what="the web process to reap its dead writer")
    second = send_one(relay, "through the web's own writer")
    assert [relay.status(m)["status"] for m in (first, second)] == ["queued", "queued"]


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_web_process_stopped_or_killed_leaves_no_writer_behind(relay: Relay, how: str) -> None:
    message_id = send_one(relay, "one")
    child = writer_of(relay)
    assert relay.web is not None
    if how == "stopped":
        assert relay.web.stop() == 0  # Ctrl-C: the web process ends its writer before it exits
        assert not Path(f"/proc/{child}").exists()
    else:
        relay.web.kill()
        wait_until(lambda: ended(child), timeout=10, what="the writer process to end with its web process")
    store = Store.open(load_settings(relay.env))
    try:
        assert store.message_status(message_id)["status"] == "queued"
    finally:
        store.shutdown()
