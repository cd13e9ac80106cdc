"""Accept latencies, known only after their group commit, written into the metrics with a later one
(or within a few seconds when no request comes)."""

from __future__ import annotations

import threading

from relay_core.db import Connection
from relay_core.store.metrics import add, observations


class LatencyBuffer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: list[float] = []

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def drain(self, conn: Connection, with_them: dict[tuple[str, str], float] | None = None) -> None:
        """Write what was measured (and ``with_them``, other deltas, in the same statement)."""
        with self._lock:
            values, self._values = self._values, []
        deltas = dict(with_them or {})
        if values:
            deltas.update(observations("accept_duration_seconds", values))
        if deltas:
            try:
                add(conn, deltas)
            except BaseException:
                with self._lock:
                    self._values[:0] = values  # not written: keep them for the next commit
                raise
