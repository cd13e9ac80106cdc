"""The admin's own account: the forced password change and the Admin account card.

The current password is checked as at sign-in (counted toward the lockout), and
a new password signs out every other session and gives this browser a new id.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay_core.passwords import password_problem
from relay_core.store.sessions import LockedOut

from .forms import FormState, read_form
from .sessions import relay_state, require_admin, safe_next, start_session
from .settings_page import actor, render_settings
from .signin import BUSY_MESSAGE, SignInBusy, _lockout_message, check_password
from .templating import render

MAX_USERNAME = 64


async def _check_current(request: Request, password: str, shown: FormState) -> None:
    if not password:
        shown.errors["current_password"] = "Enter your current password."
        return
    try:
        admin = await check_password(request, request.state.admin.username, password)
    except SignInBusy:
        shown.error = BUSY_MESSAGE
    except LockedOut as exc:
        shown.error = _lockout_message(exc.until)
    else:
        if admin is None:
            shown.errors["current_password"] = "That is not your current password."


def _check_new(request: Request, form: dict[str, str], shown: FormState, required: bool) -> str | None:
    """The new password if it is acceptable (None when left empty and not required)."""
    new, again = form.get("new_password", ""), form.get("confirm_password", "")
    if not new and not again and not required:
        return None
    seed = relay_state(request).settings.admin_password
    problem = password_problem(new, None if seed is None else str(seed))
    if problem:
        shown.errors["new_password"] = problem
    elif new == form.get("current_password"):
        shown.errors["new_password"] = "Choose a password different from the current one."
    if new != again:
        shown.errors["confirm_password"] = "The two new passwords do not match."
    return new


async def _apply(request: Request, username: str | None, password: str | None) -> bool:
    """Save and audit; False when the username is taken (then nothing changed)."""
    store = relay_state(request).store
    session = request.state.session
    try:
        await run_in_threadpool(lambda: store.admin.update(session.admin.id, username=username, password=password,
                                                           keep_session=session.id_hash))
    except ValueError:
        return False
    who, ip = actor(request)
    changes = []
    if username is not None and username != who:
        changes.append(f"username changed from “{who}” to “{username}”")
    if password is not None:
        changes.append("password changed")
    if changes:
        await run_in_threadpool(store.log.record_audit, username or who, ip, "admin.account", "; ".join(changes))
    return True


@require_admin(during_password_change=True)
async def change_password_page(request: Request) -> Response:
    shown = FormState(values={"next": safe_next(request.query_params.get("next"))})
    return render(request, "change_password.html", {"form": shown})


@require_admin(during_password_change=True)
async def change_password(request: Request) -> Response:
    form = await read_form(request)
    shown = FormState(values={"next": safe_next(form.get("next"))})
    await _check_current(request, form.get("current_password", ""), shown)
    new = _check_new(request, form, shown, required=True)
    if shown.failed or new is None:
        return render(request, "change_password.html", {"form": shown})
    await _apply(request, None, new)
    response = RedirectResponse(shown.values["next"], status_code=303)
    await start_session(request, response, request.state.admin.id)
    return response


@require_admin
async def save_account(request: Request) -> Response:
    form = await read_form(request)
    username = form.get("username", "").strip()
    shown = FormState(values={"username": form.get("username", "")})
    if not username:
        shown.errors["username"] = "Enter a username."
    elif len(username) > MAX_USERNAME or not username.isprintable() or any(c.isspace() for c in username):
        shown.errors["username"] = f"Use at most {MAX_USERNAME} characters, without spaces."
    await _check_current(request, form.get("current_password", ""), shown)
    new = _check_new(request, form, shown, required=False)
    if shown.failed:
        return render_settings(request, {"account": shown})
    changed_name = username if username != request.state.admin.username else None
    if not await _apply(request, changed_name, new):
        shown.errors["username"] = f"The username “{username}” is taken."
        return render_settings(request, {"account": shown})
    response = RedirectResponse("/settings?saved=account#account", status_code=303)
    if new is not None:
        await start_session(request, response, request.state.admin.id)
    return response
