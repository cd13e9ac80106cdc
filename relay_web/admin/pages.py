"""The error pages every admin URL shares: ``error.html``, or plain text if even that fails."""

from __future__ import annotations

import logging
from typing import Mapping

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .templating import render

logger = logging.getLogger("relay.web")
TITLES = {400: "That did not work", 401: "Please sign in", 403: "Refused", 404: "Not found",
          405: "Not allowed here", 413: "Too large", 415: "Not a form", 429: "Slow down",
          500: "Something went wrong", 503: "Unavailable"}


def error_page(request: Request, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    title = TITLES.get(status, "Error")
    try:
        return render(request, "error.html", {"status": status, "title": title, "message": message},
                      status_code=status, headers=headers)
    except Exception:  # the page about an error must not itself fail
        logger.exception("could not render the error page for %s", status)
        return PlainTextResponse(f"{title}: {message}", status_code=status, headers=headers)
