"""One delivery attempt: claim, send, record — and decide what happens next.

``Deliverer.attempt(message_id)`` is safe to run any number of times for one
id: only a successful claim leads to SMTP, and only the lease holder records
the outcome. The retry policy is in docs/architecture.md (Retries).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from ..store import metrics
from . import oauth
from ..intake.acceptance import insert_logs
from ..crypto import DecryptionError
from ..db import Connection
from ..errors import RelayError
from ..intake.group_commit import GroupCommit
from ..store.ledger import AttemptOutcome, claim_message, record_outcome
from ..logs import fields
from ..message import is_rendered_mime, parse_stored, read_stored
from .mime import build_mime
from ..options import Options
from .smtp import DeliveryError, DeliveryResult, Mailer, RecipientResult, Target, retry_hint
from ..store import ClaimedMessage, LogEntry, Paced, Recipient, Store

logger = logging.getLogger("relay.delivery")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@dataclass
class Outcome:
    message_id: str
    status: str  # sent, partial, deferred, failed
    next_attempt_at: float | None
    detail: str
    stored: Future[bool] | None = None  # its commit, when attempt() returned before it (None: stored)

    def then(self, action: Callable[[], object]) -> None:
        """Run ``action`` once the outcome is stored (now, if it is): what depends on it waits for it.
        Never, if it could not be stored: the message's lease runs out and it is taken again."""
        if self.stored is None:
            action()
            return

        def run(stored: Future[bool]) -> None:
            if stored.exception() is None and stored.result():
                try:
                    action()
                except Exception:
                    logger.exception("the step after storing %s's outcome failed", self.message_id,
                                     extra=fields("delivery.after_error", message_id=self.message_id))

        self.stored.add_done_callback(run)


def backoff_delay(attempt: int, options: Options, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1 = the first retry), with ±15% jitter."""
    delay = min(float(options.retry_max_seconds), options.retry_base_seconds * 2.0 ** (attempt - 1))
    return delay * rng.uniform(0.85, 1.15)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# Writer threads on PostgreSQL (see DeliveryWrites), from bench/bench_delivery.py's drain.
POSTGRES_WRITERS = 3
PAUSED = "paused"  # what a claim returns while delivery is paused: nothing was claimed


def _write_attempt_logs(conn: Connection, entries: list[LogEntry]) -> None:
    """A batch's attempt log rows and their counts in the metrics, a few statements for all."""
    insert_logs(conn, entries)
    deltas: Counter[tuple[str, str]] = Counter((metrics.ATTEMPTS, e.status) for e in entries)
    deltas.update(metrics.observations("delivery_duration_seconds",
                                       [e.duration_ms / 1000.0 for e in entries if e.duration_ms is not None]))
    metrics.add(conn, dict(deltas), max(e.ts for e in entries))


