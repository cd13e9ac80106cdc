"""Signing in and out.

A password check beyond ``PASSWORD_CHECKS_AT_ONCE`` is refused at once, not
queued, so a crowd here leaves no memory or threads waiting; an attempt is
recorded as a failure before its hash is computed, so a burst checks at most
the lockout's five (docs/security.md).
"""

from __future__ import annotations

import logging
import math
import time
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay_core.store.accounts import WELL_KNOWN_PASSWORDS, Admin
from relay_core.store.sessions import LockedOut

from ..auth import client_ip
from ..headers import allow_turnstile
from ..state import PASSWORD_CHECKS_AT_ONCE, AppState
from . import turnstile
from .forms import FormState, read_form
from .sessions import (LOGIN_COOKIE, PASSWORD_CHANGE_PATH, check_login_token, check_origin, end_session,
                       load_session, login_token, relay_state, require_admin, safe_next, set_cookie,
                       start_session)
from .templating import render

logger = logging.getLogger("relay.web")
BUSY_MESSAGE = "Too many sign-in attempts right now; try again in a few seconds."
BUSY_RETRY_SECONDS = 5

NOTICES = {
    "signed_out": "You are signed out.",
    "expired": "Your session ended; sign in again.",
    "password_changed": "Your password was changed; sign in with the new one.",
}


def _lockout_message(until: float) -> str:
    wait = max(1, math.ceil(until - time.time()))
    return (f"Too many failed sign-ins. Signing in is locked for {wait} more second{'s' if wait != 1 else ''}; "
            "wait, then try again with the right username and password.")


class SignInBusy(Exception):
    """Every password-check slot of this process is taken: the attempt is refused, not queued."""


async def check_password(request: Request, username: str, password: str) -> Admin | None:
    """The admin whose username and password these are, or None (a failure, already recorded);
    ``SignInBusy`` or ``LockedOut`` without checking anything."""
    state = relay_state(request)
    ip = client_ip(request, state.settings)
    if not state.password_checks.acquire(blocking=False):
        logger.warning("a sign-in attempt from %s was refused: %d password checks are already running",
                       ip, PASSWORD_CHECKS_AT_ONCE)
        raise SignInBusy
    try:
        # (run_in_threadpool returns only once the thread is done, even when cancelled.)
        return await run_in_threadpool(_check_password, state, ip, username, password)
    finally:
        state.password_checks.release()


def _check_password(state: AppState, ip: str, username: str, password: str) -> Admin | None:
    attempt = state.store.admin.claim_login_attempt(ip, username)
    admin = state.store.admin.verify(username, password)
    if admin is not None:
        state.store.admin.forgive_login_attempt(attempt)
    return admin


def _login_page(request: Request, form: FormState, status_code: int = 200, notice: str = "") -> Response:
    options = relay_state(request).store.options()
    token, cookie = login_token(request)
    if options.turnstile_enabled:
        allow_turnstile(request)
    response = render(request, "login.html", {
        "form": form, "login_csrf": token, "notice": notice,
        "turnstile_site_key": options.turnstile_site_key if options.turnstile_enabled else "",
        "turnstile_script": turnstile.SCRIPT_URL,
    }, status_code=status_code)
    if cookie is not None:
        set_cookie(request, response, LOGIN_COOKIE, cookie)
    return response


async def login_page(request: Request) -> Response:
    next_path = safe_next(request.query_params.get("next"))
    if await load_session(request) is not None:
        return RedirectResponse(next_path, status_code=303)
    notice = NOTICES.get(request.query_params.get("notice", ""), "")
    return _login_page(request, FormState(values={"username": "", "next": next_path}), notice=notice)


async def login(request: Request) -> Response:
    check_origin(request)
    form = await read_form(request)
    check_login_token(request, form)
    state = relay_state(request)
    ip = client_ip(request, state.settings)
    username = form.get("username", "").strip()
    password = form.get("password", "")
    shown = FormState(values={"username": username, "next": safe_next(form.get("next"))})

    if not username or not password:
        shown.error = "Enter your username and password."
        return _login_page(request, shown)
    options = state.store.options()
    if options.turnstile_site_key and "turnstile_secret" in state.store.unreadable_secrets:
        # Fail closed: without its secret Turnstile would be skipped, so no sign-in at all.
        shown.error = ("Signing in is closed: the stored Turnstile secret cannot be decrypted with this "
                       "RELAY_SECRET_KEY. On the relay's host, re-enter it (`tspro-relay config set "
                       "turnstile_secret=...`) or turn Turnstile off (`tspro-relay config set turnstile_site_key=`).")
        return _login_page(request, shown)
    if options.turnstile_enabled:
        # (Cloudflare is not asked about an attempt the lockout refuses anyway.)
        locked = await run_in_threadpool(state.store.admin.locked_until, ip, username)
        if locked is not None:
            shown.error = _lockout_message(locked)
            return _login_page(request, shown)
        try:
            await run_in_threadpool(turnstile.verify, options, form.get(turnstile.RESPONSE_FIELD, ""), ip)
        except turnstile.TurnstileFailed as exc:
            shown.error = exc.message
            return _login_page(request, shown)

    try:
        admin = await check_password(request, username, password)
    except SignInBusy:
        shown.error = BUSY_MESSAGE
        response = _login_page(request, shown, status_code=429)
        response.headers["Retry-After"] = str(BUSY_RETRY_SECONDS)
        return response
    except LockedOut as exc:
        shown.error = _lockout_message(exc.until)
        return _login_page(request, shown)
    if admin is None:
        locked = await run_in_threadpool(state.store.admin.locked_until, ip, username)
        shown.error = _lockout_message(locked) if locked else "Wrong username or password."
        return _login_page(request, shown)

    await run_in_threadpool(state.store.admin.clear_login_failures, username)
    seeded = state.settings.admin_password is not None and password == str(state.settings.admin_password)
    if not admin.must_change and (password in WELL_KNOWN_PASSWORDS or seeded):
        await run_in_threadpool(state.store.admin.require_password_change, admin.id)
        admin = type(admin)(admin.id, admin.username, True)
    await run_in_threadpool(state.store.log.record_audit, admin.username, ip, "admin.signin", "signed in")
    target = shown.values["next"]
    if admin.must_change:
        target = f"{PASSWORD_CHANGE_PATH}?next={quote(target, safe='/')}"
    response = RedirectResponse(target, status_code=303)
    await start_session(request, response, admin.id)
    return response


@require_admin(during_password_change=True)
async def logout(request: Request) -> Response:
    state = relay_state(request)
    admin = request.state.admin
    await run_in_threadpool(state.store.log.record_audit, admin.username, client_ip(request, state.settings),
                            "admin.signout", "signed out")
    response = RedirectResponse("/login?notice=signed_out", status_code=303)
    await end_session(request, response)
    return response
