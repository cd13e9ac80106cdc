"""What the web process holds open while it runs, built in the app's lifespan."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from relay_core.config import Settings
from relay_core.db import Connection
from relay_core.intake.group_commit import GroupCommit, Job
from .latency import LatencyBuffer
from .refusal_gate import RefusalGate
from relay_core.store import Store
from relay_core.tasks import RelayQueue

from .http_limits import BodyBudget

PASSWORD_CHECKS_AT_ONCE = 2  # each costs 19 MiB and ~30 ms of a CPU (Argon2id)


@dataclass
class AppState:
    settings: Settings
    store: Store
    queue: RelayQueue
    intake: GroupCommit
    refusals: RefusalGate = field(default_factory=RefusalGate)
    bodies: BodyBudget = field(default_factory=BodyBudget)  # request bodies being read at once
    accept_latency: LatencyBuffer = field(default_factory=LatencyBuffer)
    # Sign-in's password checks running now (admin.signin.check_password): beyond these, refused.
    password_checks: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(PASSWORD_CHECKS_AT_ONCE))
    _key_uses: dict[int, float] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None  # the app's, once it runs (the send path's submits)

    def note_key_use(self, key_id: int, now: float | None = None) -> None:
        """Record an API key's use, at most once a minute per key, through the group-commit writer."""
        now = time.time() if now is None else now
        if now - self._key_uses.get(key_id, 0.0) < 60:
            return
        self._key_uses[key_id] = now
        store = self.store

        def record(conn: Connection) -> tuple[None, list[str]]:
            store.api_keys.note_use(conn, key_id, now)
            return None, []

        self.intake.submit(record)

    def flush_refusals(self) -> Future[Any] | None:
        """Hand the refusals counted since the last flush to the group-commit writer, as one job."""
        made = self.refusals.job(self.store)
        if made is None:
            return None
        batch, job = made
        future = self.intake.submit(job)

        def done(finished: Future[Any]) -> None:
            self.refusals.written(batch, None if finished.exception() else finished.result())

        future.add_done_callback(done)
        return future

    async def submit(self, job: Job, isolated: bool = True) -> Any:
        return await self.intake.submit_async(job, isolated, self.loop)

    def health(self) -> dict[str, Any]:
        """/healthz: a liveness probe; no secrets, no hostnames (/api/health judges delivery)."""
        if not self.intake.alive:
            raise RuntimeError("the store writer is not running")
        options = self.store.options()
        has_key = any(k.revoked_at is None for k in self.store.api_keys.all())
        return {"ok": True, "configured": options.smtp_configured and has_key}
