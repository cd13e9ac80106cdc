"""Rendering the admin pages: one Jinja environment, its globals and filters.

Links are paths, never absolute URLs: behind a TLS-terminating proxy the app
sees http:// while the browser is on https://, and an http:// form target
would break the page (mixed content, CSP form-action).
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path
from typing import Any, Mapping

import jinja2
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.templating import Jinja2Templates, _TemplateResponse

from relay_core.resources import templates_dir

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Message and log states, as words a volunteer reads at a glance: the same word as the filters, counters
# and the API's state (one word per state).
STATUS_LABELS = {
    "queued": "Queued", "sending": "Sending", "sent": "Sent", "partial": "Partly sent",
    "deferred": "Deferred", "failed": "Failed", "cancelled": "Cancelled",
    "rejected": "Rejected", "unauthorized": "Unauthorized", "accepted": "Accepted",
    "rate_limited": "Rate limited", "retried": "Retried", "cleared": "Log cleared", "pending": "Pending",
}


@functools.lru_cache(maxsize=64)
def _static_version(name: str) -> str:
    try:
        return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


def static_url(name: str) -> str:
    """/static/<name>?v=<content hash>: a changed file gets a new URL, so it may be cached."""
    return f"/static/{name}?v={_static_version(name)}"


@jinja2.pass_context
def url_for(context: dict[str, Any], name: str, /, **path_params: Any) -> str:
    request: Request = context["request"]
    return str(request.app.url_path_for(name, **path_params))


def format_datetime(ts: float | None, with_seconds: bool = False) -> str:
    if not ts:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC" if with_seconds else "%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def timeago(ts: float | None, now: float | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', '2 days ago' (or 'in 5 min' for the future)."""
    if not ts:
        return "never"
    delta = (time.time() if now is None else now) - ts
    future, delta = delta < 0, abs(delta)
    if delta < 45:
        return "in a moment" if future else "just now"
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if delta >= size:
            count = int(delta // size)
            text = f"{count} {unit}{'s' if unit == 'day' and count != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return "now"


def filesize(size: int | None) -> str:
    """'812 bytes', '14.2 KB', '3.1 MB' (binary multiples, as the attachment limit counts them)."""
    if size is None:
        return "—"
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KB", "MB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


@functools.lru_cache(maxsize=64)  # a few states, drawn once per row of every list
def without_stage(detail: str | None, stage: str | None) -> str:
    """A detail shown beside its stage, without the "stage: " it starts with ("connect connect: ...")."""
    detail = detail or ""
    prefix = f"{stage}: " if stage else ""
    return detail[len(prefix):] if prefix and detail.startswith(prefix) else detail


def status_badge(status: str | None) -> Markup:
    """A coloured label for a message or log state (colours in app.css, .badge-<state>)."""
    key = (status or "").lower()
    label = STATUS_LABELS.get(key, key.capitalize() or "—")
    css = key if key in STATUS_LABELS else "other"
    return Markup('<span class="badge badge-{}">{}</span>').format(css, escape(label))


def build_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
        trim_blocks=True, lstrip_blocks=True,
    )
    env.globals.update(url_for=url_for, static_url=static_url)
    env.filters.update(datetime=format_datetime, timeago=timeago, status_badge=status_badge, filesize=filesize,
                       without_stage=without_stage)
    return env


templates = Jinja2Templates(env=build_environment())


def render(request: Request, name: str, context: dict[str, Any] | None = None, status_code: int = 200,
           headers: Mapping[str, str] | None = None) -> _TemplateResponse:
    """Render a page with the shared context: ``admin``, ``csrf_token``, ``active`` (the tab;
    by default the template's name)."""
    state = request.state
    full = {
        "admin": getattr(state, "admin", None),
        "csrf_token": getattr(state, "csrf_token", ""),
        "active": name.rsplit(".", 1)[0],
        **(context or {}),
    }
    return templates.TemplateResponse(request, name, full, status_code=status_code, headers=headers)
