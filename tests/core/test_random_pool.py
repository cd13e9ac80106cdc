"""The accept path's random bytes (message ids, AES-GCM nonces) come from a pool filled by os.urandom:
each byte is handed out once, across threads, and a forked child never repeats its parent's."""

from __future__ import annotations

import os
import threading

from relay_core import crypto
from relay_core.message import new_message_id


def test_bytes_are_never_handed_out_twice_across_threads() -> None:
    taken: list[bytes] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [crypto.random_bytes(12) for _ in range(2000)]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 8000 and len(set(taken)) == 8000
    assert all(len(b) == 12 for b in taken)
    assert len(crypto.random_bytes(5000)) == 5000  # larger than the pool: read whole


def test_a_forked_child_does_not_repeat_its_parents_next_bytes() -> None:
    crypto.random_bytes(1)  # the pool holds unused bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next bytes and leave at once
        try:
            os.write(write, crypto.random_bytes(16))
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != crypto.random_bytes(16)


def test_message_ids_stay_time_ordered_hex_and_distinct() -> None:
    ids = [new_message_id() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert all(len(i) == 22 and int(i, 16) >= 0 for i in ids)