class DeliveryWrites:
    """The worker's claims and outcomes, group-committed (``GroupCommit``): one flush per batch.

    Each call waits for its batch's commit, so a claim is committed before its SMTP
    transaction; the settings are the batch's, so a claim and its settings agree.
    """

    def __init__(self, store: Store, writers: int = 1, budget: RenderBudget | None = None) -> None:
        """``writers``: writer threads, each a group commit of its own, the delivery threads shared
        out between them (PostgreSQL, where batches of different transactions can be written at
        once; on SQLite one at a time, so one is best). ``budget``: what a claim's body may take."""
        self.store = store
        self.budget = budget or RenderBudget()
        # On SQLite the log is flushed apart from the commit (see intake.py): the write lock is held
        # for a commit's writes, not through its fsync.
        flush = getattr(store.database, "flush_log", None)
        self.intakes = [GroupCommit(store, None, at_begin=lambda conn: store.fresh_snapshot()[1],
                               writers={"attempt": _write_attempt_logs}, flush=flush) for _ in range(writers)]
        self._start_lock = threading.Lock()
        self._started = False
        self._local = threading.local()
        self._turns = itertools.count()

    @property
    def intake(self) -> GroupCommit:
        intake = getattr(self._local, "intake", None)
        if intake is None:
            intake = self._local.intake = self.intakes[next(self._turns) % len(self.intakes)]
        return intake

    def start(self) -> None:
        with self._start_lock:
            if not self._started:
                for intake in self.intakes:
                    intake.start()
                self._started = True

    def _submit(self, job: Callable[[Connection], object], durable: bool = True) -> Future:
        if not self._started:
            self.start()
        # Both jobs' first write is their UPDATE and nothing raises before it: no savepoint each.
        return self.intake.submit(lambda conn: (job(conn), []), isolated=False, durable=durable)

    def claim(self, message_id: str, owner: str, now: float) -> tuple[Options, ClaimedMessage | Paced | str | None]:
        """The batch's settings, and the claimed message (``PAUSED``, ``Paced`` or None: nothing to send).

        The claim is committed without a flush (a claim lost to a power cut only means the message
        is sent again, as after a crash mid-send), so a thread waits for no fsync before its SMTP
        transaction. Its body comes with it only if it fits in the render budget now; the bytes
        it takes there are the caller's to release once the attempt ends (``sealed``)."""

        intake, budget = self.intake, self.budget
        kept = [0]  # what this claim holds in the budget (a batch run again takes it anew)

        def job(conn: Connection) -> tuple[Options, ClaimedMessage | Paced | str | None]:
            budget.release(kept[0])
            kept[0] = 0
            options: Options = intake.batch_value
            if options.delivery_paused:
                return options, PAUSED
            room, held = budget.hold(options)
            claimed = None
            try:
                claimed = claim_message(conn, self.store.keys, message_id, owner, options.lease_seconds, now,
                                        options.pacing_limits, room=room)
            finally:
                if isinstance(claimed, ClaimedMessage) and claimed.sealed is not None:
                    kept[0] = len(claimed.sealed)
                budget.settle(held, kept[0])
            return options, claimed

        try:
            return self._submit(job, durable=False).result()  # type: ignore[no-any-return]
        except BaseException:
            budget.release(kept[0])
            raise

    def record(self, outcome: AttemptOutcome) -> Future[bool]:
        """The outcome's commit: True once stored, False if the lease was lost to another worker."""

        intake = self.intake

        def job(conn: Connection) -> bool:
            return record_outcome(conn, outcome, log=lambda entry: intake.write(conn, "attempt", entry))

        return self._submit(job)  # type: ignore[return-value]

    def close(self) -> None:
        for intake in self.intakes:
            intake.stop()


