"""Wake-ups as the web's writer enqueues them: built once per message without huey's Task path,
stored in one go (one queue.db transaction, one LPUSH on Redis), read by a consumer as huey's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_core.config import load_settings
from relay_core.tasks import RelayQueue, build_queue
from services import RedisServer
from support import SECRET


@pytest.fixture(params=["sqlite", "redis"])
def relay_queue(request: pytest.FixtureRequest, tmp_path: Path) -> RelayQueue:
    env = {"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "data")}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        env["RELAY_QUEUE_URL"] = server.fresh_url()
    return build_queue(load_settings(env))


def drain(relay_queue: RelayQueue) -> list[str]:
    """Run every queued task the way a consumer does; the message ids handled, in order."""
    handled: list[str] = []
    relay_queue.bind(handled.append)
    huey = relay_queue.huey
    for _ in range(100):
        task = huey.dequeue()
        if task is None:
            break
        huey.execute(task)
    return handled


def test_a_batch_of_wake_ups_is_delivered_in_order_as_huey_tasks(relay_queue: RelayQueue) -> None:
    ids = [f"m{i:02d}" for i in range(20)]
    relay_queue.enqueue_many(ids)
    assert relay_queue.pending() == 20  # one task per message: the sweeper compares this with the store
    assert drain(relay_queue) == ids


def test_a_wake_up_reads_back_as_the_task_huey_would_have_made(relay_queue: RelayQueue) -> None:
    huey = relay_queue.huey
    ours = huey.deserialize_task(relay_queue.wake_up("abc"))
    theirs = huey.deserialize_task(huey.serialize_task(relay_queue._deliver.s("abc")))
    assert type(ours) is type(theirs)
    for field in ("args", "kwargs", "eta", "retries", "retry_delay", "priority", "expires", "name"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.id != huey.deserialize_task(relay_queue.wake_up("abc")).id  # a task id per wake-up


def test_wake_ups_mix_with_single_and_scheduled_enqueues(relay_queue: RelayQueue) -> None:
    relay_queue.enqueue("first")
    relay_queue.enqueue_many(["second", "third"])
    relay_queue.enqueue_many([])  # an empty batch stores nothing
    relay_queue.enqueue("fourth")
    assert drain(relay_queue) == ["first", "second", "third", "fourth"]
