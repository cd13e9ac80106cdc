"""Group commit for the accept path.

Every commit waits for a flush to disk, so one writer thread takes everything
waiting, runs each job in one transaction, commits once and answers them all:
under load one fsync covers many messages; alone, a job waits for nobody.

A job with ``isolated=False`` skips its SAVEPOINT (two statements, on PostgreSQL
two round trips) by promising to raise only ``NothingWritten`` before its first
write; any other error reruns the batch with a savepoint around every job, so
one job's failure still costs only that job. Its rows go through ``write`` and
are written with the batch's others at its end. An event loop's futures are
settled in one call per batch: one wake-up of the loop, not one per request.

A job with ``durable=False`` (the worker's claims) is committed without a
flush, ahead of the batch's others: every process must see it at once, but
losing it to a power cut only repeats work, so it waits for no fsync.

``flush`` (the worker on SQLite): the writer commits without a flush, so it
never holds the write lock through an fsync, and a thread of its own flushes
the write-ahead log before the batch's callers hear of it: as durable as
``synchronous=FULL`` (the log is written in order, so a flush covers every
commit before it), but claims arriving meanwhile need not wait for the disk.
Durable jobs arriving during a flush wait for it to end, then go together in
one transaction: a busy writer still pays one commit and one flush for many.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from ..db import Connection, is_database_error, pipelined, transaction
from ..errors import StoreUnavailable
from ..logs import fields
from ..store import Store
from ..tasks import RelayQueue

logger = logging.getLogger("relay.intake")

Job = Callable[[Connection], tuple[Any, list[str]]]

# What a send that was not stored is told.
STORE_DOWN = "The relay's message store is unavailable; nothing was queued. Try again."
NOT_STORED = "The relay could not store this message; nothing was queued. Try again."


class NothingWritten(Exception):
    """A job's refusal raised before it wrote anything: no rollback is needed for it."""


_FLUSHED = object()  # the flusher's word to the writer: the flush in progress ended


def _take_waiting(waiting: queue.SimpleQueue, limit: int | None = None) -> list:
    """What ``waiting`` holds now, up to ``limit`` items, ending at the first None (a stop) if any."""
    taken: list = []
    while limit is None or len(taken) < limit:
        try:
            item = waiting.get_nowait()
        except queue.Empty:
            break
        taken.append(item)
        if item is None:
            break
    return taken


class _Rerun(Exception):
    """A job without a savepoint failed: roll the batch back and run it again, each job isolated."""


@dataclass
class _Pending:
    job: Job
    future: Future | None = None  # submit's; submit_async's callers wait on ``waiter`` instead
    isolated: bool = True
    durable: bool = True
    # Set by submit_async: the future is settled in this loop instead.
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future[Any] | None = None


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """In the event loop: answer a batch's awaiting requests (a cancelled one is skipped)."""
    for waiter, value, exc in results:
        if waiter.done():
            continue
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(value)