class Deliverer:
    """Runs attempts for one worker process; each thread keeps its own ``Mailer``."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, identity: str | None = None,
                 render_budget: int | None = None, overlap: bool = False) -> None:
        """``overlap``: a thread goes on to its next message while its last outcome commits (the
        next claim shares that batch); at most one outcome per thread is ever in flight."""
        self.store = store
        self.overlap = overlap
        self.render_budget = RenderBudget(render_budget)
        return_freed_buffers()
        self.clock = clock
        self.rng = rng or random.Random()
        self.identity = identity or worker_identity()
        self._local = threading.local()
        self._mailers: list[Mailer] = []
        self._mailers_lock = threading.Lock()
        self.leases = LeaseKeeper(store, self.clock)
        self.writes = DeliveryWrites(store, 1 if store.database.dialect == "sqlite" else POSTGRES_WRITERS,
                                     self.render_budget)
        self._target: tuple[Options, Target] | None = None  # made once per settings, not per message
        # Set when a wake-up was dropped because delivery was paused: the sweeper
        # wakes the waiting messages again as soon as the pause is lifted.
        self.dropped_while_paused = threading.Event()

    def mailer(self) -> Mailer:
        mailer = getattr(self._local, "mailer", None)
        if mailer is None:
            mailer = Mailer()
            self._local.mailer = mailer
            with self._mailers_lock:
                self._mailers.append(mailer)
        return mailer

    def close(self) -> None:
        with self._mailers_lock:
            mailers, self._mailers = self._mailers, []
        for mailer in mailers:
            mailer.close()
        self.writes.close()

    def target(self, options: Options, token: str = "") -> Target:
        """Where to deliver under these settings (the same object until they or the token change)."""
        made = self._target
        if made is None or made[0] is not options or made[1].token != token:
            made = self._target = (options, Target.from_options(options, token))
        return made[1]

    def attempt(self, message_id: str) -> Outcome | None:
        """Deliver the message if it can be claimed now; None when there was nothing to do."""
        owner = f"{self.identity}:{threading.get_ident()}"
        options, claimed = self.writes.claim(message_id, owner, self.clock())
        if claimed is PAUSED:
            # Nothing is claimed: the message stays as it is in the store, and the
            # sweeper (or `tspro-relay resume`) wakes it again once delivery resumes.
            self.dropped_while_paused.set()
            return None
        if claimed is None:
            return None
        if isinstance(claimed, Paced):
            return Outcome(message_id, "deferred", claimed.until, claimed.reason)
        pending = [r for r in claimed.recipients if r.status in ("pending", "deferred")]
        started = time.monotonic()
        self.leases.hold(claimed.id, owner, options.lease_seconds)
        held = len(claimed.sealed or b"")
        try:
            if claimed.sealed is None and claimed.sealed_size:
                # Too large for the budget's room at the claim: read once the others leave room.
                held = self.render_budget.wait_for_room(claimed.sealed_size, options)
                claimed.sealed = self.store.messages.read_body(claimed.id)
            try:
                result, error = self._transact(claimed, options, pending)
            except Exception as exc:
                # The worker's boundary: whatever went wrong, the claimed message gets an
                # outcome (and so a retry or an end) instead of waiting for its lease.
                logger.exception("unexpected error while delivering %s", claimed.id,
                                 extra=fields("delivery.error", message_id=claimed.id))
                self.mailer().close()
                result, error = None, DeliveryError(f"internal error: {type(exc).__name__}: {exc}",
                                                    stage="internal", permanent=False)
            return self._conclude(claimed, options, pending, result, error, started)
        finally:
            self.leases.release(claimed.id)
            self.render_budget.release(held)

    def _transact(self, claimed: ClaimedMessage, options: Options,
                  pending: list[Recipient]) -> tuple[DeliveryResult | None, DeliveryError | None]:
        if not options.smtp_configured:
            return None, DeliveryError("SMTP delivery is not configured (set smtp_host)", stage="connect",
                                       permanent=False)
        if "smtp_password" in self.store.unreadable_secrets:
            # Fail closed: AUTH without the password (or with a wrong one) would not do; wait for it.
            return None, DeliveryError("AUTH: the stored SMTP password cannot be decrypted with this RELAY_SECRET_KEY; "
                                       "re-enter it (`tspro-relay config set smtp_password=...` or Settings → SMTP "
                                       "delivery)", stage="AUTH", permanent=False)
        try:
            mime = render(claimed)
        except DecryptionError as exc:
            # Transient: another worker, started with the right key, can still send it.
            return None, DeliveryError(f"{exc} on this worker", stage="queue", permanent=False)
        except (ValueError, KeyError, RelayError) as exc:
            # A stored message that cannot be rendered never will be: fail it, say why.
            return None, DeliveryError(f"the stored message cannot be rendered: {exc}", stage="queue",
                                       permanent=True)
        try:
            return self._deliver(options, claimed, pending, mime, fresh=False), None
        except DeliveryError as exc:
            if not (options.uses_oauth and exc.stage == "AUTH" and exc.code is not None):
                return None, exc
        try:
            # The server refused a cached token (revoked early, or clocks apart): once more with a new one.
            return self._deliver(options, claimed, pending, mime, fresh=True), None
        except DeliveryError as exc:
            return None, exc

    def _deliver(self, options: Options, claimed: ClaimedMessage, pending: list[Recipient],
                 mime: bytes | bytearray, fresh: bool) -> DeliveryResult:
        token = ""
        if options.uses_oauth:
            try:
                token = oauth.access_token(options, self.store, fresh=fresh)
            except oauth.OAuthError as exc:
                # Transient by policy, as a refused password is: mail waits until the account is reconnected.
                raise DeliveryError(f"AUTH: {exc.message}", stage="AUTH", permanent=False) from None
        return self.mailer().deliver(self.target(options, token), claimed.envelope_from,
                                     [r.address for r in pending], mime,
                                     idle_limit=float(options.connection_idle_seconds))

    def _conclude(self, claimed: ClaimedMessage, options: Options, pending: list[Recipient],
                  result: DeliveryResult | None, error: DeliveryError | None, started: float) -> Outcome:
        results: list[RecipientResult]
        duration_ms = int((time.monotonic() - started) * 1000)
        now = self.clock()

        if error is not None or result is None:
            assert error is not None
            results = [RecipientResult(r.address, False, error.code, error.message, error.permanent)
                       for r in pending]
            stage, code, detail, retry_after = error.stage, error.code, error.message, error.retry_after
        else:
            results = result.recipients
            stage, code = result.stage, result.code
            detail, retry_after = _summary(result), None

        updates: dict[int, tuple[str, int | None, str | None]] = {}
        deferred = []
        for recipient, res in zip(pending, results):
            if res.accepted:
                updates[recipient.position] = ("sent", res.code, res.reply)
            elif res.permanent:
                updates[recipient.position] = ("failed", res.code, res.reply)
            else:
                updates[recipient.position] = ("deferred", res.code, res.reply)
                deferred.append(res)
                hint = retry_hint(res.reply)
                if hint is not None:
                    retry_after = max(retry_after or 0.0, hint)

        final_statuses = {pos: st for pos, (st, _, _) in updates.items()}
        for r in claimed.recipients:
            final_statuses.setdefault(r.position, r.status)
        next_attempt_at = None
        if deferred:
            delay = backoff_delay(claimed.attempts + 1, options, self.rng)
            if retry_after:
                delay = max(delay, retry_after)
            deadline = claimed.created_at + options.max_age_hours * 3600
            if now + delay > deadline:
                status = "partial" if any(st == "sent" for st in final_statuses.values()) else "failed"
                detail = (f"gave up after {claimed.attempts + 1} attempts over "
                          f"{(now - claimed.created_at) / 3600:.1f} h: {detail}")
                for pos, (st, c, reply) in list(updates.items()):
                    if st == "deferred":
                        updates[pos] = ("failed", c, reply)
            else:
                status = "deferred"
                next_attempt_at = now + delay
        elif any(st == "sent" for st in final_statuses.values()):
            # Some delivered, the rest refused for good: its own final state.
            status = "partial" if any(st == "failed" for st in final_statuses.values()) else "sent"
        else:
            status = "failed"

        last_error = None if status == "sent" else detail
        entry = LogEntry(
            "attempt", status, message_id=claimed.id, stage=stage, code=code, detail=detail,
            duration_ms=duration_ms, sender=claimed.from_addr,
            recipients=", ".join(r.address for r in pending), subject=claimed.subject, ts=now,
            attachments=claimed.attachments,
        )
        if self.overlap:
            self.wait_for_last_outcome()
        stored = self.writes.record(AttemptOutcome(claimed.id, claimed.lease_owner, status, next_attempt_at,
                                                   last_error, updates, entry, now))
        stored.add_done_callback(functools.partial(self._stored, claimed.id))
        if self.overlap:
            self._local.stored = stored
        else:
            stored.result()  # (raises what the store raised)
        # One line per outcome, for whoever watches the console: never a body, key or password
        # (the detail is the server's reply or the relay's own sentence).
        logger.info("message %s %s at %s%s: %s", claimed.id, status, stage, f" ({code})" if code else "",
                    _short(detail),
                    extra=fields("delivery.attempt", message_id=claimed.id, status=status, stage=stage,
                                 code=code, duration_ms=duration_ms, attempts=claimed.attempts + 1))
        return Outcome(claimed.id, status, next_attempt_at, detail, stored if self.overlap else None)

    def wait_for_last_outcome(self) -> None:
        """Until this thread's last outcome is committed (or failed: ``_stored`` said so)."""
        stored = getattr(self._local, "stored", None)
        if stored is not None:
            self._local.stored = None
            stored.exception()  # waits; the store's error, if any, is ``_stored``'s to log

    def _stored(self, message_id: str, stored: Future[bool]) -> None:
        exc = stored.exception()
        if exc is not None:
            if self.overlap:  # (otherwise attempt() raises it to its caller)
                logger.error("the outcome of %s could not be stored (%s); it is delivered again when its "
                             "lease runs out", message_id, exc, extra=fields("delivery.record_error",
                                                                              message_id=message_id))
        elif not stored.result():
            logger.warning("lease on %s was lost before its outcome was recorded", message_id,
                           extra=fields("delivery.lease_lost", message_id=message_id))


