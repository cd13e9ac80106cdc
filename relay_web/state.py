"""What the web process holds open while it runs, built in the app's lifespan."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from relay_core import __version__
from relay_core.config import Settings
from relay_core.intake import Intake, Job
from relay_core.ratelimit import RateLimiter
from relay_core.store import Store
from relay_core.tasks import RelayQueue

WORKER_STALE_SECONDS = 60


@dataclass
class AppState:
    settings: Settings
    store: Store
    queue: RelayQueue
    intake: Intake
    limiter: RateLimiter

    async def submit(self, job: Job) -> Any:
        return await asyncio.wrap_future(self.intake.submit(job))

    def health(self, detailed: bool) -> dict[str, Any]:
        if not self.intake.alive:
            raise RuntimeError("the store writer is not running")
        options = self.store.options()
        has_key = any(k.revoked_at is None for k in self.store.api_keys())
        answer: dict[str, Any] = {"ok": True, "configured": options.smtp_configured and has_key}
        if detailed:
            heartbeat = self.store.last_heartbeat()
            answer.update({
                "version": __version__,
                "smtp_configured": options.smtp_configured,
                "api_key_configured": has_key,
                "worker_alive": heartbeat is not None and time.time() - heartbeat < WORKER_STALE_SECONDS,
                "worker_heartbeat_at": heartbeat,
                "messages": self.store.counts(),
            })
        return answer
