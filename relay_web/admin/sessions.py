"""The admin's session cookie, CSRF tokens, the Origin check and the sign-in guard.

The session lives in the store, so deleting its row is signing out whatever
the browser holds. A CSRF token is an HMAC of the session id: nothing more to
store, and it dies with the session. ``require_admin`` checks, in order: a
session, a password that must change, then on POST Origin and CSRF. With
RELAY_PUBLIC_URL the Origin must be it, and an http:// Origin is refused where
the relay knows it was reached over https (``site.py``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

from itsdangerous import BadSignature, Signer, URLSafeTimedSerializer
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from relay_core.errors import Forbidden
from relay_core.store.sessions import AdminSession, session_hash

from ..auth import client_ip
from ..site import Site, site_of
from ..state import AppState
from .forms import read_form

SESSION_COOKIE = "relay_session"
LOGIN_COOKIE = "relay_login"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
AUTO_REFRESH_HEADER = "x-auto-refresh"  # app.js sends it when it reloads a page by itself
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
FOREIGN_ORIGIN = ("This request did not come from the relay's own pages, so it was refused and nothing "
                  "changed. Open the page again and retry.")
BAD_TOKEN = ("This form has expired or did not come from the relay's own pages, so nothing changed. "
             "Reload the page and try again.")

PLAIN_HTTP = ("Your browser did not send back the relay's sign-in cookie: it is marked Secure, and this page was "
              "opened over plain HTTP, where browsers keep Secure cookies to themselves. Open the relay over "
              "HTTPS, or, on a network you trust, start it with RELAY_INSECURE_COOKIES=1.")

Endpoint = Callable[[Request], Awaitable[Response]]


def relay_state(request: Request) -> AppState:
    return request.app.state.relay


def _signer(request: Request, purpose: str) -> Signer:
    return Signer(relay_state(request).store.keys.session_key, salt=f"relay-admin-{purpose}")


def _token(request: Request, purpose: str, value: str) -> str:
    key = relay_state(request).store.keys.session_key
    return hmac.new(key, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()


def _unsign(request: Request, purpose: str, cookie: str | None) -> str | None:
    if not cookie:
        return None
    try:
        return _signer(request, purpose).unsign(cookie).decode()
    except (BadSignature, UnicodeDecodeError):
        return None


def site_for(request: Request) -> Site:
    return site_of(relay_state(request).settings)


def set_cookie(request: Request, response: Response, name: str, value: str, path: str = "/",
               max_age: int | None = None) -> None:
    response.set_cookie(name, value, httponly=True, samesite="lax", path=path, max_age=max_age,
                        secure=site_for(request).secure_cookies)


def clear_cookie(request: Request, response: Response, name: str, path: str = "/") -> None:
    response.delete_cookie(name, path=path, httponly=True, samesite="lax", secure=site_for(request).secure_cookies)


# -- the session ------------------------------------------------------------------------
def session_id(request: Request) -> str | None:
    return _unsign(request, "session", request.cookies.get(SESSION_COOKIE))


async def load_session(request: Request, touch: bool = True) -> AdminSession | None:
    """The signed-in session of this request, or None; fills ``request.state`` for the templates."""
    sid = session_id(request)
    if sid is None:
        return None
    state = relay_state(request)
    idle = state.store.options().session_idle_minutes * 60
    session = await run_in_threadpool(state.store.admin.find_session, sid, idle, None, touch)
    if session is not None:
        request.state.session = session
        request.state.admin = session.admin
        request.state.csrf_token = _token(request, "csrf", sid)
    return session


async def start_session(request: Request, response: Response, admin_id: int) -> None:
    """A fresh session id at every sign-in; the one this browser held (if any) is deleted."""
    state = relay_state(request)
    new_id = secrets.token_urlsafe(32)
    old = session_id(request)
    await run_in_threadpool(state.store.admin.create_session, admin_id, new_id, client_ip(request, state.settings),
                            request.headers.get("user-agent", ""), None, session_hash(old) if old else None)
    set_cookie(request, response, SESSION_COOKIE, _signer(request, "session").sign(new_id).decode())
    clear_cookie(request, response, LOGIN_COOKIE)


async def end_session(request: Request, response: Response) -> None:
    sid = session_id(request)
    if sid is not None:
        await run_in_threadpool(relay_state(request).store.admin.delete_session, sid)
    clear_cookie(request, response, SESSION_COOKIE)


# -- short-lived values for this session ------------------------------------------------------
SHOW_COOKIE = "relay_show"
SHOW_SECONDS = 300


def sign_for_session(request: Request, purpose: str, value: str) -> str:
    """A token carrying ``value`` that only this session can read back, for a few minutes: a POST
    that shows something once redirects to a GET carrying it, so a reload repeats nothing."""
    serializer = URLSafeTimedSerializer(relay_state(request).store.keys.session_key, salt=f"relay-admin-{purpose}")
    return serializer.dumps([value, request.state.session.id_hash])


def unsign_for_session(request: Request, purpose: str, token: str, max_age: int = SHOW_SECONDS) -> str | None:
    serializer = URLSafeTimedSerializer(relay_state(request).store.keys.session_key, salt=f"relay-admin-{purpose}")
    try:
        value, owner = serializer.loads(token, max_age=max_age)
    except (BadSignature, ValueError, TypeError):
        return None
    session = getattr(request.state, "session", None)
    if session is None or not isinstance(value, str) or not hmac.compare_digest(str(owner), session.id_hash):
        return None
    return value


def show_once(request: Request, response: Response, purpose: str, value: str, path: str) -> None:
    """Have the page at ``path`` (where ``response`` redirects) show a secret once, to this session.

    The token rides in a short-lived HttpOnly cookie for that path, not in the
    redirect's URL: an address stays in the browser's history and in proxies'
    access logs. The page that reads it clears it (``shown_once``), so a
    reload shows nothing.
    """
    set_cookie(request, response, SHOW_COOKIE, sign_for_session(request, purpose, value), path=path,
               max_age=SHOW_SECONDS)


def shown_once(request: Request, purpose: str) -> str | None:
    """The value ``show_once`` asked this page to show, if its cookie is this session's and fresh."""
    token = request.cookies.get(SHOW_COOKIE)
    return unsign_for_session(request, purpose, token) if token else None


