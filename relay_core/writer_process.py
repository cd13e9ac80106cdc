"""The accept path's writer, in a process of its own.

Once the event loop has checked a send, the send still has to be stored:
the document sealed, the message, its recipients and its log row written,
the commit flushed to disk, a worker woken. Done by a thread of the web
process, that work holds the same GIL as the event loop, so the two take
turns on one core and a send costs the sum of both. Here a child process
with its own interpreter does it: while it commits one group of sends, the
event loop checks the next ones on the other core.

The web process's end (``WriterLink``) sends each checked send as data,
never code: the settings' revision it was checked against, its message and
log rows, the request's document. Everything one turn of the event loop
checked goes in one frame, and at most two frames are unanswered at once
(one being written, the next waiting), so under load a frame holds what
arrived while the child was busy. The child takes every frame waiting and
writes them in one transaction (group commit) that commits only if the
revision is still theirs (``Store.require_revision``: on PostgreSQL the
check, the rows and the COMMIT go in one round trip). It answers only after
the commit, then wakes the workers (a lost wake-up is repaired by the
sweeper, as before). Sends checked against a revision that has moved on
are answered ``STALE`` and written nowhere: the web checks them again.
Frames are a 4-byte length and a pickle, over a socket pair only the two
processes hold.

Only sends that need nothing but inserts come here; a send with an
Idempotency-Key or a per-key limit reads and updates rows in its
transaction and stays with the web process's own writer thread (Intake),
as does every send if the child cannot start or dies (it logs why).

The child ends when the web process closes its end. On a stop it first
writes and answers everything it was given; when the web process was
killed, it stops at the first answer nobody can receive (what it committed
is woken and delivered; what it had not taken is dropped, unanswered, as
a killed web process's unwritten sends always were).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

from . import metrics
from .acceptance import insert_accepted
from .db import ConditionFailed, Connection, is_database_error, transaction
from .errors import StoreUnavailable
from .intake import NOT_STORED, STORE_DOWN
from .ledger import LogEntry, NewMessage
from .logs import fields

logger = logging.getLogger("relay.writer")

HEADER = 4  # bytes of big-endian frame length
IN_FLIGHT = 2  # frames sent and not answered: one being written, the next waiting
OK, STALE = "ok", "stale"
WRITER_GONE = ("The relay's store writer stopped before confirming this message, so it may or may not have "
               "been stored. Try again.")


@dataclass
class Accept:
    """One checked send, as the child writes it."""

    seq: int
    revision: int
    record: NewMessage
    entry: LogEntry
    document: bytes | bytearray


def _frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(HEADER, "big") + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    size = int.from_bytes(await reader.readexactly(HEADER), "big")
    return pickle.loads(await reader.readexactly(size))


class WriterLink:
    """The web process's end: starts the child, hands it sends, settles their futures."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[str]] = {}
        self._pending: list[Accept] = []
        self._in_flight = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Whether sends should come here: from the child's OK until it ends or stop() begins.
        self.alive = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, settings: Any) -> None:
        """Start the child, not waiting for it: until it is ready, ``alive`` is false."""
        ours, theirs = socket.socketpair()
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "relay_core.writer_process", str(theirs.fileno())],
                pass_fds=[theirs.fileno()])
        self._loop = asyncio.get_running_loop()
        try:
            reader, self._writer = await asyncio.open_connection(sock=ours)
            self._writer.write(_frame((settings, metrics.process_id())))
        except BaseException:
            ours.close()
            self._proc.kill()
            self._proc.wait()
            raise
        self._reader_task = asyncio.create_task(self._read_answers(reader))

    def submit(self, revision: int, record: NewMessage, entry: LogEntry,
               document: bytes | bytearray) -> asyncio.Future[str]:
        """Store one send in the child's next group commit: the future gets OK or STALE."""
        assert self._loop is not None
        future = self._loop.create_future()
        seq = next(self._seq)
        self._waiting[seq] = future
        self._pending.append(Accept(seq, revision, record, entry, document))
        if len(self._pending) == 1 and self._in_flight < IN_FLIGHT:
            self._loop.call_soon(self._flush)  # everything this turn of the loop checks, in one frame
        return future

    def _flush(self) -> None:
        if not self._pending or self._in_flight >= IN_FLIGHT or not self.alive:
            return  # sent when an answer comes back or the child is ready (or failed if it ends)
        pending = self._pending
        try:
            data = _frame(pending)
            assert self._writer is not None
            self._writer.write(data)
        except Exception:
            logger.exception("could not hand %d message(s) to the store writer process", len(pending),
                             extra=fields("writer.handover_error", count=len(pending)))
            self._pending = []
            self._fail([send.seq for send in pending], NOT_STORED)
            return
        self._pending = []
        self._in_flight += 1

    def _fail(self, seqs: list[int], message: str) -> None:
        for seq in seqs:
            future = self._waiting.pop(seq, None)
            if future is not None and not future.done():
                future.set_exception(StoreUnavailable(message))

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            ready = await _read_frame(reader)
            if ready != OK:
                logger.error("the store writer process could not start (%s); the web process stores "
                             "messages itself", ready, extra=fields("writer.failed"))
                return
            self.alive = True
            logger.info("the store writer process is ready (pid %s)", self.pid, extra=fields("writer.ready"))
            self._flush()  # sends handed over before it was ready
            while True:
                frames, answers = await _read_frame(reader)
                self._in_flight -= frames
                self._flush()  # what waited meanwhile, as one frame
                for seq, outcome in answers:
                    future = self._waiting.pop(seq, None)
                    if future is None or future.done():
                        continue  # (a request that went away; its message, if stored, stands)
                    if outcome in (OK, STALE):
                        future.set_result(outcome)
                    else:
                        future.set_exception(StoreUnavailable(outcome))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the child ended
        finally:
            was_alive, self.alive = self.alive, False
            never_sent, self._pending = self._pending, []
            self._fail([send.seq for send in never_sent], NOT_STORED)
            self._fail(list(self._waiting), WRITER_GONE)  # sent: stored or not, nobody can say
            if not self._stopping:
                if was_alive:
                    logger.error("the store writer process stopped; the web process stores messages "
                                 "itself from now on", extra=fields("writer.stopped"))
                if self._proc is not None and self._loop is not None:
                    self._loop.run_in_executor(None, self._proc.wait)  # reaped, not left a zombie

    async def stop(self, timeout: float = 10.0) -> None:
        """Let the child write and answer what it was given, then wait for it to end. Sends made
        from here on go to the web process's own writer (``alive`` is false)."""
        self._stopping = True
        if self._writer is not None:
            if self.alive:
                self._in_flight = 0
                self._flush()
            self.alive = False
            try:
                self._writer.write_eof()  # the child's end of input; its answers still come back
            except (OSError, RuntimeError):
                pass  # it is gone already
        if self._reader_task is not None:
            try:
                await asyncio.wait_for(self._reader_task, timeout)
            except asyncio.TimeoutError:
                pass
            except Exception:
                logger.exception("the store writer's answers could not be read to the end",
                                 extra=fields("writer.error"))
        if self._writer is not None:
            self._writer.close()
        if self._proc is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


