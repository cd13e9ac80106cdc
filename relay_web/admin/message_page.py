"""One message's page: envelope, headers, attachments, recipients, the timeline of attempts, the body.

The body is shown only when an admin asks (a POST, audited): it may carry a
password, as the portal's welcome mails do. It is shown once, through a
one-use cookie (``sessions.show_once``), never a token in the URL. HTML is
shown as escaped source, never rendered.
"""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime, formataddr
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay_core.crypto import DecryptionError
from relay_core.errors import NotFound
from relay_core.message import OutgoingMessage
from relay_core.store.queueview import MessageRecord

from .queue_page import read_note
from .sessions import forget_shown, relay_state, require_admin, show_once, shown_once
from .settings_page import actor
from .templating import render

SHOW_BODY = "show-body"  # the purpose of the token that asks the page to show one message's body


def _record(request: Request) -> MessageRecord:
    message_id = request.path_params["message_id"]
    record = relay_state(request).store.messages.record(message_id)
    if record is None:
        raise NotFound(f"No message with id {message_id!r} is known to this relay (it may have been removed "
                       "with the log's retention).")
    return record


def _document(request: Request, record: MessageRecord) -> tuple[OutgoingMessage | None, str]:
    """The stored message, or why it cannot be read."""
    if not record.has_body:
        return None, ("Its content was deleted after the retention period; the log and the facts above "
                      "are kept.")
    try:
        document = relay_state(request).store.messages.document(record.id)
    except DecryptionError:
        return None, "Its content cannot be read with this relay's secret key."
    except ValueError as exc:
        return None, f"Its stored content cannot be read: {exc}"
    return document, "" if document is not None else "Its content was deleted after the retention period."


def headers(record: MessageRecord, document: OutgoingMessage | None) -> list[tuple[str, str]]:
    """The header lines the message carries (Bcc never does: those recipients are in the envelope only)."""
    by_kind: dict[str, list[str]] = {"to": [], "cc": [], "bcc": []}
    for r in record.recipients:
        by_kind.setdefault(r.kind, []).append(r.address)
    reply_to = "—"
    if document is not None and document.reply_to:
        reply_to = formataddr((document.reply_to_name or "", document.reply_to))
    elif document is None and record.has_body is False:
        reply_to = "not known (content deleted)"
    when = datetime.fromtimestamp(record.created_at, timezone.utc)
    return [
        ("From", formataddr((record.from_name, record.from_addr))),
        ("To", ", ".join(by_kind["to"]) or "—"),
        ("Cc", ", ".join(by_kind["cc"]) or "—"),
        ("Bcc", "—"),
        ("Reply-To", reply_to),
        ("Subject", record.subject or "—"),
        ("Message-ID", record.message_id_header),
        ("Date", format_datetime(when)),
    ]


def _context(request: Request, record: MessageRecord, show_body: bool) -> dict[str, Any]:
    store = relay_state(request).store
    document, unreadable = _document(request, record)
    attachments = [{"filename": a.filename, "mime_type": a.mime_type, "size": a.size}
                   for a in (document.attachments if document is not None else [])]
    return {
        "message": record,
        "headers": headers(record, document),
        "bcc_count": sum(1 for r in record.recipients if r.kind == "bcc"),
        "attachments": attachments,
        "unreadable": unreadable,
        "timeline": store.log.of_message(record.id),
        "body": ({"text": document.text, "html": document.html or ""}
                 if show_body and document is not None else None),
        "note": read_note(request),
    }


@require_admin
async def message_page(request: Request) -> Response:
    record = await run_in_threadpool(_record, request)
    show = shown_once(request, SHOW_BODY) == record.id
    context = await run_in_threadpool(_context, request, record, show)
    return forget_shown(request, render(request, "message.html", context), f"/messages/{record.id}")


@require_admin
async def reveal_body(request: Request) -> Response:
    record = await run_in_threadpool(_record, request)
    who, ip = actor(request)
    await run_in_threadpool(relay_state(request).store.log.record_audit, who, ip, "message.body_viewed",
                            f"body viewed: message {record.id}")
    response = RedirectResponse(f"/messages/{record.id}#body", status_code=303)
    show_once(request, response, SHOW_BODY, record.id, f"/messages/{record.id}")
    return response