def forget_shown(request: Request, response: Response, path: str) -> Response:
    """Clear the cookie of ``show_once`` on the page's answer: it is used once."""
    if SHOW_COOKIE in request.cookies:
        clear_cookie(request, response, SHOW_COOKIE, path=path)
    return response


# -- the sign-in form's token -------------------------------------------------------------
def login_token(request: Request, response: Response | None = None) -> tuple[str, str | None]:
    """The sign-in form's CSRF token, and the cookie to set when this browser has no nonce yet."""
    nonce = _unsign(request, "login", request.cookies.get(LOGIN_COOKIE))
    cookie = None
    if nonce is None:
        nonce = secrets.token_urlsafe(24)
        cookie = _signer(request, "login").sign(nonce).decode()
    return _token(request, "login", nonce), cookie


def check_login_token(request: Request, form: dict[str, str]) -> None:
    nonce = _unsign(request, "login", request.cookies.get(LOGIN_COOKIE))
    sent = form.get(CSRF_FIELD, "")
    if nonce is None or not sent or not hmac.compare_digest(sent, _token(request, "login", nonce)):
        if (LOGIN_COOKIE not in request.cookies and site_for(request).secure_cookies
                and request.headers.get("origin", "").startswith("http://")):
            raise Forbidden(PLAIN_HTTP)  # the form is fine: the browser held the cookie back
        raise Forbidden(BAD_TOKEN)


# -- origin and CSRF ------------------------------------------------------------------------
def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host name, port) of a URL; the scheme's default port when it names none."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return parts.scheme.lower(), host, port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def same_origin(request: Request, site: Site | None = None) -> bool:
    """The Origin header (or the Referer, when Origin is absent) names the Host this was sent to.

    A Host without a port matches the origin's host name on any port: nginx's
    usual ``proxy_set_header Host $host`` drops the port the browser used.
    (Cookies do not tell ports apart either, so this opens nothing new.)
    With ``site``: sent to the public URL's name, the origin must be the
    public URL; and an http:// origin is refused where the request is known
    to have come over https (a page on plain HTTP posting into the TLS site).
    """
    host_header = request.headers.get("host", "").strip()
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    if not host_header or not source or source == "null":
        return False
    origin = _origin(source)
    host = _origin(f"//{host_header}")
    if origin is None or host is None:
        return False
    if site is not None:
        if site.is_public_host(request.scope):
            return origin == site.public_origin
        if origin[0] != "https" and site.scheme(request.scope) == "https":
            return False
    if host[2] is None:
        return hmac.compare_digest(origin[1], host[1])
    if origin[2] in (80, 443) and host[2] in (80, 443):
        return hmac.compare_digest(origin[1], host[1])  # a proxy terminating TLS on 443 forwards to :80
    return hmac.compare_digest(f"{origin[1]}:{origin[2]}", f"{host[1]}:{host[2]}")


def check_origin(request: Request) -> None:
    if request.method not in SAFE_METHODS and not same_origin(request, site_for(request)):
        raise Forbidden(FOREIGN_ORIGIN)


async def check_csrf(request: Request) -> None:
    urlencoded = request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
    form = await read_form(request) if urlencoded else {}
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER, "")
    expected = getattr(request.state, "csrf_token", "")
    if not sent or not expected or not hmac.compare_digest(sent, expected):
        raise Forbidden(BAD_TOKEN)


# -- redirects -------------------------------------------------------------------------------
def safe_next(value: str | None, default: str = "/") -> str:
    """A local path to go to after sign-in; anything else (//evil, /\\evil, a scheme) → ``default``."""
    if not value or not value.startswith("/") or value.startswith("//"):
        return default
    if "\\" in value or any(ord(c) < 0x21 or ord(c) == 0x7f for c in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def login_redirect(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(here, safe='/')}", status_code=303)


# -- the guard --------------------------------------------------------------------------------
PASSWORD_CHANGE_PATH = "/account/password"


def require_admin(endpoint: Endpoint | None = None, *, during_password_change: bool = False) -> Any:
    """Only a signed-in admin gets through; ``during_password_change``: also while the password
    must still change (the change page itself, sign-out)."""
    def decorate(func: Endpoint) -> Endpoint:
        @functools.wraps(func)
        async def guarded(request: Request) -> Response:
            check_origin(request)
            touch = AUTO_REFRESH_HEADER not in request.headers  # a refreshing tab does not keep it alive
            session = await load_session(request, touch=touch)
            if session is None:
                if "application/json" in request.headers.get("accept", ""):
                    return JSONResponse({"ok": False, "error": "Sign in again: your session has ended."},
                                        status_code=401)
                return login_redirect(request)
            if session.admin.must_change and not during_password_change:
                return RedirectResponse(f"{PASSWORD_CHANGE_PATH}?next={quote(request.url.path, safe='/')}",
                                        status_code=303)
            if request.method not in SAFE_METHODS:
                await check_csrf(request)
            return await func(request)
        return guarded

    if endpoint is not None:
        return decorate(endpoint)
    return decorate
