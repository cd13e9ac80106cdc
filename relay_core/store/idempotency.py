"""Answers to Idempotency-Key requests, kept so that a retried send is answered, not sent twice."""

from __future__ import annotations

import json
import time
from typing import Any

from ..db import Connection
from .part import Part


class Idempotency(Part):
    def idempotent_answer(self, conn: Connection, api_key_id: int, key: str,
                          since: float) -> tuple[str, int, dict[str, Any]] | None:
        row = conn.execute("SELECT request_hash, status, response FROM idempotency"
                           " WHERE api_key_id = ? AND key = ? AND created_at >= ?",
                           (api_key_id, key, since)).fetchone()
        if row is None:
            return None
        return row["request_hash"], int(row["status"]), json.loads(row["response"])

    def remember_answer(self, conn: Connection, api_key_id: int, key: str, request_hash: str,
                        status: int, response: dict[str, Any], since: float) -> bool:
        """Record the answer to an Idempotency-Key, unless one newer than ``since`` is there.

        False when another request with this key got there first: on
        PostgreSQL, two web processes may race, and the second's insert waits
        for the first's commit and then does nothing.
        """
        cur = conn.execute(
            "INSERT INTO idempotency (api_key_id, key, request_hash, status, response, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (api_key_id, key) DO UPDATE SET"
            " request_hash = excluded.request_hash, status = excluded.status, response = excluded.response,"
            " created_at = excluded.created_at WHERE idempotency.created_at < ?",
            (api_key_id, key, request_hash, status, json.dumps(response), time.time(), since))
        return bool(cur.rowcount == 1)
