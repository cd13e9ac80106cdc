"""The API key card: Reveal, Generate new key, named keys (add, revoke) and each key's limits.

Revealing is a POST (it shows a secret: CSRF token, audit trail). Reveal, Add
and Generate redirect with a one-use cookie only this session can read
(``show_once``), not a token in the URL, which would stay in the browser's
history and in proxies' logs; reloading the page repeats nothing.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay_core.errors import BadRequest, NotFound
from relay_core.options import parse_allowlist, parse_per_hour

from .forms import FormState, confirmed, read_form
from .settings_page import SHOW_KEY, actor, render_settings
from .sessions import relay_state, require_admin, show_once
from .templating import render

MAX_LABEL = 60
LIMIT_LABEL = "Sends per hour"
ALLOWED_LABEL = "Allowed From"


def confirm_page(request: Request, action: str, question: str, button: str, back: str = "/settings#keys",
                 fields: dict[str, str] | None = None) -> Response:
    """The no-JavaScript second step of a dangerous form (``fields``: what to post again)."""
    return render(request, "confirm.html", {"action": action, "question": question, "button": button,
                                            "fields": fields or {}, "back": back})


def _show(request: Request, key_id: int, saved: str) -> Response:
    response = RedirectResponse(f"/settings?saved={saved}#keys", status_code=303)
    show_once(request, response, SHOW_KEY, str(key_id), "/settings")
    return response


def _key(request: Request) -> int:
    key_id = int(request.path_params["key_id"])
    if not any(k.id == key_id for k in relay_state(request).store.api_keys.all()):
        raise NotFound(f"There is no API key number {key_id}.")
    return key_id


@require_admin
async def reveal(request: Request) -> Response:
    store = relay_state(request).store
    key_id = _key(request)
    key = next(k for k in store.api_keys.all() if k.id == key_id)
    if key.revoked_at is not None:
        raise NotFound("That key was revoked; it cannot be revealed.")
    who, ip = actor(request)
    await run_in_threadpool(store.log.record_audit, who, ip, "api_key.reveal", f"revealed the API key “{key.label}”")
    return _show(request, key_id, "revealed")


@require_admin
async def generate(request: Request) -> Response:
    form = await read_form(request)
    if not confirmed(form):
        return confirm_page(request, "/settings/api-keys/new",
                            "Generate a new portal key? The current key stops working at once, so the portal "
                            "cannot send until you update it.", "Generate new key")
    store = relay_state(request).store
    await run_in_threadpool(store.api_keys.new_primary)
    who, ip = actor(request)
    await run_in_threadpool(store.log.record_audit, who, ip, "api_key.new",
                            "generated a new portal key (the old one stopped working)")
    new = max((k for k in store.api_keys.all() if k.is_primary and k.revoked_at is None), key=lambda k: k.id)
    return _show(request, new.id, "generated")


def _limits(form: dict[str, str], shown: FormState, prefix: str = "") -> tuple[int | None, str]:
    """The posted send limit and Allowed From list; errors go into ``shown`` under the field names."""
    per_hour: int | None = None
    allowed = ""
    try:
        per_hour = parse_per_hour(LIMIT_LABEL, form.get(prefix + "per_hour", ""))
    except BadRequest as exc:
        shown.errors[prefix + "per_hour"] = exc.message
    try:
        allowed = parse_allowlist(ALLOWED_LABEL, form.get(prefix + "allowed_from", ""))
    except BadRequest as exc:
        shown.errors[prefix + "allowed_from"] = exc.message
    return per_hour, allowed


def describe_limits(per_hour: int | None, allowed: str) -> str:
    limit = "the relay's default send limit" if per_hour is None else (
        "no send limit" if per_hour == 0 else f"{per_hour} sends per hour")
    return limit + (f", From limited to {allowed}" if allowed else ", no Allowed From list of its own")


@require_admin
async def add(request: Request) -> Response:
    form = await read_form(request)
    label = " ".join(form.get("label", "").split())
    shown = FormState(values={name: form.get(name, "") for name in ("label", "new_per_hour", "new_allowed_from")})
    if not label:
        shown.errors["label"] = "Give the new key a name, such as where it will be used."
    elif len(label) > MAX_LABEL or not label.isprintable():
        shown.errors["label"] = f"Use a plain name of at most {MAX_LABEL} characters."
    per_hour, allowed = _limits(form, shown, "new_")
    if shown.failed:
        return render_settings(request, {"keys": shown})
    store = relay_state(request).store
    key_id, _secret = await run_in_threadpool(store.api_keys.add, label, per_hour, allowed)
    who, ip = actor(request)
    await run_in_threadpool(store.log.record_audit, who, ip, "api_key.add",
                            f"added the API key “{label}” ({describe_limits(per_hour, allowed)})")
    return _show(request, key_id, "added")


@require_admin
async def limits(request: Request) -> Response:
    key_id = _key(request)
    store = relay_state(request).store
    key = next(k for k in store.api_keys.all() if k.id == key_id)
    if key.revoked_at is not None:
        raise NotFound("That key was revoked; its limits cannot change.")
    form = await read_form(request)
    shown = FormState(values={"per_hour": form.get("per_hour", ""), "allowed_from": form.get("allowed_from", "")})
    per_hour, allowed = _limits(form, shown)
    if shown.failed:
        shown.error = f"The limits of “{key.label}” were not changed."
        return render_settings(request, {"keys": shown}, key_edit=key_id)
    who, ip = actor(request)
    detail = f"set the limits of the API key “{key.label}”: {describe_limits(per_hour, allowed)}"
    await run_in_threadpool(lambda: store.api_keys.set_limits(key_id, per_hour=per_hour, allowed_from=allowed,
                                                              audit=(who, ip, "api_key.limits", detail)))
    return RedirectResponse("/settings?saved=limits#keys", status_code=303)


@require_admin
async def revoke(request: Request) -> Response:
    key_id = _key(request)
    store = relay_state(request).store
    key = next(k for k in store.api_keys.all() if k.id == key_id)
    form = await read_form(request)
    if not confirmed(form):
        return confirm_page(request, f"/settings/api-keys/{key_id}/revoke",
                            f"Revoke the key “{key.label}”? Anything still using it gets 401 from now on.",
                            "Revoke")
    if await run_in_threadpool(store.api_keys.revoke, key_id):
        who, ip = actor(request)
        await run_in_threadpool(store.log.record_audit, who, ip, "api_key.revoke", f"revoked the API key “{key.label}”")
    return RedirectResponse("/settings?saved=revoked#keys", status_code=303)
