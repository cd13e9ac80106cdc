"""Proving the settings work: Test connection, and Send a test email.

Test connection takes the SMTP card as typed, not yet saved (an empty password
means the stored one), and uses the delivery code's own ``connect``. The test
email goes through the queue like any message.
"""

from __future__ import annotations

import asyncio
import dataclasses

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from relay_core.delivery import smtp
from relay_core.errors import BadRequest, NotFound
from relay_core.options import is_address
from relay_core.delivery.probe import PROBE_TIMEOUT, probe
from relay_core.intake.sending import enqueue_test_message

from .forms import FormState, read_form
from .sessions import relay_state, require_admin
from .settings_page import actor, describe_test, parse_smtp, render_settings
from .templating import status_badge

@require_admin
async def test_connection(request: Request) -> Response:
    form = await read_form(request)
    values, shown = parse_smtp(form)
    if shown.failed:
        return render_settings(request, {"smtp": shown})
    current = relay_state(request).store.options()
    candidate = dataclasses.replace(current, **values)
    if not candidate.smtp_host:
        shown.error = "Enter the SMTP host first."
        return render_settings(request, {"smtp": shown})
    try:
        text = await asyncio.wait_for(run_in_threadpool(probe, candidate, relay_state(request).store),
                                      timeout=PROBE_TIMEOUT * 2 + 5)
        shown.result, shown.result_ok = text, True
    except smtp.DeliveryError as exc:
        shown.result, shown.result_ok = f"The connection test failed: {exc.message}", False
    except asyncio.TimeoutError:
        shown.result, shown.result_ok = "The connection test failed: the server did not answer in time.", False
    unsaved = {k: v for k, v in values.items() if getattr(current, k) != v}
    if unsaved:
        shown.result += " (These settings are not saved yet: click Save SMTP settings to keep them.)"
    return render_settings(request, {"smtp": shown})


@require_admin
async def send_test_email(request: Request) -> Response:
    form = await read_form(request)
    to = form.get("test_to", "").strip()
    shown = FormState(values={"test_to": form.get("test_to", "")})
    if not is_address(to):
        shown.errors["test_to"] = "Enter one email address, such as you@example.org."
        return render_settings(request, {"test_email": shown})
    state = relay_state(request)
    who, ip = actor(request)
    try:
        message_id = await run_in_threadpool(enqueue_test_message, state.store, state.settings, to, state.queue, ip)
    except BadRequest as exc:
        shown.error = exc.message
        return render_settings(request, {"test_email": shown})
    await run_in_threadpool(state.store.log.record_audit, who, ip, "test_email", f"queued a test email to {to}")
    return RedirectResponse(f"/settings?test={message_id}#test-email", status_code=303)


@require_admin
async def test_email_status(request: Request) -> Response:
    """The test email's state for the card's poller: JSON."""
    view = relay_state(request).store.messages.status(request.path_params["message_id"])
    if view is None:
        raise NotFound("No such message.")
    outcome = describe_test(view)
    return JSONResponse({"ok": True, **outcome, "badge": str(status_badge(outcome["status"]))})
