"""A sender that behaves like the portal: one request at a time, a new connection each, no retries.

Used where the question is whether the portal would notice something (a reload, an upgrade, a
container recreated behind a proxy): every send either got its 202 or is a failure the portal's
admin would have seen.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx


class PortalSender:
    def __init__(self, url: str, key: str, per_second: float = 50.0, limit: int = 5000,
                 verify: Any = True) -> None:
        self.url, self.key, self.interval, self.limit, self.verify = url, key, 1.0 / per_second, limit, verify
        self.accepted: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PortalSender":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    @property
    def sent(self) -> int:
        return len(self.accepted) + len(self.failures)

    def _run(self) -> None:
        for i in range(self.limit):  # bounded even if nobody stops it
            if self._stop.is_set():
                return
            started = time.monotonic()
            payload = {"from_email": "noreply@example.org", "from_name": "", "to": [f"member{i}@example.com"],
                       "subject": f"Reset your password ({i})", "text": "Follow the link to reset it."}
            try:
                response = httpx.post(f"{self.url}/api/send", json=payload, timeout=30, verify=self.verify,
                                      headers={"Authorization": f"Bearer {self.key}"})
                if response.status_code == 202 and response.json().get("ok"):
                    self.accepted.append(response.json()["id"])
                else:
                    self.failures.append(f"send {i}: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                self.failures.append(f"send {i}: {type(exc).__name__}: {exc}")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` more sends than now have been made."""
        target = self.sent + count
        deadline = time.monotonic() + timeout
        while self.sent < target and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.sent >= target, f"only {self.sent} of {target} sends made in {timeout} s"
