"""GET /metrics: the Prometheus text format, built from the store at scrape time.

The numbers are the store's, so any web process answers for the whole relay;
it first writes the accept latencies it still holds, so a scrape right after a
burst counts them.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from relay_core.db import Connection

from .auth import bearer_token
from .state import AppState

FLUSH_SECONDS = 5.0


def nothing(conn: Connection) -> tuple[None, list[str]]:
    """An empty write: it makes the writer run a batch, whose end writes the pending latencies."""
    return None, []


async def flush_periodically(state: AppState) -> None:
    """Latencies of the last requests reach the store within seconds, even when no request follows."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        if len(state.accept_latency):
            try:
                await state.submit(nothing)
            except Exception:  # the store is down: the next batch writes them
                pass




async def scrape(request: Request) -> Response:
    state: AppState = request.app.state.relay
    settings = state.settings
    if not settings.metrics:
        return PlainTextResponse("Metrics are off; set RELAY_METRICS=1 to serve them.\n", status_code=404)
    if settings.metrics_token is not None:
        token = bearer_token(request)
        if not token or not hmac.compare_digest(token.encode(), str(settings.metrics_token).encode()):
            return PlainTextResponse("Send the metrics token as 'Authorization: Bearer <token>'.\n",
                                     status_code=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    if len(state.accept_latency):
        await state.submit(nothing)
    from .prometheus import CONTENT_TYPE, render  # prometheus_client is loaded only where metrics are served
    body = await run_in_threadpool(render, state.store.conn)
    return Response(body, media_type=CONTENT_TYPE)
