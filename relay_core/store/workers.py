"""Worker heartbeats: which workers are alive, for the health check and the dashboard."""

from __future__ import annotations

import time

from ..db import transaction
from .part import Part


class Workers(Part):
    def heartbeat(self, name: str, pid: int, host: str, started_at: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        conn = self.conn()
        with transaction(conn):
            conn.execute(
                "INSERT INTO workers (name, pid, host, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (name, pid, host, started_at, now),
            )

    def forget(self, name: str) -> None:
        conn = self.conn()
        with transaction(conn):
            conn.execute("DELETE FROM workers WHERE name = ?", (name,))

    def last_heartbeat(self) -> float | None:
        row = self.conn().execute("SELECT MAX(heartbeat_at) FROM workers").fetchone()
        return row[0] if row else None

    def heartbeats(self, names: list[str]) -> dict[str, float]:
        if not names:
            return {}
        marks = ", ".join("?" for _ in names)
        rows = self.conn().execute(f"SELECT name, heartbeat_at FROM workers WHERE name IN ({marks})",
                                   names).fetchall()
        return {r[0]: r[1] for r in rows}
