"""Security headers on every response: one pure ASGI middleware, so no route can forget.

Outside Starlette's own error middleware, so its 404, 405, 413 and 500 get the
same headers; which headers and why is docs/security.md's (Headers). HSTS only
when the request came over TLS (``TLS_KEY``, set by app.SiteCheck).
"""

from __future__ import annotations

from typing import Any

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
TLS_KEY = "relay.tls"  # set in the scope (app.SiteCheck) when the request reached the relay over TLS
HSTS = (b"strict-transport-security", b"max-age=31536000")  # a year; no includeSubDomains: not ours to promise


def is_textual(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media in _TEXTUAL or media.endswith(("+json", "+xml"))


def allow_turnstile(request: Request) -> None:
    """Let this response load Cloudflare's Turnstile widget (script and frame)."""
    setattr(request.state, _STATE_KEY, True)


_SET = (
    (b"content-security-policy", BASE_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: with no-referrer browsers send "Origin: null"
    # on form posts, and the admin pages check Origin on every one.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)
_SET_NAMES = frozenset(name for name, _ in _SET) | {b"cache-control", HSTS[0]}
_TURNSTILE_CSP = (b"content-security-policy", (BASE_POLICY + TURNSTILE_POLICY).encode())


def _secured(raw: Any, status: int, static: bool, turnstile: bool, tls: bool) -> list[tuple[bytes, bytes]]:
    """The response's headers with ours set, replacing the app's (a static file's Cache-Control
    excepted), in one pass."""
    headers: list[tuple[bytes, bytes]] = []
    own_cache: bytes | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in _SET_NAMES:
            if lower == b"cache-control" and own_cache is None:
                own_cache = value
            continue
        if lower == b"content-type":
            text = value.decode("latin-1")
            if is_textual(text) and "charset=" not in text.lower():
                value = (text + "; charset=utf-8").encode("latin-1")
        headers.append((name, value))
    headers.extend(_SET)
    if turnstile:
        headers[-len(_SET)] = _TURNSTILE_CSP
    if static and status < 400:
        headers.append((b"cache-control", STATIC_CACHE.encode() if own_cache is None else own_cache))
    else:
        headers.append((b"cache-control", b"no-store"))
    if tls:
        headers.append(HSTS)
    return headers


def api_headers(raw: list[tuple[bytes, bytes]], status: int) -> list[tuple[bytes, bytes]]:
    """An API answer's headers with ours set, for an answer written below the app (http_limits)."""
    return _secured(raw, status, False, False, False)


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
                message["headers"] = _secured(message.get("headers", ()), message["status"], static,
                                              bool(scope.get("state", {}).get(_STATE_KEY)), TLS_KEY in scope)
            await send(message)

        await self.app(scope, receive, send_with_headers)