class GroupCommit:
    def __init__(self, store: Store, relay_queue: RelayQueue | None, max_batch: int = 512,
                 before_commit: Callable[[Connection, int], None] | None = None,
                 at_begin: Callable[[Connection], Any] | None = None,
                 writers: dict[str, Callable[[Connection, list[Any]], None]] | None = None,
                 flush: Callable[[], None] | None = None) -> None:
        self.store = store
        self.queue = relay_queue
        self.max_batch = max_batch
        self.at_begin = at_begin
        self.batch_value: Any = None  # what at_begin returned for the batch being written
        self.writers = writers or {}  # kind -> writes a list of rows of that kind (see write)
        self._deferring = False
        self._deferred: dict[str, list[Any]] = {}
        # Runs last in every batch's transaction with the number of messages it accepted.
        self.before_commit = before_commit
        self._jobs: queue.SimpleQueue[_Pending | object | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="relay-intake", daemon=True)
        self.flush = flush
        self._held: list[_Pending] = []  # durable jobs waiting for the flush in progress to end
        self._flush_busy = False
        self._flushing: queue.SimpleQueue[list | None] = queue.SimpleQueue()
        self._flusher = threading.Thread(target=self._flush_run, name="relay-flush", daemon=True)
        self.batches = 0
        self.jobs_done = 0

    def start(self) -> None:
        self._thread.start()
        if self.flush is not None:
            self._flusher.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)

    def submit(self, job: Job, isolated: bool = True, durable: bool = True) -> Future:
        """Run ``job(conn)`` in the next batch; the future holds its first return value."""
        future: Future = Future()
        self._jobs.put(_Pending(job, future, isolated=isolated, durable=durable))
        return future

    def submit_async(self, job: Job, isolated: bool = True,
                     loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Any]:
        """``submit`` for a caller on a running event loop (``isolated``: see the module docstring)."""
        loop = loop or asyncio.get_running_loop()  # (which asks the system for the process id)
        waiter = loop.create_future()
        self._jobs.put(_Pending(job, isolated=isolated, loop=loop, waiter=waiter))
        return waiter

    def _take_batch(self, first: _Pending | object) -> tuple[list[_Pending], bool]:
        taken = [first, *_take_waiting(self._jobs, self.max_batch - 1)]
        stopping = taken[-1] is None
        return [item for item in taken if isinstance(item, _Pending)], stopping

    def _run(self) -> None:
        conn = self.store.conn()
        while True:
            first = self._jobs.get()
            if first is None:
                break
            batch, stopping = self._take_batch(first)
            self._commit(conn, batch, stopping)
            if stopping:
                break
        if self.flush is not None:
            self._commit(conn, [], True)  # what it still held
            self._flushing.put(None)
            self._flusher.join()
        self.store.close()

    def _commit(self, conn: Connection, batch: list[_Pending], stopping: bool = False) -> None:
        """Light jobs first, without a flush: their callers wait for no fsync. With ``flush``, the
        durable ones wait in ``_held`` while the log is being flushed, then go together, with the
        light jobs of that moment, in one transaction: one commit and one flush for all of them."""
        light = [pending for pending in batch if not pending.durable]
        durable = [pending for pending in batch if pending.durable]
        if self.flush is None:
            for group, flushed in ((light, False), (durable, True)):
                if group:
                    self._commit_group(conn, group, flushed)
            return
        self._held += durable
        if self._held and (not self._flush_busy or stopping):
            light, self._held = light + self._held, []
        if light:
            self._commit_group(conn, light, False)

    def _commit_group(self, conn: Connection, batch: list[_Pending], durable: bool) -> None:
        """One transaction for ``batch``; answer its light jobs, and its durable ones once flushed."""
        try:
            outcomes = self._run_batch(conn, batch, durable)
        except Exception as exc:
            if is_database_error(exc):
                logger.error("the store refused a batch of %d writes: %s", len(batch), exc,
                             extra=fields("intake.store_refused", count=len(batch)))
                error = StoreUnavailable(STORE_DOWN)
            else:  # never let the writer die: every later send would wait forever
                logger.exception("the writer failed on a batch of %d writes", len(batch),
                                 extra=fields("intake.error", count=len(batch)))
                error = StoreUnavailable(NOT_STORED)
            self._settle([(pending, None, error) for pending in batch])
            return
        self.batches += 1
        flushed = [outcome for outcome in outcomes if outcome[0].durable] if not durable else []
        if flushed:
            self._flush_busy = True
            self._flushing.put(flushed)
            outcomes = [outcome for outcome in outcomes if not outcome[0].durable]
        self._answer(outcomes)

    def _flush_run(self) -> None:
        """Flush once for every batch committed since the last flush, answer them, and tell the
        writer, which holds durable jobs meanwhile."""
        assert self.flush is not None
        while True:
            first = self._flushing.get()
            if first is None:
                return
            committed = [first, *_take_waiting(self._flushing)]
            stopping = committed[-1] is None
            if stopping:
                committed.pop()
            try:
                self.flush()
            except Exception as exc:
                # Committed, but not known to be on disk: nothing that depends on them may run.
                logger.error("the store's log could not be flushed to disk: %s", exc,
                             extra=fields("intake.flush_error", count=sum(map(len, committed))))
                error = StoreUnavailable(NOT_STORED)
                for outcomes in committed:
                    self._settle([(pending, None, error) for pending, _, _, _ in outcomes])
            else:
                for outcomes in committed:
                    self._answer(outcomes)
            self._flush_busy = False
            self._jobs.put(_FLUSHED)  # (wakes the writer for what it held)
            if stopping:
                return

    def write(self, conn: Connection, kind: str, row: Any) -> None:
        """From a job: write ``row`` with ``writers[kind]``, now or with the batch's others at its end."""
        if self._deferring:
            self._deferred.setdefault(kind, []).append(row)
        else:
            self.writers[kind](conn, [row])

    def _run_batch(self, conn: Connection, batch: list[_Pending], durable: bool = True) -> list:
        """One transaction; a job's error undoes only that job (see the module docstring)."""
        try:
            return self._run_jobs(conn, batch, isolate_all=False, durable=durable)
        except _Rerun:
            return self._run_jobs(conn, batch, isolate_all=True, durable=durable)

    def _run_jobs(self, conn: Connection, batch: list[_Pending], isolate_all: bool, durable: bool) -> list:
        outcomes: list[tuple[_Pending, Any, list[str], BaseException | None]] = []
        self._deferred = {}
        with transaction(conn, durable=durable):
            self.batch_value = self.at_begin(conn) if self.at_begin is not None else None
            for pending in batch:
                if not (pending.isolated or isolate_all):
                    self._deferring = True
                    try:
                        value, ids = pending.job(conn)
                    except NothingWritten as exc:
                        outcomes.append((pending, None, [], exc))
                    except Exception as exc:
                        raise _Rerun() from exc  # it may have written part of itself: undo the batch
                    else:
                        outcomes.append((pending, value, ids, None))
                    finally:
                        self._deferring = False
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    value, ids = pending.job(conn)
                except Exception as exc:  # the job's own error goes back to its caller
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((pending, None, [], exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((pending, value, ids, None))
            deferred, self._deferred = self._deferred, {}
            accepted = sum(len(ids) for _, _, ids, exc in outcomes if exc is None)
            hook_now = self.before_commit is not None and not isolate_all
            try:
                # On PostgreSQL the batch's rows and its hook go in one round trip; an error
                # anywhere in it runs the batch again, each job and then the hook on its own.
                with pipelined(conn):
                    for kind, rows in deferred.items():
                        self.writers[kind](conn, rows)
                    if hook_now:
                        self._before_commit(conn, accepted)
            except Exception as exc:
                raise _Rerun() from exc  # which job's row failed is not known: each on its own, then
            if self.before_commit is not None and not hook_now:
                self._before_commit(conn, accepted)
        return outcomes

    def _before_commit(self, conn: Connection, accepted: int) -> None:
        """The batch hook (the metrics of the batch): its failure never costs a message."""
        assert self.before_commit is not None
        conn.execute("SAVEPOINT hook")
        try:
            self.before_commit(conn, accepted)
        except Exception:
            conn.execute("ROLLBACK TO hook")
            logger.exception("the writer's end-of-batch step failed; the batch is committed without it",
                             extra=fields("intake.hook_error"))
        conn.execute("RELEASE hook")

    @staticmethod
    def _settle(results: list[tuple[_Pending, Any, BaseException | None]]) -> None:
        """Answer each caller; a cancelled request is skipped (its row, if committed, stands)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for pending, value, exc in results:
            if pending.waiter is not None and pending.loop is not None:
                by_loop.setdefault(pending.loop, []).append((pending.waiter, value, exc))
            elif pending.future is None or pending.future.done():
                continue
            elif exc is not None:
                pending.future.set_exception(exc)
            else:
                pending.future.set_result(value)
        for loop, waiting in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, waiting)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    def _answer(self, outcomes: list) -> None:
        self.jobs_done += len(outcomes)
        to_enqueue: list[str] = []
        for pending, value, ids, exc in outcomes:
            if exc is None:
                to_enqueue.extend(ids)  # committed: wake a worker even if nobody awaits the answer
        self._settle([(pending, value, exc) for pending, value, ids, exc in outcomes])
        if self.queue is not None and to_enqueue:
            try:
                self.queue.enqueue_many(to_enqueue)
            except Exception:  # the sweeper re-enqueues whatever this misses
                logger.exception("could not enqueue %d message(s); the sweeper will pick them up",
                                 len(to_enqueue), extra=fields("intake.enqueue_error", count=len(to_enqueue)))