# --- the child -------------------------------------------------------------------------------


class _Frames:
    """The child's end of the socket: waits for a frame, then takes the others already sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.ended = False

    def _complete(self) -> list[Any]:
        values = []
        while len(self.buffer) >= HEADER:
            size = int.from_bytes(self.buffer[:HEADER], "big")
            if len(self.buffer) < HEADER + size:
                break
            values.append(pickle.loads(self.buffer[HEADER:HEADER + size]))
            del self.buffer[:HEADER + size]
        return values

    def _receive(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:  # the web process died with our answers unread
            chunk = b""
        if not chunk:
            self.ended = True
        self.buffer += chunk
        return bool(chunk)

    def take(self) -> list[Any]:
        """Every complete frame: waits for one, then takes the others already here. [] at the end."""
        values = self._complete()
        while not values and not self.ended:
            if self._receive():
                values = self._complete()
        self.sock.setblocking(False)
        try:
            while not self.ended and self._receive():
                pass
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return values + self._complete()


def _write(store: Any, conn: Connection, sends: list[Accept]) -> list[tuple[int, str]]:
    """One transaction for all of them; those checked against another revision are left out.

    The revision they were checked against is required in the same pipeline
    as their rows; if it has moved on (or they were checked against
    different ones), the revision is read first and the stale ones left out.
    """
    expected = sends[0].revision
    if all(send.revision == expected for send in sends):
        try:
            with transaction(conn, pipelined=True):
                store.require_revision(conn, expected)
                _insert(store, conn, sends)
            return [(send.seq, OK) for send in sends]
        except ConditionFailed:
            pass  # the settings changed since they were checked: see which are stale
    with transaction(conn, pipelined=True):
        revision = store.revision(conn, hold=True)
        fresh = [send for send in sends if send.revision == revision]
        if fresh:
            _insert(store, conn, fresh)
    return [(send.seq, OK if send.revision == revision else STALE) for send in sends]


def _insert(store: Any, conn: Connection, sends: list[Accept]) -> None:
    insert_accepted(conn, [(send.record, send.entry, send.document) for send in sends], store.keys)
    metrics.add(conn, {(metrics.ACCEPTED, ""): len(sends)})


def _write_each(store: Any, conn: Connection, sends: list[Accept]) -> list[tuple[int, str]]:
    """After a failed group: each send in a transaction of its own, so one bad row costs only itself.
    Once the store itself fails (it went away), the rest are refused without trying."""
    answers: list[tuple[int, str]] = []
    for number, send in enumerate(sends):
        try:
            answers += _write(store, conn, [send])
        except Exception as exc:
            logger.error("the store refused message %s: %s", send.record.id, exc,
                         extra=fields("writer.refused", message_id=send.record.id))
            answers.append((send.seq, STORE_DOWN))
            if _unreachable(exc):
                answers += [(later.seq, STORE_DOWN) for later in sends[number + 1:]]
                break
    return answers


def _unreachable(exc: Exception) -> bool:
    """The store cannot be reached now (as opposed to refusing one row, a deadlock or a timeout):
    PostgreSQL's connection errors (SQLSTATE class 08, or none: the client's own, a pool timeout),
    SQLite's operational errors (locked past its timeout, a file it cannot open or write)."""
    import sqlite3

    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
        return isinstance(exc, psycopg.OperationalError) and (sqlstate is None or sqlstate.startswith("08"))
    return isinstance(exc, sqlite3.OperationalError)


