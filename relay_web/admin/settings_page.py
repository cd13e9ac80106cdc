"""The Settings page and its settings cards: SMTP delivery, retries and pacing, sign-in protection.

A good post saves the whole card at once and audits what changed (secrets as
"changed", never their values).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay_core.delivery import oauth
from relay_core.errors import BadRequest
from relay_core.store.limits import effective_limit
from relay_core.options import describe_changes, parse_option
from relay_core.store import ApiKey

from ..auth import client_ip
from .forms import FormState, parse_fields, read_form
from .sessions import forget_shown, relay_state, require_admin, shown_once
from .templating import render

SMTP_LABELS = {
    "smtp_host": "SMTP host", "smtp_port": "Port", "smtp_security": "Security", "smtp_username": "Username",
    "default_from": "Default From email", "default_from_name": "Default From name",
    "allowed_from": "Allowed From", "max_attach_mb": "Max attachment size (MB)",
}
SECURITY_CHOICES = [("starttls", "STARTTLS"), ("ssl", "SSL/TLS"), ("none", "None")]
# The sign-in method and OAuth 2.0 fields; parsed when posted (a form of an earlier page has none).
OAUTH_LABELS = {"smtp_auth": "Sign-in method", "oauth_tenant": "Tenant (directory) ID",
                "oauth_client_id": "Client (application) ID", "smtp_ca_file": "Extra CA file"}
AUTH_CHOICES = [("password", "Password"), ("microsoft", "Microsoft 365 (OAuth 2.0)"),
                ("google", "Google Workspace or Gmail (OAuth 2.0)")]
SMTP_FIELDS = [*SMTP_LABELS, *OAUTH_LABELS]
DELIVERY_LABELS = {
    "retry_base_seconds": "First retry after (seconds)",
    "retry_max_seconds": "Longest wait between retries (seconds)",
    "max_age_hours": "Give up after (hours)",
    "max_per_minute": "Deliveries per minute",
    "max_per_hour": "Deliveries per hour",
    "max_per_day": "Deliveries per day",
    "send_per_hour": "Sends per hour per API key",
    "bad_key_per_minute": "Wrong API keys per minute from one address",
}
DELIVERY_HINTS = {
    "send_per_hour": "For keys without a limit of their own. 0 = no limit; empty = RELAY_SEND_PER_HOUR. The portal "
                     "does not retry a refused message, so a limit here drops mail over it.",
    "bad_key_per_minute": "After this many requests with a missing or wrong key in a minute, an address gets 429 "
                          "(0 = no limit).",
}
# Fields a delivery post may leave out (forms of an earlier page): left as they are.
OPTIONAL_DELIVERY = ("send_per_hour", "bad_key_per_minute")
SIGNIN_LABELS = {"turnstile_site_key": "Turnstile site key", "session_idle_minutes": "Sign out after idle (minutes)"}
# How the audit trail names each setting (the SMTP card's "Username" needs its card's name there).
ALL_LABELS = {**SMTP_LABELS, **OAUTH_LABELS, **DELIVERY_LABELS, **SIGNIN_LABELS, "smtp_username": "SMTP username",
              "smtp_password": "SMTP password", "turnstile_secret": "Turnstile secret key",
              "oauth_client_secret": "Client secret"}
NOTICES = {
    "smtp": "SMTP settings saved.", "delivery": "Retries and pacing saved.",
    "signin": "Sign-in protection saved.", "account": "Admin account saved.",
    "revoked": "The key was revoked; requests with it now get 401.",
    "generated": "A new portal key was generated. Copy it into the portal now: the old key no longer works.",
    "added": "Key added. Copy it now, or reveal it later from this list.",
    "limits": "The key's limits were saved.",
    "oauth": "The account is connected: the relay signs in to the mail server with it from now on.",
}
# The card each notice is shown on: the page opens at that card, so the notice must be there too.
NOTICE_CARDS = {"revoked": "keys", "generated": "keys", "added": "keys", "limits": "keys"}
SHOW_KEY = "show-key"  # the purpose of the token that asks this page to show one API key
FINISHED = ("sent", "partial", "failed", "cancelled")


def actor(request: Request) -> tuple[str, str]:
    return request.state.admin.username, client_ip(request, relay_state(request).settings)


def _shown_key(request: Request) -> dict[int, str]:
    """The key a Reveal, Add or Generate asked to show (see ``keys.py``), if its cookie is good."""
    value = shown_once(request, SHOW_KEY)
    if value is None or not value.isdigit():
        return {}
    store = relay_state(request).store
    key = next((k for k in store.api_keys.all() if k.id == int(value) and k.revoked_at is None), None)
    return {key.id: store.api_keys.reveal(key.id)} if key else {}


def _key_rows(request: Request, revealed: dict[int, str]) -> list[dict[str, Any]]:
    store = relay_state(request).store
    usage = store.api_keys.usage()
    keys: list[ApiKey] = sorted(store.api_keys.all(), key=lambda k: (k.revoked_at is not None, -k.id))
    return [{**dataclasses.asdict(k), "last_used_at": usage.get(k.id), "secret": revealed.get(k.id)}
            for k in keys]


def _test_outcome(request: Request) -> dict[str, Any] | None:
    message_id = request.query_params.get("test", "")
    if not message_id:
        return None
    view = relay_state(request).store.messages.status(message_id)
    if view is None:
        return None
    return describe_test(view)


def describe_test(view: dict[str, Any]) -> dict[str, Any]:
    """The test email's state as the card shows it (and its JSON poll answers)."""
    status = view["status"]
    recipients = view.get("recipients") or []
    if status == "sent":
        detail = "Delivered: the mail server accepted it." + (
            f" ({recipients[0]['code']} {recipients[0]['reply']})" if recipients and recipients[0].get("code") else "")
    elif status in ("queued", "sending"):
        detail = "Waiting for a worker to deliver it…"
    elif status == "deferred":
        detail = f"Not delivered yet; it will be retried. Last error: {view.get('last_error') or 'none'}"
    else:
        detail = view.get("last_error") or ""
    return {"id": view["id"], "status": status, "detail": detail,
            "to": ", ".join(r["address"] for r in recipients), "final": status in FINISHED}


