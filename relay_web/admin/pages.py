"""The Queue page (home) and the error pages every admin URL shares.

The Queue page here is the minimal one sign-in lands on: counts by state
and whether a worker is alive. (The full dashboard grows from it.)
Error pages render ``error.html``; if even that fails, plain text, so an
error is never hidden behind another.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .sessions import relay_state, require_admin
from .templating import render

logger = logging.getLogger("relay.web")
STATES = ("queued", "sending", "deferred", "sent", "partial", "failed", "cancelled")
WORKER_STALE_SECONDS = 60
TITLES = {400: "That did not work", 401: "Please sign in", 403: "Refused", 404: "Not found",
          405: "Not allowed here", 413: "Too large", 415: "Not a form", 429: "Slow down",
          500: "Something went wrong", 503: "Unavailable"}


@require_admin
async def dashboard(request: Request) -> Response:
    store = relay_state(request).store
    heartbeat = store.last_heartbeat()
    return render(request, "dashboard.html", {
        "states": STATES,
        "counts": store.counts(),
        "heartbeat": heartbeat,
        "worker_alive": heartbeat is not None and time.time() - heartbeat < WORKER_STALE_SECONDS,
        "smtp_configured": store.options().smtp_configured,
    })


def error_page(request: Request, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    title = TITLES.get(status, "Error")
    try:
        return render(request, "error.html", {"status": status, "title": title, "message": message},
                      status_code=status, headers=headers)
    except Exception:  # the page about an error must not itself fail
        logger.exception("could not render the error page for %s", status)
        return PlainTextResponse(f"{title}: {message}", status_code=status, headers=headers)
