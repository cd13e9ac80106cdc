"""A fast HTTP/1.1 load generator for loopback floods: raw asyncio sockets, keep-alive, pipelining.

httpx tops out near 340 requests a second here, too slow to send 10,000
requests in a test's time. This writes the same prepared request on many
keep-alive connections, a few requests ahead of the answers (pipelining,
which uvicorn serves in order), and reads only each answer's status line,
headers and Content-Length body. Bounded: exactly ``count`` requests, and a
timeout for the whole flood. 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field


@dataclass
class FloodResult:
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    retry_after: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def request_bytes(method: str, path: str, port: int, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


async def _connection(port: int, request: bytes, quota: list[int], result: FloodResult, depth: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            batch = min(depth, quota[0])
            if batch <= 0:
                return
            quota[0] -= batch
            writer.write(request * batch)
            await writer.drain()
            for answered in range(1, batch + 1):
                status, headers = await _read_answer(reader)
                result.statuses[status] += 1
                if "retry-after" in headers:
                    result.retry_after.append(int(headers["retry-after"]))
                if headers.get("connection", "").lower() == "close":
                    quota[0] += batch - answered  # the rest of this batch went unanswered: send again
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    break
    finally:
        writer.close()


def flood(port: int, request: bytes, count: int, connections: int = 32, depth: int = 4,
          timeout: float = 120.0) -> FloodResult:
    """Send ``request`` ``count`` times over ``connections`` keep-alive connections.

    The flood runs its own event loop in a thread of its own: the caller's
    thread may already have a loop running (Playwright's sync API, kept alive
    by the browser tests' session fixture, leaves one in the main thread,
    where ``asyncio.run`` refuses to start).
    """
    outcome: list[FloodResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(_flood(port, request, count, connections, depth, timeout)))
        except BaseException as error:  # handed to the caller's thread below
            outcome.append(error)

    thread = threading.Thread(target=run, name="flood")
    thread.start()
    thread.join(timeout + 10)
    if not outcome:
        raise TimeoutError(f"the flood did not end within {timeout + 10:.0f} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


async def _flood(port: int, request: bytes, count: int, connections: int, depth: int,
                 timeout: float) -> FloodResult:
    result = FloodResult()
    quota = [count]
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(_connection(port, request, quota, result, depth)
                                            for _ in range(connections))), timeout)
    result.seconds = time.monotonic() - started
    return result