def render_settings(request: Request, forms: dict[str, FormState] | None = None, status_code: int = 200,
                    notice: str = "", key_edit: int | None = None) -> Response:
    relay = relay_state(request)
    options = relay.store.options()
    state = {
        "smtp": FormState.from_options(options, SMTP_FIELDS),
        "keys": FormState(),
        "test_email": FormState(),
        "account": FormState(values={"username": request.state.admin.username}),
        "delivery": FormState.from_options(options, list(DELIVERY_LABELS)),
        "signin": FormState.from_options(options, list(SIGNIN_LABELS)),
        **(forms or {}),
    }
    keys = _key_rows(request, _shown_key(request))
    primary = next((k for k in keys if k["is_primary"] and k["revoked_at"] is None), None)
    return forget_shown(request, render(request, "settings.html", {
        "forms_state": state,
        "notice": notice or NOTICES.get(request.query_params.get("saved", ""), ""),
        "notice_card": "" if notice else NOTICE_CARDS.get(request.query_params.get("saved", ""),
                                                          request.query_params.get("saved", "")),
        "security_choices": SECURITY_CHOICES,
        "auth_choices": AUTH_CHOICES,
        "oauth": _oauth_state(request, options),
        "delivery_labels": DELIVERY_LABELS,
        "smtp_password_set": bool(options.smtp_password),
        "turnstile_secret_set": bool(options.turnstile_secret),
        "keys": keys,
        "primary": primary,
        "key_edit": key_edit,
        "default_limit": effective_limit(ApiKey(0, "", False, 0.0, None, ""), options, relay.settings.send_per_hour),
        "delivery_hints": DELIVERY_HINTS,
        "test": _test_outcome(request),
        "audit": relay_state(request).store.log.audit_entries(limit=20),
    }, status_code=status_code), "/settings")


@require_admin
async def settings_page(request: Request) -> Response:
    return render_settings(request)


