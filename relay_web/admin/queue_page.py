"""The Queue page (the home page) and what it does: Retry now, Cancel, Pause / Resume delivery.

Retry now and Cancel redirect with a note of what was done and left alone,
signed for this session, so a reload repeats nothing and no link can put words
on the page.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay_core.delivery.mailflow import assess
from relay_core.delivery.oauth import revoked_sentence
from relay_core.delivery.pausing import pause, resume
from relay_core.store import ActionReport

from .chart import build_chart
from .forms import confirmed, read_form, read_form_values
from .keys import confirm_page
from .sessions import relay_state, require_admin, safe_next, sign_for_session, unsign_for_session
from .settings_page import actor
from .templating import render

NOTICE = "queue-notice"  # the purpose of the token that carries a note to the next page
LIST_SIZE = 50
MAX_SKIPPED_SHOWN = 10
NOTHING_SELECTED = "Nothing was selected: tick the messages first, then choose Retry now or Cancel."


# -- notes carried across a redirect ---------------------------------------------------------------
def redirect_with_note(request: Request, path: str, text: str, ok: bool = True) -> Response:
    token = sign_for_session(request, NOTICE, json.dumps([text, ok]))
    joiner = "&" if "?" in path else "?"
    anchor = ""
    if "#" in path:
        path, anchor = path.split("#", 1)
        anchor = "#" + anchor
    return RedirectResponse(f"{path}{joiner}note={token}{anchor}", status_code=303)


def read_note(request: Request) -> tuple[str, bool] | None:
    """The note a redirect carried to this page, if it is this session's and recent."""
    token = request.query_params.get("note", "")
    value = unsign_for_session(request, NOTICE, token) if token else None
    if value is None:
        return None
    try:
        text, ok = json.loads(value)
    except (ValueError, TypeError):
        return None
    return str(text), bool(ok)


def describe(report: ActionReport, verb: str) -> tuple[str, bool]:
    """'Retried 2 messages. Left alone: 0192… (it is being delivered right now).'"""
    parts = []
    if report.done:
        parts.append(f"{verb} {len(report.done)} message{'s' if len(report.done) != 1 else ''}.")
    if report.skipped:
        shown = list(report.skipped.items())[:MAX_SKIPPED_SHOWN]
        reasons = "; ".join(f"{message_id} ({why})" for message_id, why in shown)
        more = len(report.skipped) - len(shown)
        parts.append(f"Left alone: {reasons}" + (f" and {more} more." if more else "."))
    return " ".join(parts), not report.skipped


# -- the page ---------------------------------------------------------------------------------------
def dashboard_context(request: Request, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    store = relay_state(request).store
    counts = store.messages.queue_counts(now)
    return {
        "counts": counts,
        "health": delivery_health(request, now),
        "chart": build_chart(store.log.hourly(now, 24)),
        "waiting": store.messages.waiting(LIST_SIZE),
        "failed": store.messages.failed(LIST_SIZE),
        "list_size": LIST_SIZE,
        "note": read_note(request),
        "now": now,
    }


def delivery_health(request: Request, now: float) -> dict[str, Any]:
    """Whether mail flows (relay_core.delivery.mailflow, the judgement /api/health gives), and the last attempt."""
    store = relay_state(request).store
    health = assess(store, now, counts=False)
    last = store.log.last_attempts(1)
    return {
        "paused": health.paused,
        "smtp_configured": health.smtp_configured,
        "worker_alive": health.worker_alive,
        "heartbeat": health.worker_heartbeat_at,
        "last": last[0] if last else None,
        "upstream_problem": health.upstream.sentence if health.upstream.failing else None,
        "oauth_revoked": revoked_sentence(store),
        "check": health.upstream.check,
    }


@require_admin
async def dashboard(request: Request) -> Response:
    context = await run_in_threadpool(dashboard_context, request)
    return render(request, "dashboard.html", context)


# -- actions ----------------------------------------------------------------------------------------
async def _selected(request: Request) -> tuple[list[str], str, dict[str, str]]:
    """The ids to act on, where to go back to, and the form."""
    form = await read_form(request)
    only = form.get("only", "").strip()
    if only:
        ids = [only]  # a row's own button: that message, whatever else is ticked
    else:
        ids = [i.strip() for i in await read_form_values(request, "ids") if i.strip()]
        ids += [i for i in form.get("id_list", "").split(",") if i.strip()]  # from the confirmation page
    back = safe_next(form.get("back"), "/")
    return list(dict.fromkeys(ids)), back, form


@require_admin
async def retry(request: Request) -> Response:
    ids, back, _ = await _selected(request)
    if not ids:
        return redirect_with_note(request, back, NOTHING_SELECTED, ok=False)
    state = relay_state(request)
    who, ip = actor(request)
    report = await run_in_threadpool(state.store.messages.retry_now, ids, who, ip)
    if report.done:
        await run_in_threadpool(state.queue.enqueue_many, report.done)  # the sweeper covers a lost one
    text, ok = describe(report, "Queued for delivery now:")
    return redirect_with_note(request, back, text, ok)


@require_admin
async def cancel(request: Request) -> Response:
    ids, back, form = await _selected(request)
    if not ids:
        return redirect_with_note(request, back, NOTHING_SELECTED, ok=False)
    if not confirmed(form):
        count = f"these {len(ids)} messages" if len(ids) > 1 else "this message"
        return confirm_page(request, "/queue/cancel", f"Cancel {count}? It will not be delivered.",
                            "Cancel delivery", back=back, fields={"id_list": ",".join(ids), "back": back})
    who, ip = actor(request)
    report = await run_in_threadpool(relay_state(request).store.messages.cancel, ids, who, ip)
    text, ok = describe(report, "Cancelled")
    return redirect_with_note(request, back, text, ok)


@require_admin
async def pause_delivery(request: Request) -> Response:
    await run_in_threadpool(pause, relay_state(request).store, actor(request))
    return RedirectResponse("/", status_code=303)  # the page's paused banner says it: one message, not two


@require_admin
async def resume_delivery(request: Request) -> Response:
    state = relay_state(request)
    woken = await run_in_threadpool(resume, state.store, state.queue, actor(request))
    return redirect_with_note(request, "/", f"Delivery resumed; {woken} waiting message{'s' if woken != 1 else ''} "
                                            "woken.")
