"""The group-commit writer's batches: jobs without a savepoint, the rerun when one of them fails,
the value read at the start of each batch, and the batch answered in one call into an event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import pytest

from relay_core.intake.group_commit import GroupCommit, NothingWritten
from relay_core.store import LogEntry, NewMessage, Store

pytestmark = pytest.mark.backends


def note(name: str, calls: list[str], fail: BaseException | None = None) -> Callable[[Any], Any]:
    """A job writing one audit-free row (a meta entry) and then, maybe, failing."""
    def job(conn):  # type: ignore[no-untyped-def]
        calls.append(name)
        if isinstance(fail, NothingWritten):
            raise fail
        conn.execute("INSERT INTO meta (name, value) VALUES (?, 'x')", (f"test-{name}",))
        if fail is not None:
            raise fail
        return name, []
    return job


def accepted(message_id: str) -> tuple[NewMessage, LogEntry, bytes]:
    """An accepted message as the web hands it to be stored: its row, its log row, its document."""
    now = time.time()
    return (NewMessage(message_id, "api", None, now, "a@example.org", "", "a@example.org", "s", "<x@y>",
                       b"", 8, ["b@example.com", "c@example.com"]),
            LogEntry("accepted", "queued", message_id=message_id, sender="a@example.org",
                     recipients="b@example.com, c@example.com", subject="s", ts=now),
            f"doc of {message_id}".encode())


def rows(store: Store) -> set[str]:
    return {r[0] for r in store.conn().execute("SELECT name FROM meta WHERE name LIKE 'test-%'")}


def run_batch(store: Store, jobs: list[tuple[Callable[[Any], Any], bool]], **kwargs: Any) -> tuple[GroupCommit, list[Any]]:
    """Submit every job before the writer starts, so they form one batch."""
    intake = GroupCommit(store, None, **kwargs)
    futures = [intake.submit(job, isolated=isolated) for job, isolated in jobs]
    intake.start()
    try:
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(10))
            except Exception as exc:  # noqa: BLE001  (the job's own error, as its caller sees it)
                outcomes.append(exc)
    finally:
        intake.stop()
    return intake, outcomes


def test_jobs_without_savepoints_commit_together(store: Store) -> None:
    calls: list[str] = []
    intake, outcomes = run_batch(store, [(note("a", calls), False), (note("b", calls), False)])
    assert outcomes == ["a", "b"] and calls == ["a", "b"] and intake.batches == 1
    assert rows(store) == {"test-a", "test-b"}


def test_a_refusal_before_writing_costs_only_its_job(store: Store) -> None:
    calls: list[str] = []
    refusal = NothingWritten("not now")
    _, outcomes = run_batch(store, [(note("a", calls), False), (note("b", calls, refusal), False),
                                    (note("c", calls), False)])
    assert outcomes == ["a", refusal, "c"]
    assert calls == ["a", "b", "c"]  # no rerun
    assert rows(store) == {"test-a", "test-c"}


def test_a_failure_after_writing_reruns_the_batch_with_each_job_isolated(store: Store) -> None:
    calls: list[str] = []
    error = ValueError("half written")
    _, outcomes = run_batch(store, [(note("a", calls), False), (note("b", calls, error), False),
                                    (note("c", calls), True)])
    assert outcomes == ["a", error, "c"]
    assert calls == ["a", "b", "a", "b", "c"]  # the first pass stopped at b and was rolled back
    assert rows(store) == {"test-a", "test-c"}  # b's half-written row is gone, a's is there once


def test_at_begin_is_read_once_per_batch_in_its_transaction(store: Store) -> None:
    seen: list[Any] = []
    begun: list[int] = []

    def at_begin(conn):  # type: ignore[no-untyped-def]
        begun.append(1)
        return store.revision(conn)

    intake_holder: list[GroupCommit] = []

    def job(conn):  # type: ignore[no-untyped-def]
        seen.append(intake_holder[0].batch_value)
        return None, []

    intake = GroupCommit(store, None, at_begin=at_begin)
    intake_holder.append(intake)
    futures = [intake.submit(job) for _ in range(3)]
    intake.start()
    try:
        for future in futures:
            future.result(10)
    finally:
        intake.stop()
    assert begun == [1] and seen == [store.revision()] * 3


def test_an_event_loop_caller_gets_its_answer_and_a_cancelled_one_is_skipped(store: Store) -> None:
    calls: list[str] = []
    intake = GroupCommit(store, None)

    async def main() -> list[Any]:
        first = intake.submit_async(note("a", calls))
        second = intake.submit_async(note("b", calls), isolated=False)
        first.cancel()  # the client went away: its row still stands
        intake.start()
        return [await second, first.cancelled()]

    # A loop of its own in a thread of its own: after the browser tests, Playwright's sync API
    # leaves a loop running in the main thread, where asyncio.run refuses to start.
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(asyncio.run(main())))
    try:
        runner.start()
        runner.join(30)
        assert results == [["b", True]]
    finally:
        intake.stop()
    assert rows(store) == {"test-a", "test-b"}


@pytest.mark.parametrize("isolated", [True, False])
def test_a_database_error_in_a_job_reaches_only_its_caller(store: Store, isolated: bool) -> None:
    calls: list[str] = []

    def broken(conn):  # type: ignore[no-untyped-def]
        conn.execute("INSERT INTO no_such_table VALUES (1)")
        return None, []

    _, outcomes = run_batch(store, [(note("a", calls), False), (broken, isolated), (note("c", calls), False)])
    assert outcomes[0] == "a" and outcomes[2] == "c" and isinstance(outcomes[1], Exception)
    assert rows(store) == {"test-a", "test-c"}


def test_rows_handed_to_write_are_written_together_at_the_end_of_the_batch(store: Store) -> None:
    written: list[list[str]] = []

    def writer(conn, rows):  # type: ignore[no-untyped-def]
        written.append(list(rows))
        conn.executemany("INSERT INTO meta (name, value) VALUES (?, 'x')", [(f"test-{r}",) for r in rows])

    def job(name: str) -> Callable[[Any], Any]:
        def run(conn):  # type: ignore[no-untyped-def]
            holder[0].write(conn, "row", name)
            return name, []
        return run

    holder: list[GroupCommit] = []
    intake = GroupCommit(store, None, writers={"row": writer})
    holder.append(intake)
    futures = [intake.submit(job("a"), isolated=False), intake.submit(job("b"), isolated=True),
               intake.submit(job("c"), isolated=False)]
    intake.start()
    try:
        assert [f.result(10) for f in futures] == ["a", "b", "c"]
    finally:
        intake.stop()
    assert written == [["b"], ["a", "c"]]  # an isolated job writes at once, the others at the end together
    assert rows(store) == {"test-a", "test-b", "test-c"}


def test_a_batch_write_that_fails_is_retried_row_by_row_and_fails_only_its_job(store: Store) -> None:
    def writer(conn, rows):  # type: ignore[no-untyped-def]
        for r in rows:
            if r == "bad":
                raise ValueError("this row cannot be written")
            conn.execute("INSERT INTO meta (name, value) VALUES (?, 'x')", (f"test-{r}",))

    holder: list[GroupCommit] = []

    def job(name: str) -> Callable[[Any], Any]:
        def run(conn):  # type: ignore[no-untyped-def]
            holder[0].write(conn, "row", name)
            return name, []
        return run

    intake = GroupCommit(store, None, writers={"row": writer})
    holder.append(intake)
    futures = [intake.submit(job(n), isolated=False) for n in ("a", "bad", "c")]
    intake.start()
    try:
        assert futures[0].result(10) == "a" and futures[2].result(10) == "c"
        with pytest.raises(ValueError):
            futures[1].result(10)
    finally:
        intake.stop()
    assert rows(store) == {"test-a", "test-c"}


def test_accepted_messages_written_together_and_a_duplicate_fails_only_its_own(store: Store) -> None:
    """acceptance.insert_accepted as the web's writer (one pipeline on PostgreSQL): a row the database
    refuses (here a message id taken twice) costs only its job once the batch runs again isolated."""
    from relay_core.intake.acceptance import insert_accepted

    holder: list[GroupCommit] = []

    def job(message_id: str) -> Callable[[Any], Any]:
        def run(conn):  # type: ignore[no-untyped-def]
            holder[0].write(conn, "accepted", accepted(message_id))
            return message_id, [message_id]
        return run

    intake = GroupCommit(store, None, writers={"accepted": lambda conn, rows: insert_accepted(conn, rows, store.keys)})
    holder.append(intake)
    futures = [intake.submit(job(i), isolated=False) for i in ("m1", "m2", "m1", "m3")]
    intake.start()
    try:
        assert [futures[i].result(10) for i in (0, 1, 3)] == ["m1", "m2", "m3"]
        with pytest.raises(Exception):
            futures[2].result(10)
    finally:
        intake.stop()
    conn = store.conn()
    assert sorted(r[0] for r in conn.execute("SELECT id FROM messages")) == ["m1", "m2", "m3"]
    assert conn.execute("SELECT COUNT(*) FROM recipients").fetchone()[0] == 6
    assert conn.execute("SELECT COUNT(*) FROM log WHERE event = 'accepted'").fetchone()[0] == 3
    assert conn.execute("SELECT SUM(n) FROM log_counts WHERE kind = 'accepted'").fetchone()[0] == 3
    # Sealed by the writer, each bound to its own id (the rerun sealed the survivors again).
    for message_id, body in conn.execute("SELECT id, body FROM messages"):
        assert store.keys.decrypt_body(bytes(body), message_id) == f"doc of {message_id}".encode()


def test_a_failing_end_of_batch_step_costs_no_job(store: Store) -> None:
    """The batch hook (the metrics) writes, then fails: on PostgreSQL it shares the batch's round trip,
    so its error undoes the batch, which runs again; every job is committed without the hook's row."""
    calls: list[str] = []
    hooks: list[int] = []

    def hook(conn, accepted):  # type: ignore[no-untyped-def]
        hooks.append(accepted)
        conn.execute("INSERT INTO meta (name, value) VALUES ('test-hook', 'x')")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    def deferred(name: str) -> Callable[[Any], Any]:
        def job(conn):  # type: ignore[no-untyped-def]
            calls.append(name)
            holder[0].write(conn, "meta", name)
            return name, [name]
        return job

    def write_meta(conn, names):  # type: ignore[no-untyped-def]
        conn.insert_rows("INSERT INTO meta (name, value) VALUES (?, 'x')", [(f"test-{n}",) for n in names])

    holder: list[GroupCommit] = []
    intake = GroupCommit(store, None, before_commit=hook, writers={"meta": write_meta})
    holder.append(intake)
    futures = [intake.submit(deferred(n), isolated=False) for n in ("a", "b")]
    futures.append(intake.submit(note("c", calls)))
    intake.start()
    try:
        assert [f.result(10) for f in futures] == ["a", "b", "c"]
    finally:
        intake.stop()
    assert intake.batches == 1 and hooks and all(n == 2 for n in hooks)
    assert rows(store) == {"test-a", "test-b", "test-c"}  # and no test-hook: its writes were undone
