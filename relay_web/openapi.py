"""The JSON API described as OpenAPI 3.1, served at GET /api/openapi.json.

Built from the code's own constants, so the document moves when they do; the
admin pages and /metrics are not the portal's API and are left out.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from relay_core import __version__
from relay_core.store.ledger import MESSAGE_STATES, RECIPIENT_STATES
from relay_core.message import (MAX_ATTACHMENTS, MAX_MIME_TYPE, MAX_NAME, MAX_RECIPIENTS, MAX_SUBJECT,
                                 RECIPIENT_KINDS)

IDEMPOTENCY_HOURS = 24
# A header value: no line break, no control character but tab, no Unicode line separator
# (message._no_breaks refuses the same; tests/web/test_openapi.py compares the two).
HEADER_TEXT = "^[^\\x00-\\x08\\x0a-\\x1f\\x7f\\x85\\u2028\\u2029]*$"
BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_EMAIL = {"type": "string", "format": "email", "maxLength": 254}
IDEMPOTENCY_KEY_MAX = 255
# Statuses each operation answers, and why; the document and the tests read these.
SEND_STATUSES = {
    "202": "Accepted and stored (committed to disk) before this answer; it will be delivered or end as "
           "failed with a reason.",
    "400": "The body is empty, not JSON, or not a JSON object; a From or recipient is missing or invalid; more "
           f"than {MAX_RECIPIENTS} recipients; invalid base64; a line break or control character in a header "
           "value; an Idempotency-Key over 255 characters; a Content-Length that is not a number.",
    "401": "The Authorization header is missing or its key is wrong (checked before the body is read).",
    "403": "The From address is not admitted by the relay's Allowed From list, or by this key's own list "
           "(the sentence names which).",
    "409": "This Idempotency-Key was used with a different body within 24 hours.",
    "413": f"More than {MAX_ATTACHMENTS} attachments, or their decoded total exceeds max_attach_mb, or the body "
           "exceeds the cap that follows from it.",
    "429": "This key reached its send limit (Retry-After: when a slot frees), or this address sent too many "
           "requests with a missing or wrong key this minute.",
    "503": "SMTP delivery is not configured (the message could never be sent), or the store is unavailable.",
}
READ_STATUSES = {
    "401": SEND_STATUSES["401"],
    "429": "This address sent too many requests with a missing or wrong key this minute; see Retry-After.",
    "503": "The store is unavailable.",
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if headers:
        answer["headers"] = headers
    return answer


def _ok(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = _error(description, headers)
    answer["content"]["application/json"]["schema"] = {"$ref": f"#/components/schemas/{schema}"}
    return answer


_LIMIT_HEADERS = {name: {"$ref": f"#/components/headers/{name}"}
                  for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")}
_RETRY = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}, **_LIMIT_HEADERS}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _recipients(what: str, required: bool = False) -> dict[str, Any]:
    forms: list[dict[str, Any]] = [
        {"type": "array", "items": _EMAIL, "maxItems": MAX_RECIPIENTS, **({"minItems": 1} if required else {})},
        {"type": "string", "description": "Addresses separated by ',' or ';'.", "pattern": HEADER_TEXT,
         **({"minLength": 3} if required else {})},
    ]
    if not required:
        forms.append({"type": "null"})
    return {
        "description": f"{what}: a list of addresses (one per element) or one string split on ',' and ';'. "
                       f"to, cc and bcc together hold at most {MAX_RECIPIENTS} addresses.",
        "anyOf": forms,
    }


def _text(max_length: int, description: str) -> dict[str, Any]:
    return {"type": ["string", "null"], "maxLength": max_length, "pattern": HEADER_TEXT, "description": description}


def _schemas() -> dict[str, Any]:
    nullable_number = {"type": ["number", "null"]}
    nullable_string = {"type": ["string", "null"]}
    nullable_integer = {"type": ["integer", "null"]}
    send = {
        "type": "object",
        "description": "A message. Unknown top-level fields are ignored (named in the answer's 'ignored'), "
                       "never a reason to refuse mail.",
        "required": ["to"],
        "properties": {
            "from_email": {"description": "Sender address; missing, empty or blank means the Default From.",
                           "anyOf": [_EMAIL, {"type": "string", "pattern": "^\\s*$"}, {"type": "null"}]},
            "from_name": _text(MAX_NAME, "Sender name; empty or blank means the Default From name."),
            "to": _recipients("Recipients (required)", required=True),
            "cc": _recipients("Copy recipients, shown in a Cc header"),
            "bcc": _recipients("Blind copy recipients: in the envelope only, never in a header"),
            "subject": _text(MAX_SUBJECT, "The subject (a message needs a subject, a body or an attachment)."),
            "text": {"type": ["string", "null"], "description": "Plain-text body."},
            "html": {"type": ["string", "null"], "description": "HTML body (sent beside the text, if any)."},
            "reply_to": {"anyOf": [_EMAIL, {"const": ""}, {"type": "null"}]},
            "reply_to_name": _text(MAX_NAME, "Shown with reply_to."),
            "attachments": {
                "type": ["array", "null"],
                "description": f"At most {MAX_ATTACHMENTS}; their decoded total is bounded by the relay's "
                               "max_attach_mb (MiB).",
                "maxItems": MAX_ATTACHMENTS,
                "items": {"$ref": "#/components/schemas/Attachment"},
            },
        },
        "additionalProperties": True,
    }
    attachment = {
        "type": "object",
        "required": ["content_b64"],
        "properties": {
            "filename": {"type": ["string", "null"], "pattern": HEADER_TEXT, "description": "Default: attachment-N."},
            "mime_type": {"type": ["string", "null"], "pattern": HEADER_TEXT, "maxLength": MAX_MIME_TYPE,
                          "description": "type/subtype, optionally with parameters (text/plain; charset=utf-8); "
                                         "default: guessed from the filename."},
            "content_b64": {"type": "string", "contentEncoding": "base64", "pattern": BASE64,
                            "description": "Whitespace (line breaks) is allowed and dropped."},
        },
    }
    accepted = {
        "type": "object",
        "required": ["ok", "id", "status"],
        "properties": {
            "ok": {"const": True},
            "id": {"type": "string", "description": "The message id, for GET /api/messages/{message_id}."},
            "status": {"const": "queued"},
            "ignored": {"type": "array", "items": {"type": "string"},
                        "description": "Unknown top-level fields that were ignored (present only when any)."},
        },
        "additionalProperties": False,
    }
    attempt = {
        "type": "object",
        "required": ["at", "status", "stage", "code", "detail", "duration_ms"],
        "properties": {"at": {"type": "number"}, "status": {"type": "string"}, "stage": nullable_string,
                       "code": nullable_integer, "detail": {"type": "string"}, "duration_ms": nullable_integer},
    }
    recipient = {
        "type": "object",
        "required": ["address", "kind", "status", "code", "reply"],
        "properties": {"address": {"type": "string"}, "kind": {"enum": list(RECIPIENT_KINDS)},
                       "status": {"enum": list(RECIPIENT_STATES)}, "code": nullable_integer,
                       "reply": nullable_string},
    }
    status = {
        "type": "object",
        "required": ["ok", "id", "status", "created_at", "updated_at", "finished_at", "next_attempt_at",
                     "attempt_count", "last_error", "from", "subject", "message_id", "attempts", "recipients"],
        "properties": {
            "ok": {"const": True}, "id": {"type": "string"}, "status": {"enum": list(MESSAGE_STATES)},
            "created_at": {"type": "number", "description": "Seconds since the epoch."},
            "updated_at": {"type": "number"}, "finished_at": nullable_number,
            "next_attempt_at": {**nullable_number, "description": "When a queued or deferred message is due."},
            "attempt_count": {"type": "integer"}, "last_error": nullable_string,
            "from": {"type": "string"}, "subject": {"type": "string"},
            "message_id": {"type": "string", "description": "The Message-ID header."},
            "attempts": {"type": "array", "items": attempt},
            "recipients": {"type": "array", "items": recipient},
        },
        "additionalProperties": False,
    }
    health = {
        "type": "object",
        "description": "'ok' is false, with an 'error' sentence, whenever mail would not flow now.",
        "required": ["ok", "configured", "error"],
        "properties": {
            "ok": {"type": "boolean"}, "configured": {"type": "boolean"}, "error": nullable_string,
            "smtp_configured": {"type": "boolean"}, "api_key_configured": {"type": "boolean"},
            "worker_alive": {"type": "boolean"}, "worker_heartbeat_at": nullable_number,
            "delivery_paused": {"type": "boolean"},
            "upstream": {"type": "object"},
            "messages": {"type": "object", "additionalProperties": {"type": "integer"}},
            "version": {"type": "string"},
        },
        "additionalProperties": False,
    }
    liveness = {
        "type": "object",
        "required": ["ok", "configured"],
        "properties": {"ok": {"type": "boolean"}, "configured": {"type": "boolean"}},
        "additionalProperties": False,
    }
    error = {
        "type": "object",
        "required": ["ok", "error"],
        "properties": {"ok": {"const": False}, "error": {"type": "string", "description": "A sentence for people."}},
        "additionalProperties": False,
    }
    return {"SendRequest": send, "Attachment": attachment, "Accepted": accepted, "MessageStatus": status,
            "Health": health, "Liveness": liveness, "Error": error}


def _headers() -> dict[str, Any]:
    def integer(description: str) -> dict[str, Any]:
        return {"description": description, "schema": {"type": "integer", "minimum": 0}}

    return {
        "Retry-After": integer("Seconds until a request can succeed: when a send slot of this key frees, or "
                               "when this address's minute of failed keys ends."),
        "RateLimit-Limit": integer("This key's sends per hour (present when the key has a limit)."),
        "RateLimit-Remaining": integer("Sends left in the current hour window."),
        "RateLimit-Reset": integer("Seconds until the oldest send still counted leaves the window "
                                   "(another slot frees)."),
    }


def _operation(summary: str, responses: dict[str, Any], *, secured: bool = True, **extra: Any) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    operation["security"] = _BEARER if secured else []
    return operation


def _paths() -> dict[str, Any]:
    send_responses = {
        "202": {**_ok(SEND_STATUSES["202"], "Accepted", _LIMIT_HEADERS), "links": {"status": {
            "operationId": "messageStatus", "parameters": {"message_id": "$response.body#/id"},
            "description": "The accepted message's state."}}},
        **{code: _error(text, _RETRY if code == "429" else None)
           for code, text in SEND_STATUSES.items() if code != "202"},
    }
    read = {code: _error(text, _RETRY if code == "429" else None) for code, text in READ_STATUSES.items()}
    return {
        "/api/send": {"post": _operation(
            "Queue one message for delivery", send_responses, operationId="send",
            parameters=[{"name": "Idempotency-Key", "in": "header", "required": False,
                         "description": f"A repeat with the same key and body within {IDEMPOTENCY_HOURS} h "
                                        "returns the first answer and queues nothing.",
                         "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX}}],
            requestBody={"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/SendRequest"}}}},
        )},
        "/api/messages/{message_id}": {"get": _operation(
            "One message: its state, attempts and each recipient's outcome",
            {"200": _ok("The message.", "MessageStatus"), **read,
             "404": _error("No message with this id is known to this relay.")},
            operationId="messageStatus",
            parameters=[{"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        )},
        "/api/health": {"get": _operation(
            "Would mail flow now?", {"200": _ok("The verdict and its facts.", "Health"), **read},
            operationId="health")},
        "/healthz": {"get": _operation(
            "Liveness probe (no key; no secrets, no hostnames)",
            {"200": _ok("The web process answers.", "Liveness"),
             "503": _ok("The web process cannot reach its store.", "Liveness")},
            secured=False, operationId="liveness")},
        "/api/openapi.json": {"get": _operation(
            "This document", {"200": {"description": "OpenAPI 3.1.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            secured=False, operationId="openapi")},
    }


@functools.lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "TS Pro Relay", "version": __version__,
                 "description": "The portal's JSON API: every answer is JSON; a failure is "
                                "{\"ok\": false, \"error\": \"<sentence>\"}."},
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "headers": _headers(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The relay's API key (tspro-relay api-key show)."}},
        },
        "security": _BEARER,
    }


@functools.lru_cache(maxsize=1)
def document_bytes() -> bytes:
    return json.dumps(document(), separators=(",", ":")).encode()