class _Child:
    """Take what is waiting, write it in one transaction, answer it, wake the workers; until the end."""

    def __init__(self, sock: socket.socket, store: Any, relay_queue: Any) -> None:
        self.sock = sock
        self.store = store
        self.queue = relay_queue
        self._unanswered: tuple[Callable[[], None], int] | None = None  # wake-ups sent, answer not read

    def run(self, frames: _Frames, batches: list[list[Accept]]) -> None:
        """``batches``: any that came with the settings."""
        conn = self.store.conn()
        gone = False
        while True:
            batches = batches or frames.take()
            if not batches:
                break
            sends = [send for batch in batches for send in batch]
            try:
                answers = _write(self.store, conn, sends)
            except Exception as exc:
                if not is_database_error(exc):
                    logger.exception("the store writer failed on %d message(s); writing them one by one",
                                     len(sends), extra=fields("writer.error", count=len(sends)))
                answers = _write_each(self.store, conn, sends)
            try:
                self.sock.sendall(_frame((len(batches), answers)))
            except OSError:
                gone = True  # the web process died: nobody waits for what it sent after these
            self._settle_wake_ups()
            stored = [send.record.id for send, (_, outcome) in zip(sends, answers) if outcome == OK]
            if stored:
                self._wake(stored)  # answered or not, they are stored: they are delivered
            if gone:
                break
            batches = []
        self._settle_wake_ups()

    def _wake(self, stored: list[str]) -> None:
        """One wake-up per stored message; with Redis, its answer is read after the next group."""
        try:
            self._unanswered = (self.queue.send_wake_ups(stored), len(stored))
        except Exception:
            self._lost_wake_ups(len(stored))

    def _settle_wake_ups(self) -> None:
        if self._unanswered is None:
            return
        (answer, count), self._unanswered = self._unanswered, None
        try:
            answer()
        except Exception:
            self._lost_wake_ups(count)

    @staticmethod
    def _lost_wake_ups(count: int) -> None:
        logger.exception("could not enqueue %d message(s); the sweeper will pick them up", count,
                         extra=fields("writer.enqueue_error", count=count))


def serve(sock: socket.socket) -> None:
    """The child's life: the settings (and the web process's name for its counts) first, ``OK``
    once the store is open, then sends until the end."""
    from .logs import setup_logging
    from .store import Store
    from .tasks import build_queue

    frames = _Frames(sock)
    first = frames.take()
    if not first:
        return
    (settings, process), rest = first[0], first[1:]
    setup_logging(settings)
    metrics.speak_for(process)  # its counts are the web process's
    try:
        store = Store.open(settings)
        relay_queue = build_queue(settings)
    except Exception as exc:
        sock.sendall(_frame(str(exc)))
        raise
    sock.sendall(_frame(OK))
    try:
        _Child(sock, store, relay_queue).run(frames, rest)
    finally:
        store.shutdown()


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the web process stops, then closes
    # our socket, and we finish what we were given.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
