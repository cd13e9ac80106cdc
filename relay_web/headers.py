"""Security headers on every response: one pure ASGI middleware, so no route can forget.

It wraps the whole application, outside Starlette's own error middleware, so
its 404, 405, 413 and 500 answers get the same headers as the API and the
pages. The Content-Security-Policy forbids inline script and style (all
behaviour is in /static/app.js); a page that needs more, as the sign-in
page with Turnstile does, asks for it through ``allow_turnstile``.

Every answer but a static file's is ``Cache-Control: no-store`` (API answers
carry message ids and states; admin pages settings and addresses), and
every textual type (text/*, JSON, JavaScript, SVG, XML) names its charset,
so no browser guesses one. tests/web/test_headers.py walks every route.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BASE_POLICY = ("default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
               "form-action 'self'")
TURNSTILE_ORIGIN = "https://challenges.cloudflare.com"
TURNSTILE_POLICY = f"; script-src 'self' {TURNSTILE_ORIGIN}; frame-src 'self' {TURNSTILE_ORIGIN}"
STATIC_PREFIX = "/static/"
STATIC_CACHE = "public, max-age=86400"  # static URLs carry a content hash (?v=), so a day is safe
_TEXTUAL = frozenset({"application/javascript", "application/json", "application/xml", "image/svg+xml"})
_STATE_KEY = "relay_csp_turnstile"


def is_textual(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media in _TEXTUAL or media.endswith(("+json", "+xml"))


def allow_turnstile(request: Request) -> None:
    """Let this response load Cloudflare's Turnstile widget (script and frame)."""
    setattr(request.state, _STATE_KEY, True)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(STATIC_PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                policy = BASE_POLICY
                if scope.get("state", {}).get(_STATE_KEY):
                    policy += TURNSTILE_POLICY
                headers["Content-Security-Policy"] = policy
                headers["X-Content-Type-Options"] = "nosniff"
                # same-origin, not no-referrer: with no-referrer browsers send "Origin: null"
                # on form posts, and the admin pages check Origin on every one.
                headers["Referrer-Policy"] = "same-origin"
                headers["X-Frame-Options"] = "DENY"
                if static and message["status"] < 400:
                    if "cache-control" not in headers:
                        headers["Cache-Control"] = STATIC_CACHE
                else:
                    headers["Cache-Control"] = "no-store"
                content_type = headers.get("content-type")
                if content_type and is_textual(content_type) and "charset=" not in content_type.lower():
                    headers["Content-Type"] = content_type + "; charset=utf-8"
            await send(message)

        await self.app(scope, receive, send_with_headers)
