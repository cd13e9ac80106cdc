"""What one HTTP request may make the web process hold, and for how long.

uvicorn's httptools protocol reads a request head of any size for as long as
the client likes: one endless header line grew the process by 150 MiB, and half
a head held a connection for good (h11 has a limit but serves half as many
requests). The limits and their answers are in docs/security.md; warnings are
rate-limited so a client reconnecting in a loop does not fill the disk. What
httptools cannot parse uvicorn answers itself (``send_400_response``): here
with the security headers, and our budgeted line instead of uvicorn's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from relay_core.errors import RateLimited
from relay_core.logs import fields

from .headers import api_headers

logger = logging.getLogger("relay.web")

HEAD_LIMIT = 32 * 1024  # bytes of request line and headers; browsers send 1-8 KiB
HEAD_SECONDS = 10.0
BODY_IDLE_SECONDS = 30.0
MAX_CONNECTIONS = 1000  # open at once; past it, 503 at connect (900 full heads held 35 MiB)
BUSY_RETRY_SECONDS = 2

_HEAD, _BODY, _IDLE = "head", "body", "idle"  # what the connection waits for; idle: between requests
_REFUSALS = {400: "The relay could not read this HTTP request.",
             431: "The request's headers are larger than the relay accepts ({limit} bytes).",
             408: "The request's headers did not arrive within {seconds:g} seconds.",
             503: "The relay has as many connections open as it serves at once ({connections}); try again in "
                  "a few seconds."}


class LogBudget:
    """At most ``per_minute`` warnings a minute; the rest are counted into the next one written."""

    per_minute = 10

    def __init__(self) -> None:
        self.minute, self.written, self.skipped = 0, 0, 0

    def warn(self, message: str, *args: Any, **extra: Any) -> None:
        minute = int(time.monotonic() // 60)
        if minute != self.minute:
            self.minute, self.written = minute, 0
        if self.written >= self.per_minute:
            self.skipped += 1
            return
        self.written += 1
        if self.skipped:
            message += " (and %d more refused since the last such line)"
            args, extra["skipped"], self.skipped = (*args, self.skipped), self.skipped, 0
        logger.warning(message, *args, extra=extra)


refusal_log = LogBudget()


INVALID_REQUEST = "Invalid HTTP request received."  # uvicorn's line for what httptools cannot parse


class _WithoutInvalidRequestLine(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's logger, less its line for an unparsable request: ``send_400_response`` writes a budgeted one."""

    @property
    def level(self) -> int:  # uvicorn reads it before each trace line
        return self.logger.level

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg != INVALID_REQUEST:
            super().warning(msg, *args, **kwargs)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and deadlines for head and body."""

    head_limit = HEAD_LIMIT
    head_seconds = HEAD_SECONDS
    body_idle_seconds = BODY_IDLE_SECONDS
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEAD
        self._head_bytes = 0
        self._since = 0.0  # when the head began, or the body last moved
        self._answered = False  # the app answered before the request's body ended
        self._timer: asyncio.TimerHandle | None = None
        self.logger = _WithoutInvalidRequestLine(self.logger, {})  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            self._refuse(503)  # before reading a byte: this connection holds nothing but its socket
            return
        self._enter(_HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == _BODY:
            if not self._answered:
                self._since = self.loop.time()
            super().data_received(data)
            return
        if self._phase == _IDLE:
            self._enter(_HEAD)
        room = self.head_limit - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed the head up to the limit; if it has not ended there, it is too large.
        self._head_bytes = self.head_limit
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._phase == _HEAD:
            self._refuse(431)
            return
        self.data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._enter(_BODY)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase, self._head_bytes = _IDLE, 0  # uvicorn's keep-alive timeout takes over
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase == _BODY:  # what is left of the body is not needed: it has one idle period to end
            self._answered, self._since = True, self.loop.time()

    def _enter(self, phase: str) -> None:
        self._phase, self._since, self._answered = phase, self.loop.time(), False
        if self._timer is None:
            self._timer = self.loop.call_later(self.head_seconds if phase == _HEAD else self.body_idle_seconds,
                                               self._check_deadline)

    def _check_deadline(self) -> None:
        """The one timer of a connection: act on a deadline that passed, else wait for the next."""
        self._timer = None
        if self.transport.is_closing() or self._phase == _IDLE:
            return
        if self._phase == _HEAD:
            left = self._since + self.head_seconds - self.loop.time()
        elif self.flow.read_paused:  # the app is not reading yet: the client is not the one stalling
            left = self.body_idle_seconds
            self._since = self.loop.time()
        else:
            left = self._since + self.body_idle_seconds - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._check_deadline)
        elif self._phase == _HEAD and not self._head_bytes:
            self.transport.close()  # nothing asked (a browser's spare connection): no answer, no log line
        elif self._phase == _HEAD:
            self._refuse(408)
        else:
            what = "the rest of its body did not arrive" if self._answered else "its body stopped arriving"
            refusal_log.warn("closed a connection from %s: %s within %g seconds", self._peer(), what,
                             self.body_idle_seconds, **fields("web.body_stalled", client=self._peer()))
            self.transport.close()

    def _peer(self) -> str:
        return self.client[0] if self.client else ""

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools cannot parse."""
        self._refuse(400)

    def _refuse(self, status: int) -> None:
        """Answer 400, 431, 408 or 503 in the contract's shape, with the security headers, and hang up."""
        text = _REFUSALS[status].format(limit=self.head_limit, seconds=self.head_seconds,
                                        connections=self.max_connections)
        refusal_log.warn("refused a request from %s with %d: %s", self._peer(), status, text,
                         **fields("web.head_refused", client=self._peer(), status=status))
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined head while the app still answers: no room for ours
            return
        url = getattr(self, "url", b"")  # set once a request began; at connect, the portal is the likely one
        if url.startswith((b"/api/", b"/healthz")) or status == 503:
            body, kind = json.dumps({"ok": False, "error": text}).encode(), b"application/json"
        else:
            body, kind = text.encode(), b"text/plain"
        raw = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        if status == 503:
            raw.append((b"retry-after", str(BUSY_RETRY_SECONDS).encode()))
        head = b"".join(name + b": " + value + b"\r\n" for name, value in api_headers(raw, status))
        self.transport.write(STATUS_LINE[status] + head + b"\r\n" + body)
        self.transport.close()