def return_freed_buffers() -> None:
    """Have glibc's malloc hand large buffers back to the system when they are freed.

    glibc raises its mmap threshold each time a large block is freed, after which
    per-thread heaps keep what they held: eight threads on 20 MiB attachments grew
    the worker by 531 MiB, by 127 MiB with the threshold fixed.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class RenderBudget:
    """Stored bytes claimed, rendered and sent at once by one worker's threads.

    A delivery holds about twice its stored message, so eight threads on the
    largest messages would hold over 500 MiB. A claim (in the writer's batch)
    brings the body only if it fits beside what the other threads keep (by
    default the budget is two of the largest admissible messages); one that
    does not stays in the store until there is room (``wait_for_room``).
    Only the claim itself holds room for the largest message, never the wait
    for its commit: holding it until then made a worker claim two at a time.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most held at once (for tests and benches)
        self._changed = threading.Condition()

    def _limit(self, options: Options) -> int:
        return self.limit if self.limit is not None else 2 * options.max_body_bytes

    def hold(self, options: Options) -> tuple[int | None, int]:
        """For one claim: the largest body it may bring now (None: any, the budget being empty)
        and what is held meanwhile; ``settle`` ends the hold."""
        largest = options.max_body_bytes
        with self._changed:
            if self.used == 0:
                self._take(largest)
                return None, largest
            room = max(0, min(largest, self._limit(options) - self.used))
            self._take(room)
            return room, room

    def settle(self, held: int, kept: int) -> None:
        """The claim is made: of what it held, it keeps ``kept`` (its body)."""
        with self._changed:
            self._take(kept - held)

    def wait_for_room(self, size: int, options: Options) -> int:
        """Take ``size`` once it fits beside the others (or alone); ``release`` it later."""
        limit = self._limit(options)
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + size <= limit)
            self._take(size)
        return size

    def release(self, size: int) -> None:
        with self._changed:
            self._take(-size)

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)
        if size < 0:
            self._changed.notify_all()


