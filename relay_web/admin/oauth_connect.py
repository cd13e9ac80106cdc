"""Connecting the Microsoft 365 or Google mailbox from the SMTP card (OAuth 2.0).

Microsoft by device code (the card polls); Google by authorization code with
PKCE, started from a link because a form's redirect to another origin would
break the CSP's ``form-action 'self'``. The sign-in under way is kept in the
store, encrypted, so any web process can finish it.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from relay_core.delivery import oauth

from .forms import FormState
from .sessions import relay_state, require_admin, site_for
from .settings_page import SMTP_FIELDS, actor, render_settings

PENDING_SECONDS = 600.0  # a Google sign-in must come back within this


def _card_error(request: Request, text: str) -> Response:
    shown = FormState.from_options(relay_state(request).store.options(), SMTP_FIELDS)
    shown.error = text
    return render_settings(request, {"smtp": shown})


@require_admin
async def connect_microsoft(request: Request) -> Response:
    store = relay_state(request).store
    options = dataclasses.replace(store.options(), smtp_auth="microsoft")
    try:
        flow = await run_in_threadpool(oauth.start_device_flow, options)
    except oauth.OAuthError as exc:
        return _card_error(request, f"Microsoft 365 could not be connected: {exc.message}.")
    pending = {"provider": "microsoft", "flow": flow, "expires_at": float(flow.get("expires_at") or 0),
               "next_poll": time.time() + float(flow.get("interval") or 5)}
    await run_in_threadpool(oauth.save_pending, store, pending)
    return RedirectResponse("/settings?connect=microsoft#smtp", status_code=303)


def _answer(final: bool, detail: str, connected: bool = False) -> JSONResponse:
    return JSONResponse({"ok": True, "final": final, "connected": connected, "detail": detail})


def _poll_microsoft(store: Any, who: tuple[str, str]) -> JSONResponse:
    pending = oauth.load_pending(store, "microsoft")
    if pending is None:
        return _answer(True, "The code expired or was replaced: click Connect Microsoft 365 account again.")
    interval = float(pending["flow"].get("interval") or 5)
    if time.time() < pending["next_poll"]:
        return _answer(False, "Waiting for you to sign in…")
    pending["next_poll"] = time.time() + interval
    oauth.save_pending(store, pending)
    options = dataclasses.replace(store.options(), smtp_auth="microsoft")
    try:
        connected = oauth.poll_device_flow(options, pending["flow"])
    except oauth.OAuthError as exc:
        oauth.clear_pending(store)
        return _answer(True, f"Not connected: {exc.message}.")
    if connected is None:
        return _answer(False, "Waiting for you to sign in…")
    oauth.save_connection(store, "microsoft", connected, audit=who)
    oauth.clear_pending(store)
    return _answer(True, f"Connected: the relay now sends as {connected.mailbox} through Microsoft 365.", True)


@require_admin
async def microsoft_status(request: Request) -> Response:
    """The card's poller: JSON, one look at the sign-in at most per Microsoft's interval."""
    return await run_in_threadpool(_poll_microsoft, relay_state(request).store, actor(request))


@require_admin
async def connect_google(request: Request) -> Response:
    store = relay_state(request).store
    options = dataclasses.replace(store.options(), smtp_auth="google")
    redirect_uri = site_for(request).url_for(request, "oauth_google_callback")  # the one registered with Google
    try:
        started = await run_in_threadpool(oauth.authorization, options, redirect_uri)
    except oauth.OAuthError as exc:
        return _card_error(request, f"Google could not be connected: {exc.message}.")
    await run_in_threadpool(oauth.save_pending, store, {
        "provider": "google", "state": started.state, "verifier": started.verifier, "redirect_uri": redirect_uri,
        "expires_at": time.time() + PENDING_SECONDS})
    return RedirectResponse(started.url, status_code=302)


@require_admin
async def google_callback(request: Request) -> Response:
    store = relay_state(request).store
    pending = await run_in_threadpool(oauth.load_pending, store, "google")
    params = request.query_params
    if params.get("error"):
        return _card_error(request, f"Google did not connect the account: {params['error']} (nothing was changed).")
    if pending is None or not hmac.compare_digest(params.get("state", ""), pending["state"]):
        return _card_error(request, "That Google sign-in was not started here or has expired: click Connect Google "
                                    "account again.")
    options = dataclasses.replace(store.options(), smtp_auth="google")
    try:
        connected = await run_in_threadpool(oauth.exchange_code, options, params.get("code", ""),
                                            pending["verifier"], pending["redirect_uri"])
    except oauth.OAuthError as exc:
        return _card_error(request, f"Google could not be connected: {exc.message}.")
    await run_in_threadpool(oauth.save_connection, store, "google", connected, actor(request))
    await run_in_threadpool(oauth.clear_pending, store)
    return RedirectResponse("/settings?saved=oauth#smtp", status_code=303)
