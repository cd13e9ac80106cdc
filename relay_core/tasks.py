"""The Huey queue: a wake-up call carrying a message id, nothing more.

The store is the truth and the sweeper re-enqueues what the queue drops, so
queue.db runs with ``synchronous=NORMAL``: a lost enqueue costs a sweep
interval, never a message, and the accept path saves an fsync.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import sqlite3
from pathlib import Path
from typing import Callable

from huey import Huey, RedisHuey
from huey.storage import RedisStorage, SqliteStorage

from . import files
from .config import ConfigError, Settings, is_shared_queue
from .db.sqlite import multi_row_inserts

DELIVER = "relay.deliver"


class RelaySqliteStorage(SqliteStorage):
    def _create_connection(self) -> sqlite3.Connection:
        conn = super()._create_connection()
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    _found = False  # whether the last dequeue found a task

    def dequeue(self) -> bytes | None:
        """One statement that takes the oldest task. Huey's own looks first without a lock, then
        selects and deletes it in a transaction of its own: five statements per task while a
        backlog drains. The look without a lock stays for an idle worker's polls, which then
        take no write lock the web's enqueues would wait for."""
        with self.db() as cursor:
            if not self._found and not cursor.execute("select 1 from task where queue = ? limit 1",
                                                      (self.name,)).fetchone():
                return None
            row = cursor.execute("delete from task where id = (select id from task where queue = ?"
                                 " order by priority desc, id limit 1) returning data", (self.name,)).fetchone()
        self._found = row is not None
        return None if row is None else bytes(row[0])

    def enqueue_many(self, items: list[bytes]) -> None:
        """One transaction for a batch of wake-up calls (the web's group commit), few statements."""
        with self.db(commit=True) as cursor:
            for statement, params in multi_row_inserts("insert into task (queue, data, priority) values (?, ?, 0)",
                                                       [(self.name, self.to_blob(data)) for data in items]):
                cursor.execute(statement, params)


class Unrevoked:
    """Huey without task revocation, which the relay never uses (a wake-up no longer wanted fails
    its claim in the store): huey would look for a revocation before every task and clear it
    after, a read and a write of the queue per message."""

    def is_revoked(self, task: object, timestamp: object = None, peek: bool = True) -> bool:
        return False

    def delete(self, key: str) -> bool:
        return False  # (huey deletes only revocations and results here; the relay keeps no results)


class RelayHuey(Unrevoked, Huey):
    pass


class RelayRedisHuey(Unrevoked, RedisHuey):
    pass


class RelayQueue:
    """The queue both processes share; the worker binds the handler that runs tasks."""

    def __init__(self, huey: Huey) -> None:
        self.huey = huey
        self._handler: Callable[[str], object] | None = None

        @huey.task(name=DELIVER)
        def deliver(message_id: str) -> None:
            if self._handler is None:
                raise RuntimeError("no delivery handler is bound in this process")
            self._handler(message_id)

        self._deliver = deliver
        # What huey would build for a wake-up, made once: each message only changes the
        # id and the argument (huey's own path costs a Task object and a uuid4 per message).
        template = huey._registry.create_message(deliver.s(""))
        fields = type(template)._fields
        self._message = type(template)._make  # (a namedtuple: _replace would cost more than the pickling)
        self._between = tuple(template[1:fields.index("args")])  # what comes between the id and the args
        self._after = tuple(template[fields.index("args") + 1:])
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{os.urandom(4).hex()}-"

    def bind(self, handler: Callable[[str], object]) -> None:
        self._handler = handler

    def enqueue(self, message_id: str, eta: float | None = None) -> None:
        if eta is None:
            self._deliver(message_id)
        else:
            # Aware, not naive: huey converts a naive eta with time.mktime, which drops
            # the fraction of a second and can wake the task up to a second early.
            self._deliver.schedule((message_id,), eta=dt.datetime.fromtimestamp(eta, dt.timezone.utc))

    def wake_up(self, message_id: str) -> bytes:
        """The task for one message, as ``huey.serialize_task`` would make it."""
        message = self._message((f"{self._id_prefix}{next(self._ids)}", *self._between, (message_id,), *self._after))
        return bytes(self.huey.serializer.serialize(message))

    def enqueue_many(self, message_ids: list[str]) -> None:
        """One wake-up per message, stored at once: one queue.db transaction, or one LPUSH."""
        items = [self.wake_up(message_id) for message_id in message_ids]
        storage = self.huey.storage
        if isinstance(storage, RelaySqliteStorage):
            storage.enqueue_many(items)
        elif type(storage) is RedisStorage and items:
            storage.conn.lpush(storage.queue_key, *items)  # what huey's enqueue does, for all of them
        else:
            for data in items:
                storage.enqueue(data)

    def pending(self) -> int:
        return int(self.huey.pending_count())

    def scheduled(self) -> int:
        return int(self.huey.scheduled_count())


def check_queue(settings: Settings) -> None:
    """Refuse a queue other hosts cannot see when the store is one they can (PostgreSQL)."""
    if settings.database_url and not is_shared_queue(settings.queue_url):
        raise ConfigError(
            "RELAY_DATABASE_URL puts the store in PostgreSQL, so the web process and workers may run on "
            "different hosts, but the queue would be queue.db in this host's data directory, which they "
            "cannot share: set RELAY_QUEUE_URL=redis://host:6379/0 for every process."
        )


def build_queue(settings: Settings) -> RelayQueue:
    """SqliteHuey at $RELAY_DATA_DIR/queue.db, or Redis when RELAY_QUEUE_URL says so."""
    check_queue(settings)
    url = settings.queue_url
    if is_shared_queue(url):
        huey: Huey = RelayRedisHuey("tspro-relay", url=url, results=False, utc=True)
    else:
        if url and not url.startswith("sqlite:"):
            raise ConfigError(f"RELAY_QUEUE_URL must start with redis:// or sqlite:, not {url!r}.")
        path = url.removeprefix("sqlite:///").removeprefix("sqlite:") if url else str(settings.queue_path)
        files.private_dir(Path(path).parent)
        files.private_database(Path(path))
        huey = RelayHuey("tspro-relay", results=False, utc=True, storage_class=RelaySqliteStorage,
                         filename=path, cache_mb=4)
    return RelayQueue(huey)
