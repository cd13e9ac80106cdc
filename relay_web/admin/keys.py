"""The API key card: Reveal, Generate new key, and named keys (add, revoke).

Revealing is a POST (it shows a secret, so it needs the CSRF token and is
recorded in the audit trail). Reveal, Add and Generate answer with a
redirect to the Settings page carrying a short-lived token that only this
session can read (``sign_for_session``): the page then shows that key next
to a Copy button, and reloading it repeats nothing. Replacing the portal's
key and revoking a key are confirmed first (``confirm.html`` when
JavaScript is off).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay_core.errors import NotFound

from .forms import FormState, confirmed, read_form
from .settings_page import SHOW_KEY, actor, render_settings
from .sessions import relay_state, require_admin, sign_for_session
from .templating import render

MAX_LABEL = 60


def confirm_page(request: Request, action: str, question: str, button: str, back: str = "/settings#keys",
                 fields: dict[str, str] | None = None) -> Response:
    """The no-JavaScript second step of a dangerous form (``fields``: what to post again)."""
    return render(request, "confirm.html", {"action": action, "question": question, "button": button,
                                            "fields": fields or {}, "back": back})


def _show(request: Request, key_id: int, saved: str) -> Response:
    token = sign_for_session(request, SHOW_KEY, str(key_id))
    return RedirectResponse(f"/settings?saved={saved}&show={token}#keys", status_code=303)


def _key(request: Request) -> int:
    key_id = int(request.path_params["key_id"])
    if not any(k.id == key_id for k in relay_state(request).store.api_keys()):
        raise NotFound(f"There is no API key number {key_id}.")
    return key_id


@require_admin
async def reveal(request: Request) -> Response:
    store = relay_state(request).store
    key_id = _key(request)
    key = next(k for k in store.api_keys() if k.id == key_id)
    if key.revoked_at is not None:
        raise NotFound("That key was revoked; it cannot be revealed.")
    who, ip = actor(request)
    await run_in_threadpool(store.record_audit, who, ip, "api_key.reveal", f"revealed the API key “{key.label}”")
    return _show(request, key_id, "revealed")


@require_admin
async def generate(request: Request) -> Response:
    form = await read_form(request)
    if not confirmed(form):
        return confirm_page(request, "/settings/api-keys/new",
                            "Generate a new portal key? The current key stops working at once, so the portal "
                            "cannot send until you update it.", "Generate new key")
    store = relay_state(request).store
    await run_in_threadpool(store.new_primary_api_key)
    who, ip = actor(request)
    await run_in_threadpool(store.record_audit, who, ip, "api_key.new",
                            "generated a new portal key (the old one stopped working)")
    new = max((k for k in store.api_keys() if k.is_primary and k.revoked_at is None), key=lambda k: k.id)
    return _show(request, new.id, "generated")


@require_admin
async def add(request: Request) -> Response:
    form = await read_form(request)
    label = " ".join(form.get("label", "").split())
    shown = FormState(values={"label": form.get("label", "")})
    if not label:
        shown.errors["label"] = "Give the new key a name, such as where it will be used."
    elif len(label) > MAX_LABEL or not label.isprintable():
        shown.errors["label"] = f"Use a plain name of at most {MAX_LABEL} characters."
    if shown.failed:
        return render_settings(request, {"keys": shown})
    store = relay_state(request).store
    key_id, _secret = await run_in_threadpool(store.add_api_key, label)
    who, ip = actor(request)
    await run_in_threadpool(store.record_audit, who, ip, "api_key.add", f"added the API key “{label}”")
    return _show(request, key_id, "added")


@require_admin
async def revoke(request: Request) -> Response:
    key_id = _key(request)
    store = relay_state(request).store
    key = next(k for k in store.api_keys() if k.id == key_id)
    form = await read_form(request)
    if not confirmed(form):
        return confirm_page(request, f"/settings/api-keys/{key_id}/revoke",
                            f"Revoke the key “{key.label}”? Anything still using it gets 401 from now on.",
                            "Revoke")
    if await run_in_threadpool(store.revoke_api_key, key_id):
        who, ip = actor(request)
        await run_in_threadpool(store.record_audit, who, ip, "api_key.revoke", f"revoked the API key “{key.label}”")
    return RedirectResponse("/settings?saved=revoked#keys", status_code=303)