class BodiesBusy(RateLimited):
    """The bodies being read already fill the budget: 503, retry shortly (the server's state, not the key's)."""

    status = 503


BUDGET_BODIES = 2  # the budget is this many bodies of the largest size the settings allow (each peaks ~2x)
BUDGET_RETRY_SECONDS = 2
SMALL_BODY = 64 * 1024  # claims nothing: a portal message without attachments (~2 KB) is never refused


class BodyBudget:
    """Bytes of request bodies this process is reading or holding at once, claimed before reading.

    A body claims its declared length, so a refusal comes before a byte is read,
    never half-way. A body of at most ``SMALL_BODY`` claims nothing, so slow
    large bodies filling the budget do not stop the portal's ordinary sends.
    """

    def __init__(self) -> None:
        self.held = 0

    def claim(self, size: int, cap: int) -> int:
        """Claim ``size`` bytes (or refuse with 503); what was claimed, to give back."""
        if size <= SMALL_BODY:
            return 0
        total = BUDGET_BODIES * cap
        if self.held + size > total:
            raise BodiesBusy(f"The relay is reading as many message bodies as it holds at once ({total} bytes); "
                             f"try again in {BUDGET_RETRY_SECONDS} seconds.", retry_after=BUDGET_RETRY_SECONDS)
        self.held += size
        return size

    def release(self, size: int) -> None:
        self.held -= size
