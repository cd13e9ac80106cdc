"""The web application factory: one route table, a lifespan that opens the store."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay_core import crypto
from relay_core.config import Settings
from relay_core.crypto import DecryptionError
from relay_core.errors import RelayError, StoreUnavailable
from relay_core.intake import Intake
from relay_core.logs import fields
from relay_core.ratelimit import RateLimiter
from relay_core.store import Store
from relay_core.tasks import build_queue

from . import api
from .state import AppState

logger = logging.getLogger("relay.web")


def routes() -> list[Route]:
    return [
        Route("/api/send", api.send, methods=["POST"], name="api_send"),
        Route("/api/messages/{message_id}", api.message_status, methods=["GET"], name="api_message"),
        Route("/api/health", api.api_health, methods=["GET"], name="api_health"),
        Route("/healthz", api.healthz, methods=["GET"], name="healthz"),
    ]


async def relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    if request.url.path == "/api/send":
        await api.log_rejection(request, exc)
    return api.error_response(request, exc)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405/413 become the contract's JSON under /api/."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/") or request.url.path == "/healthz":
        messages = {404: "No such API endpoint.", 405: f"{request.method} is not allowed here.",
                    413: "The request body is too large."}
        text = messages.get(exc.status_code, str(exc.detail))
        return JSONResponse({"ok": False, "error": text}, status_code=exc.status_code, headers=exc.headers)
    return Response(str(exc.detail), status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """An unexpected error: logged once with its traceback, answered in the contract's shape."""
    if isinstance(exc, (sqlite3.Error, DecryptionError)):
        logger.error("the store is unavailable on %s %s: %s", request.method, request.url.path, exc,
                     extra=fields("web.store_unavailable", method=request.method, path=request.url.path))
        return api.error_response(request, StoreUnavailable("The relay's message store is unavailable; try again."))
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc,
                 extra=fields("web.error", method=request.method, path=request.url.path))
    return JSONResponse({"ok": False, "error": "The relay hit an internal error; the request was not completed."},
                        status_code=500)


def create_app(settings: Settings, store: Store | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        relay_store = store or Store.open(settings, crypto.derive_keys(settings))
        relay_store.bootstrap(settings)
        relay_queue = build_queue(settings)
        intake = Intake(relay_store, relay_queue)
        intake.start()
        app.state.relay = AppState(settings, relay_store, relay_queue, intake,
                                   RateLimiter(settings.send_per_hour))
        try:
            yield
        finally:
            intake.stop()

    return Starlette(
        routes=routes(),
        lifespan=lifespan,
        exception_handlers={RelayError: relay_error, HTTPException: http_error, Exception: internal_error},
    )
