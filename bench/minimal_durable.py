"""The least a durable accept must do: parse the JSON, commit the body in a group commit, answer 202.

    python bench/minimal_durable.py PORT sqlite:/path/to/file.db
    python bench/minimal_durable.py PORT postgresql://...

The yardstick bench_accept.py puts beside the relay's web process. One
Starlette route under uvicorn (uvloop, httptools, no access log: as the
relay is served) parses the body and hands it to one writer thread, which
takes everything waiting, inserts it in one transaction and commits it with
a flush to disk (SQLite WAL with ``synchronous=FULL``; PostgreSQL with
``synchronous_commit = on``), then answers the whole batch with one call
into the event loop. Only then does each request get its 202. No key,
no validation, no encryption, no queue: that is the relay's own work, and
the ratio between the two is what the benchmark reports.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import sqlite3
import sys
import threading
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

MAX_BATCH = 512
Insert = Callable[[list[tuple[str, bytes]]], None]


def sqlite_writer(path: str) -> Insert:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS accepted (id TEXT PRIMARY KEY, body BLOB NOT NULL)")

    def insert(rows: list[tuple[str, bytes]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO accepted (id, body) VALUES (?, ?)", rows)
        conn.execute("COMMIT")

    return insert


def postgres_writer(url: str) -> Insert:
    import psycopg

    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET synchronous_commit = on")
    conn.execute("CREATE TABLE IF NOT EXISTS accepted (id TEXT PRIMARY KEY, body BYTEA NOT NULL)")

    def insert(rows: list[tuple[str, bytes]]) -> None:
        with conn.transaction():
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO accepted (id, body) VALUES (%s, %s)", rows)

    return insert


class GroupCommit:
    """One writer thread; each batch is committed once and answered with one loop callback."""

    def __init__(self, insert: Insert) -> None:
        self.insert = insert
        self.jobs: queue.SimpleQueue[tuple[str, bytes, asyncio.Future[None]]] = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._run, daemon=True).start()

    async def commit(self, message_id: str, body: bytes) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = self.loop.create_future()
        self.jobs.put((message_id, body, future))
        await future

    def _run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            futures = [job[2] for job in batch]
            try:
                self.insert([(job[0], job[1]) for job in batch])
                error: BaseException | None = None
            except Exception as exc:  # noqa: BLE001  (a yardstick: answer 503, keep going)
                error = exc
            assert self.loop is not None
            self.loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def create_app(target: str) -> Starlette:
    insert = postgres_writer(target) if target.startswith("postgresql://") else sqlite_writer(
        target.removeprefix("sqlite:"))
    writer = GroupCommit(insert)
    ids = itertools.count(1)

    async def send(request: Request) -> JSONResponse:
        body = await request.body()
        payload: Any = json.loads(body)
        if not isinstance(payload, dict):
            return JSONResponse({"ok": False, "error": "not a JSON object"}, status_code=400)
        message_id = f"{next(ids):022x}"
        try:
            await writer.commit(message_id, body)
        except Exception:  # noqa: BLE001
            return JSONResponse({"ok": False, "error": "store unavailable"}, status_code=503)
        return JSONResponse({"ok": True, "id": message_id, "status": "queued"}, status_code=202)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/api/send", send, methods=["POST"]), Route("/healthz", healthz)])


if __name__ == "__main__":
    uvicorn.run(create_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop",
                http="httptools", access_log=False, log_level="warning")
