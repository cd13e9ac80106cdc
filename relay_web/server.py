"""Serving the app with uvicorn (uvloop + httptools, no access log: it halves throughput).

The socket comes from the command line (`tspro-relay web` binds it; `run` binds it once and hands it to
each web process it starts), so a replaced web process never closes the port.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import socket

import uvicorn

from relay_core.config import Settings
from relay_core.logs import setup_logging
from relay_core.store import Store
from relay_core.tasks import check_queue

from .app import create_app
from .http_limits import LimitedHttpToolsProtocol

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def _return_large_buffers_to_the_os() -> None:
    """Keep glibc from caching freed multi-megabyte buffers on the heap (its mmap threshold
    rises after a large free): peak RSS for one 20 MiB attachment drops by about 60 MiB."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


GC_YOUNG_THRESHOLD = 20_000  # allocations between collections of the youngest generation (Python's: 700)


def _collect_garbage_less_often() -> None:
    """Spend less of the accept path in the cyclic garbage collector.

    With the default thresholds a young collection ran every few requests and a
    full one every few hundred. Called after start-up, so what exists then is
    frozen out of the walks; sends make no reference cycles.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


DRAIN_SECONDS = 0.5  # between no longer accepting and closing idle connections


class _Server(uvicorn.Server):
    """uvicorn's server, which tells its parent when it serves (a byte on ``ready_fd``) and stops
    without dropping a request that had just arrived."""

    def __init__(self, config: uvicorn.Config, ready_fd: int | None) -> None:
        super().__init__(config)
        self.ready_fd = ready_fd

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.ready_fd is not None:
            os.write(self.ready_fd, b"ready")
            os.close(self.ready_fd)
            self.ready_fd = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn closes every connection without a request in progress at once, and one accepted
        # just before the stop may not have been read yet: its client would see the connection
        # drop. Stop accepting first (the socket stays open in the supervisor, so new connections
        # wait for the next web process) and give what was accepted time to arrive.
        for server in getattr(self, "servers", []):
            server.close()
        await asyncio.sleep(DRAIN_SECONDS)
        await super().shutdown(sockets)


def serve(settings: Settings, sock: socket.socket, ready_fd: int | None = None) -> int:
    setup_logging(settings)
    _return_large_buffers_to_the_os()
    check_queue(settings)  # before uvicorn: a bad queue, secret or data dir stops us with one sentence
    store = Store.open(settings)
    config = uvicorn.Config(
        create_app(settings, store), loop="uvloop", http=LimitedHttpToolsProtocol,
        access_log=False, log_config=None, log_level=settings.log_level.lower(),
        proxy_headers=False, server_header=False, timeout_graceful_shutdown=10,
    )
    _collect_garbage_less_often()
    try:
        _Server(config, ready_fd).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C after its graceful shutdown; that is a clean stop
    finally:
        store.shutdown()
    return 0