async def _save(request: Request, card: str, values: dict[str, Any], shown: FormState, action: str) -> Response:
    """Save a validated card, or show why not; audit what changed."""
    store = relay_state(request).store
    if shown.failed:
        return render_settings(request, {card: shown})
    detail = describe_changes(store.options(), values, ALL_LABELS)
    who, ip = actor(request)
    try:
        await run_in_threadpool(store.set_options, values, (who, ip, action, detail) if detail else None)
    except BadRequest as exc:
        shown.error = exc.message
        return render_settings(request, {card: shown})
    return RedirectResponse(f"/settings?saved={card}#{card}", status_code=303)


def parse_smtp(form: dict[str, str]) -> tuple[dict[str, Any], FormState]:
    """The SMTP card's values; a password or client secret only when one was typed or clearing was asked."""
    values, shown = parse_fields(form, {**SMTP_LABELS, **{k: v for k, v in OAUTH_LABELS.items() if k in form}})
    if form.get("clear_smtp_password") == "yes":
        values["smtp_password"] = ""
    elif form.get("smtp_password"):
        values["smtp_password"] = form["smtp_password"]
    if form.get("clear_oauth_client_secret") == "yes":
        values["oauth_client_secret"] = ""
    elif form.get("oauth_client_secret"):
        try:
            values["oauth_client_secret"] = parse_option("oauth_client_secret", form["oauth_client_secret"],
                                                         ALL_LABELS["oauth_client_secret"])
        except BadRequest as exc:
            shown.errors["oauth_client_secret"] = exc.message
    return values, shown


def _oauth_state(request: Request, options: Any) -> dict[str, Any]:
    """What the card says about the OAuth 2.0 connection, and the device code while one is shown."""
    store = relay_state(request).store
    pending = None
    if request.query_params.get("connect") == "microsoft":
        under_way = oauth.load_pending(store, "microsoft")
        if under_way is not None:
            pending = {"user_code": under_way["flow"]["user_code"],
                       "verification_uri": under_way["flow"]["verification_uri"]}
    connected = bool(options.oauth_refresh_token) and oauth.connected_provider(store) in ("", options.smtp_auth)
    application = not connected and bool(
        options.oauth_client_secret or options.oauth_client_certificate if options.smtp_auth == "microsoft"
        else options.oauth_service_account)
    return {"connected": connected, "application": application, "mailbox": options.smtp_username,
            "provider": oauth.PROVIDER_NAMES.get(options.smtp_auth, ""), "revoked": oauth.revoked_sentence(store),
            "client_secret_set": bool(options.oauth_client_secret), "pending": pending}


@require_admin
async def save_smtp(request: Request) -> Response:
    values, shown = parse_smtp(await read_form(request))
    return await _save(request, "smtp", values, shown, "settings.smtp")


@require_admin
async def save_delivery(request: Request) -> Response:
    form = await read_form(request)
    labels = {name: label for name, label in DELIVERY_LABELS.items() if name in form or name not in OPTIONAL_DELIVERY}
    values, shown = parse_fields(form, labels)
    if not shown.failed and values["retry_max_seconds"] < values["retry_base_seconds"]:
        shown.errors["retry_max_seconds"] = (f"{DELIVERY_LABELS['retry_max_seconds']} must not be shorter than "
                                             f"the first retry ({values['retry_base_seconds']} seconds).")
    return await _save(request, "delivery", values, shown, "settings.delivery")


@require_admin
async def save_signin(request: Request) -> Response:
    form = await read_form(request)
    values, shown = parse_fields(form, SIGNIN_LABELS)
    if form.get("clear_turnstile_secret") == "yes":
        values["turnstile_secret"] = ""
    elif form.get("turnstile_secret"):
        try:
            values["turnstile_secret"] = parse_option("turnstile_secret", form["turnstile_secret"],
                                                      ALL_LABELS["turnstile_secret"])
        except BadRequest as exc:
            shown.errors["turnstile_secret"] = exc.message
    secret = values.get("turnstile_secret", relay_state(request).store.options().turnstile_secret)
    if not shown.failed and values["turnstile_site_key"] and not secret:
        shown.errors["turnstile_secret"] = "Enter the secret key too: Turnstile needs both keys."
    return await _save(request, "signin", values, shown, "settings.signin")