class LeaseKeeper:
    """Renews the leases of deliveries in progress, so a slow server (100 slow RCPT
    replies, a large DATA) never lets another worker take a message mid-send.

    Past ``MAX_ATTEMPT_SECONDS`` a stuck delivery is no longer renewed.
    """

    MAX_ATTEMPT_SECONDS = 3600.0

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self._held: dict[str, tuple[str, float, float]] = {}  # id -> (owner, lease, started)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, message_id: str, owner: str, lease_seconds: float) -> None:
        with self._lock:
            self._held[message_id] = (owner, lease_seconds, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="relay-leases", daemon=True)
                self._thread.start()

    def release(self, message_id: str) -> None:
        with self._lock:
            self._held.pop(message_id, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                held = dict(self._held)
            shortest = min((lease for _, lease, _ in held.values()), default=30.0)
            time.sleep(max(shortest / 3, 0.5))
            with self._lock:
                due = [(mid, owner, lease) for mid, (owner, lease, started) in self._held.items()
                       if time.monotonic() - started < self.MAX_ATTEMPT_SECONDS]
            if not due:
                continue
            try:
                for lease in {lease for _, _, lease in due}:
                    self.store.messages.renew_leases([(m, o) for m, o, l in due if l == lease], self.clock() + lease)
            except Exception:
                logger.exception("could not renew delivery leases; retrying", extra=fields("delivery.lease_error"))


def render(claimed: ClaimedMessage) -> bytes | bytearray:
    """The MIME bytes for a claimed message: same Message-ID and Date on every attempt."""
    document = claimed.body
    claimed.sealed = None  # decrypted: a large ciphertext need not stay for the send
    if is_rendered_mime(document):
        return document  # accepted by a relay that stored the finished message; send it as it is
    # Each large copy of the request goes as soon as the next exists: bytes, text, parsed strings, MIME.
    request, resolved = read_stored(document)
    del document
    message = parse_stored(request, resolved)
    del request
    return build_mime(message, claimed.id, claimed.created_at)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _summary(result: DeliveryResult) -> str:
    accepted = [r for r in result.recipients if r.accepted]
    refused = [r for r in result.recipients if not r.accepted]
    if not refused:
        return f"{result.code} {result.reply}".strip()
    parts = [f"{r.address}: {r.code} {r.reply}" for r in refused]
    return f"{len(accepted)} of {len(result.recipients)} recipients accepted; refused " + "; ".join(parts)
