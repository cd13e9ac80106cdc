"""The web application factory: one route table, a lifespan that opens the store.

Errors answer in the shape of where they happened: the contract's JSON under
/api/, an HTML error page elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from relay_core import crypto
from relay_core.config import Settings
from relay_core.crypto import DecryptionError
from relay_core.db import Connection, is_database_error
from relay_core.errors import RelayError, StoreUnavailable
from relay_core.store import metrics as relay_metrics
from relay_core.intake.group_commit import GroupCommit
from relay_core.logs import fields
from relay_core.intake.acceptance import insert_accepted
from relay_core.store import Store
from relay_core.tasks import build_queue

from . import admin, api, metrics_endpoint
from .api import ACCEPTED
from .admin.pages import error_page
from .headers import TLS_KEY, SecurityHeaders
from .latency import LatencyBuffer
from .site import Site, site_of
from .state import AppState

logger = logging.getLogger("relay.web")
REFUSAL_FLUSH_SECONDS = 1.0


def routes() -> list[BaseRoute]:
    return [
        Route("/api/send", api.send, methods=["POST"], name="api_send"),
        Route("/api/messages/{message_id}", api.message_status, methods=["GET"], name="api_message"),
        Route("/api/health", api.api_health, methods=["GET"], name="api_health"),
        Route("/api/openapi.json", api.openapi_document, methods=["GET"], name="api_openapi"),
        Route("/healthz", api.healthz, methods=["GET"], name="healthz"),
        Route("/metrics", metrics_endpoint.scrape, methods=["GET"], name="metrics"),
        *admin.routes(),
    ]


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/healthz"


async def relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    if request.url.path == "/api/send" and not exc.logged:
        await api.log_rejection(request, exc)
    if _is_api(request):
        return api.error_response(request, exc)
    return error_page(request, exc.status, exc.message)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405/413 become the contract's JSON under /api/, a page elsewhere."""
    assert isinstance(exc, HTTPException)
    if _is_api(request):
        messages = {404: "No such API endpoint.", 405: f"{request.method} is not allowed here.",
                    413: "The request body is too large."}
        text = messages.get(exc.status_code, str(exc.detail))
        return JSONResponse({"ok": False, "error": text}, status_code=exc.status_code, headers=exc.headers)
    messages = {404: "There is no page at this address.", 405: f"{request.method} is not allowed on this page.",
                413: "What was sent is too large."}
    return error_page(request, exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)


async def store_error(request: Request, exc: Exception) -> Response:
    """The store failed (the database is down, a secret cannot be read): 503, no traceback.

    Registered per class so Starlette does not re-raise: uvicorn would drop the
    connection, and a client still sending its body could get a reset.
    """
    logger.error("the store is unavailable on %s %s: %s", request.method, request.url.path, exc,
                 extra=fields("web.store_unavailable", method=request.method, path=request.url.path))
    unavailable = StoreUnavailable("The relay's message store is unavailable; try again.")
    if _is_api(request):
        return api.error_response(request, unavailable)
    return error_page(request, unavailable.status, unavailable.message)


async def internal_error(request: Request, exc: Exception) -> Response:
    """An unexpected error: logged once with its traceback, answered in the contract's shape."""
    if is_database_error(exc) or isinstance(exc, DecryptionError):
        return await store_error(request, exc)
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc,
                 extra=fields("web.error", method=request.method, path=request.url.path))
    if not _is_api(request):
        return error_page(request, 500, "The relay hit an internal error; nothing was completed. The details "
                                        "are in the relay's log.")
    return JSONResponse({"ok": False, "error": "The relay hit an internal error; the request was not completed."},
                        status_code=500)


async def flush_refusals_periodically(state: AppState) -> None:
    """Refused requests reach the store about once a second, as one group-commit job."""
    while True:
        await asyncio.sleep(REFUSAL_FLUSH_SECONDS)
        state.flush_refusals()


async def flush_refusals_now(state: AppState) -> None:
    """At shutdown: what was counted is written before the writer stops (waiting for one in flight)."""
    for _ in range(3):
        future = state.flush_refusals()
        if future is None and not state.refusals.busy:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(future) if future else asyncio.sleep(0.2), 5)


class SiteCheck:
    """The Host must be one the relay answers to (``site.py``); a request over TLS is marked for HSTS."""

    def __init__(self, app: ASGIApp, site: Site) -> None:
        self.app, self.site = app, site

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self.site.allows(scope):
                await self.refuse(scope, receive, send)
                return
            if self.site.over_tls(scope):
                scope[TLS_KEY] = True
        await self.app(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """400, as JSON under /api/ and a page elsewhere, and one (budgeted) log line."""
        request = Request(scope, receive)
        text = self.site.refuse(scope)
        response = (JSONResponse({"ok": False, "error": text}, status_code=400) if _is_api(request)
                    else error_page(request, 400, text))
        await response(scope, receive, send)


class RelayApp(Starlette):
    """Starlette with the security headers outside everything, its own error middleware included,
    and the Host check just inside them."""

    site: Site

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.site.hosts is not None or self.site.judges_tls:  # else it has nothing to check: not in the way
            stack = SiteCheck(stack, self.site)
        return SecurityHeaders(stack)


def create_app(settings: Settings, store: Store | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        relay_store = store or Store.open(settings, crypto.derive_keys(settings))
        owned = store is None
        relay_store.bootstrap(settings)
        relay_queue = build_queue(settings)
        latency = LatencyBuffer()

        def count_batch(conn: Connection, accepted: int) -> None:
            latency.drain(conn, {(relay_metrics.ACCEPTED, ""): accepted} if accepted else None)

        # The revision of the settings, read once per batch and held until its commit: every accept
        # checks it (api.accept), and a settings change waits for the batch (Store._bump_rev).
        intake = GroupCommit(relay_store, relay_queue, before_commit=count_batch,
                        at_begin=functools.partial(relay_store.revision, hold=True),
                        writers={ACCEPTED: functools.partial(insert_accepted, keys=relay_store.keys)})
        intake.start()
        app.state.relay = AppState(settings, relay_store, relay_queue, intake, accept_latency=latency,
                                   loop=asyncio.get_running_loop())
        flusher = asyncio.create_task(metrics_endpoint.flush_periodically(app.state.relay))
        refusals = asyncio.create_task(flush_refusals_periodically(app.state.relay))
        try:
            yield
        finally:
            for task in (flusher, refusals):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await flush_refusals_now(app.state.relay)
            if len(latency):
                with contextlib.suppress(Exception):
                    await app.state.relay.submit(metrics_endpoint.nothing)  # the batch hook writes them
            intake.stop()
            if owned:
                relay_store.shutdown()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        RelayError: relay_error, HTTPException: http_error, sqlite3.Error: store_error,
        DecryptionError: store_error, Exception: internal_error,
    }
    if settings.database_url:
        import psycopg  # imported only where PostgreSQL is the store
        handlers[psycopg.Error] = store_error
    app = RelayApp(routes=routes(), lifespan=lifespan, exception_handlers=handlers)
    app.site = site_of(settings)
    return app
