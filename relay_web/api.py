"""The portal's JSON API: POST /api/send, GET /api/messages/{id}, health.

The key is checked before a byte of the body is read, so an empty POST tells
a valid key (400) from a bad one (401); a wrong key counts against its
address's budget (429 past it).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from relay_core import __version__
from relay_core.store import metrics
from relay_core.errors import (BadRequest, Conflict, NotConfigured, NotFound, PayloadTooLarge,
                               RateLimited, RelayError, StoreUnavailable, Unauthorized)
from relay_core.intake.group_commit import NothingWritten
from relay_core.store.limits import Quota, effective_limit
from relay_core.delivery.mailflow import assess
from relay_core.options import Options
from relay_core.store.refusals import MISSING, WRONG
from relay_core.message import ignored_fields, new_message_id, pack_stored, parse_payload
from relay_core.store import ApiKey, LogEntry, NewMessage, insert_log

from . import openapi
from .auth import bearer_token, client_ip
from .state import AppState

IDEMPOTENCY_WINDOW = 24 * 3600
ACCEPTED = "accepted"  # the writer's kind for an accepted message and its log row (acceptance.insert_accepted)
_THREAD_THRESHOLD = 256 * 1024  # parse and build larger bodies off the event loop



def _seconds(count: int) -> str:
    return "1 second" if count == 1 else f"{count} seconds"

def _state(request: Request) -> AppState:
    return request.app.state.relay


def authenticate(request: Request, keys: list[ApiKey] | None = None, options: Options | None = None,
                 rev: int | None = None) -> ApiKey:
    """The live key of this request; else 401, or 429 once its address is over its budget.

    ``rev``: the revision of a cached ``keys``; no refusal on them before checking it (``_Stale``).
    """
    state = _state(request)
    token = bearer_token(request)
    key = state.store.api_keys.authenticate(token, keys) if token else None
    if key is None:
        if rev is not None and state.store.revision() != rev:
            raise _Stale()
        ip = client_ip(request, state.settings)
        budget = (options or state.store.options()).bad_key_per_minute
        wait = state.refusals.unauthenticated(ip, WRONG if token else MISSING, budget)
        refusal: RelayError
        if wait:
            refusal = RateLimited(f"Too many requests with a missing or wrong API key from {ip} this minute "
                                  f"(the limit is {budget}); retry in {_seconds(wait)}.", retry_after=wait)
        else:
            refusal = Unauthorized("Missing or invalid API key: send the relay's key as "
                                   "'Authorization: Bearer <key>'.")
        refusal.logged = True  # counted into its address's log row for this minute
        raise refusal
    state.note_key_use(key.id)
    return key


def _over_limit(limit: int, quota: Quota) -> RateLimited:
    return RateLimited(f"This API key has reached its limit of {limit} messages per hour; the next one can be "
                       f"sent in {_seconds(quota.retry_after)}.", retry_after=quota.retry_after, headers=quota.headers())


def _body_too_big(cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the relay accepts ({cap} bytes).")


def _too_big(cap: int) -> PayloadTooLarge:
    """In the admin's terms: the MB they set, which the send cap follows from (Options.max_body_bytes)."""
    attach_mb = round(max(0, cap - 4 - 1024 * 1024) * 3 / 4 / (1024 * 1024), 2)
    return PayloadTooLarge(f"The request is larger than the relay accepts: attachments may total at most "
                           f"{attach_mb:g} MB (the Max attachment size in the relay's settings), which is about "
                           f"{cap / (1024 * 1024):.1f} MB of JSON once base64-encoded.")


def declared_length(request: Request) -> int | None:
    length = request.headers.get("content-length")
    if length is None:
        return None
    try:
        return int(length)
    except ValueError:
        raise BadRequest("The Content-Length header is not a number.") from None


async def read_capped_body(request: Request, cap: int, fresh_cap: Callable[[], int] | None = None,
                           too_big: Callable[[int], PayloadTooLarge] = _body_too_big) -> bytearray:
    """Read at most ``cap`` bytes, growing with what arrives, never from the declared length
    (a client may declare 36 MB and send a byte a minute). ``fresh_cap``: asked once before
    refusing, since ``cap`` may be out of date."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > cap and fresh_cap is not None:
                cap, fresh_cap = fresh_cap(), None
            if len(body) + len(chunk) > cap:
                raise too_big(cap)
            body += chunk
    except ClientDisconnect:
        raise BadRequest("The client closed the connection before its request body arrived.") from None
    return body


def _decode_text(body: bytearray) -> str:
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise BadRequest("The request body is not UTF-8 encoded JSON.") from None


# A bound on the JSON values a body may hold, counted from above as its commas and openers (a
# comma inside a string counts too). Decoded, each value is an object of 30-60 bytes, so a body of
# nothing but `{},` grows ~25-fold (a 34 MB one took 855 MiB); a message is a few long strings.
MAX_JSON_VALUES = 500_000


def _decode_json(text: str) -> Any:
    if text.count(",") + text.count("{") + text.count("[") > MAX_JSON_VALUES:
        raise BadRequest(f"The request body holds more than {MAX_JSON_VALUES:,} JSON values; a message is a few "
                         "fields and long strings (its text and its attachments' base64).")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON ({exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno}).") from None
    except RecursionError:
        raise BadRequest("The request body nests deeper than the relay reads; send the message as a flat "
                         "JSON object.") from None
    except ValueError:  # Python's int() limit: a number of more than 4,300 digits
        raise BadRequest("The request body holds a number too long to read (over 4,300 digits).") from None
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(payload)
    return payload


# UTF-8 cannot hold a surrogate: only a \uD800-\uDFFF escape can, so most bodies skip the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(payload: Any) -> None:
    """A lone surrogate (half of a UTF-16 pair) is no character: it could be neither stored nor sent."""
    stack = [(payload, "")]
    while stack:
        value, field = stack.pop()
        if isinstance(value, dict):
            for name, item in value.items():
                if not _is_text(name):
                    raise BadRequest("A field name contains a lone surrogate (\\ud800-\\udfff), which is not "
                                     "text: escape characters outside the BMP as surrogate pairs.")
                stack.append((item, field or name))
        elif isinstance(value, list):
            stack += [(item, field) for item in value]
        elif isinstance(value, str) and not _is_text(value):
            raise BadRequest(f"'{field}' contains a lone surrogate (\\ud800-\\udfff), which is not text: "
                             "escape characters outside the BMP as surrogate pairs.")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_json_in_place(box: list[Any]) -> None:
    box[0] = _decode_json(box[0])


_JSON = (b"content-type", b"application/json")
# JSONResponse's rendering, with the encoder made once (json.dumps with options makes one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class SendEndpoint:
    """POST /api/send, the one hot route, as a plain ASGI app (Route takes an instance as one): it
    writes JSONResponse's bytes itself, without building one or the route's request/response
    wrapper, which saved ~3% of an accept's CPU (docs/performance.md). Its refusals and errors
    reach the error middleware as any route's do."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, response, headers = await accept(Request(scope, receive))
        body = _ENCODER.encode(response).encode()
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()] if headers else []
        raw.append((b"content-length", str(len(body)).encode()))
        raw.append(_JSON)
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


send = SendEndpoint()


def _sender_and_recipients(payload: Any) -> tuple[str, str]:
    """What a refused request's log row is searched by, as given (unchecked, bounded)."""
    if not isinstance(payload, dict):
        return "", ""
    sender = payload.get("from_email")
    listed: list[str] = []
    for field in ("to", "cc", "bcc"):
        value = payload.get(field)
        if isinstance(value, str):
            listed.append(value)
        elif isinstance(value, list):
            listed += [v for v in value if isinstance(v, str)]
    return (sender if isinstance(sender, str) else "")[:320], ", ".join(listed)[:2000]


class _Stale(NothingWritten):
    """The settings or keys changed after this request was checked against them."""


STALE_RETRIES = 3


async def accept(request: Request) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """Validate, store and answer one send: (status, JSON answer, extra headers); refusals raise.

    Checked against the settings this process last read, without a read of its
    own; the writer checks their revision before anything is answered
    (docs/architecture.md, Settings without a read per send).
    """
    started = time.perf_counter()
    state = _state(request)
    attempt = _Accept(request, state)
    snapshot = state.store.cached_snapshot()
    try:
        for _ in range(STALE_RETRIES):
            try:
                return await attempt.run(snapshot, started)
            except _Stale:
                pass
            except RelayError as exc:
                exc.about = attempt.about  # for the refusal's log row, when the JSON could be read
                # A key refusal was checked against the current revision already (authenticate), and a
                # store that could not write does not depend on the settings (nor would it answer).
                if exc.logged or isinstance(exc, StoreUnavailable) or state.store.revision() == snapshot[0]:
                    raise  # refused on the current settings
            snapshot = state.store.fresh_snapshot()
    finally:
        state.bodies.release(attempt.claimed)
    raise StoreUnavailable("The relay's settings kept changing while this message was checked; nothing was "
                           "queued. Try again.")


class _Accept:
    """One send, checked and stored against one snapshot of the settings; the body is read once."""

    def __init__(self, request: Request, state: AppState) -> None:
        self.request = request
        self.state = state
        self.body: bytearray | None = None
        self.length = 0  # of the request itself (pack_stored appends to the buffer)
        self.claimed = 0  # bytes of the body budget this request holds until it is answered
        self.text: str | None = None  # the body decoded, while it is parsed (``body`` is None then)
        self.about: tuple[str, str] = ("", "")  # sender and recipients as the JSON gave them

    async def read(self, key: ApiKey, limit: int, options: Options, rev: int, idempotency_key: str) -> bytearray:
        """The body, read once; before a byte of it, refused on its declared length (413), the key's
        send limit (429) and the bodies being read already (503, ``http_limits.BodyBudget``)."""
        cap = options.max_body_bytes
        if self.text is not None:  # checked again after it was decoded (the settings changed)
            self.restore()
        if self.body is not None:
            del self.body[self.length:]
            if self.length > cap:
                raise _too_big(cap)
            return self.body

        def fresh_cap() -> int:  # over the cap: is it still the cap?
            if self.state.store.revision() == rev:
                return cap
            return self.state.store.fresh_snapshot()[1].max_body_bytes

        declared = declared_length(self.request)
        if declared is not None and declared > cap:
            cap = fresh_cap()
            if declared > cap:
                raise _too_big(cap)
        if limit and declared != 0:  # an empty POST is the portal's key check: 400 for any live key
            self.refuse_over_limit(key, limit, idempotency_key)
        self.claimed = self.state.bodies.claim(cap if declared is None else declared, cap)
        self.body = await read_capped_body(self.request, cap, fresh_cap, _too_big)
        self.length = len(self.body)
        return self.body

    def restore(self) -> bytearray:
        """The request's bytes again, from its text (the same bytes: it was decoded from UTF-8)."""
        assert self.text is not None
        data = self.text.encode()
        self.text = None
        self.body = bytearray(data)
        return self.body

    def refuse_over_limit(self, key: ApiKey, limit: int, idempotency_key: str) -> None:
        """429 before the body is read when the key is at its limit, unless this may be the repeat of
        an accepted send (an Idempotency-Key it has used: its first answer is given whatever the limit)."""
        store, now = self.state.store, time.time()
        quota = store.api_keys.refusal(key.id, limit, now)
        if quota is None:
            return
        if idempotency_key and store.messages.idempotent_answer(store.conn(), key.id, idempotency_key,
                                                                now - IDEMPOTENCY_WINDOW) is not None:
            return
        raise _over_limit(limit, quota)

    async def run(self, snapshot: tuple[int, Options, list[ApiKey]],
                  started: float) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        request, state = self.request, self.state
        rev, options, keys = snapshot
        key = authenticate(request, keys, options, rev)
        idempotency_key = request.headers.get("idempotency-key", "").strip()
        if len(idempotency_key) > 255:
            raise BadRequest("The Idempotency-Key header is longer than 255 characters.")
        limit = effective_limit(key, options, state.settings.send_per_hour)
        body = await self.read(key, limit, options, rev, idempotency_key)
        if not body or body.isspace():
            raise BadRequest("The request body is empty; send the message as a JSON object.")
        large = len(body) > _THREAD_THRESHOLD
        request_hash = hashlib.sha256(body).hexdigest() if idempotency_key else ""
        # The bytes give way to their text while it is parsed, and come back from it once the
        # payload has been let go: a 28 MB body is held at most twice at once, never three times.
        self.text = _decode_text(body)
        body = self.body = None
        if large:
            box: list[Any] = [self.text]  # not the thread's result: its future outlives the call, holding it
            await run_in_threadpool(_decode_json_in_place, box)
            payload = box.pop()
        else:
            payload = _decode_json(self.text)
        self.about = _sender_and_recipients(payload)
        if idempotency_key:
            # A repeat gets the first answer whatever has changed since (limits, settings).
            earlier = replay(state, key.id, idempotency_key, request_hash, time.time())
            if earlier is not None:
                return earlier[0], earlier[1], None
        message = parse_payload(payload, options, key.allowed_from_items, key.label)
        ignored = ignored_fields(payload)
        attachment_count = len(message.attachments)
        message.attachments.clear()  # their base64 text is in the request; drop the second copy
        del payload
        if not options.smtp_configured:
            raise NotConfigured("The relay's SMTP delivery is not configured yet, so this message could never "
                                "be sent. Set the SMTP host in the relay's settings.")
        body = self.restore()

        message_id = new_message_id()
        created = time.time()
        # Sealed by the writer thread as it stores it (acceptance.insert_accepted), not here: the
        # cipher lets go of the GIL, and doing that on the event loop hands the GIL to the writer
        # and back for every request, which cost about as much as all of the accept's checks.
        # The document is this request's buffer (self.body), kept in case the settings changed.
        document = pack_stored(body, message)
        record = NewMessage.accepted(message, message_id, b"", created, options, "api", key.id,
                                     attachment_count, size=len(document))
        answer: dict[str, Any] = {"ok": True, "id": message_id, "status": "queued"}
        detail = f"{len(record.recipients)} recipient(s), {attachment_count} attachment(s)"
        if ignored:
            # Named in the answer and in this log row, so a typo shows without losing mail
            # (and without a console line per accept, which would cost the accept path).
            answer["ignored"] = ignored
            detail += "; ignored unknown field(s): " + ", ".join(ignored)
        entry = LogEntry("accepted", "queued", message_id=message_id,
                         source_ip=client_ip(request, state.settings), sender=message.from_email,
                         recipients=", ".join(record.recipients), subject=message.subject,
                         detail=detail, ts=created, attachments=attachment_count)
        store = state.store

        def accept(conn):  # type: ignore[no-untyped-def]
            if state.intake.batch_value != rev:  # the revision, read in this transaction
                raise _Stale()  # checked against settings that have changed since: check again
            # The answer is claimed first, inside the write transaction: of two repeats
            # racing each other (two web processes, on PostgreSQL), one stores the message.
            if idempotency_key and not store.messages.remember_answer(conn, key.id, idempotency_key, request_hash,
                                                                      202, answer, created - IDEMPOTENCY_WINDOW):
                earlier = replay(state, key.id, idempotency_key, request_hash, created, conn)
                if earlier is not None:
                    return (*earlier, None), []
                raise StoreUnavailable("The relay could not settle this Idempotency-Key; nothing was queued. "
                                       "Try again.")
            # Counted in this transaction (no fsync of its own); a refusal rolls back this job only.
            quota = store.api_keys.take_send(conn, key.id, limit, created) if limit else None
            if quota is not None and quota.retry_after:
                raise _over_limit(limit, quota)
            state.intake.write(conn, ACCEPTED, (record, entry, document))  # with the batch's others, when it can
            return (202, answer, quota), [message_id]

        status, response, quota = await state.submit(accept, isolated=bool(idempotency_key or limit))
        if response is answer:  # stored now, not an idempotent replay: its latency counts
            state.accept_latency.add(time.perf_counter() - started)
        return status, response, quota.headers() if quota else None


def replay(state: AppState, key_id: int, idempotency_key: str, request_hash: str, now: float,
           conn: Any = None) -> tuple[int, dict[str, Any]] | None:
    """The first answer to this Idempotency-Key within 24 h, or None; 409 for another body."""
    earlier = state.store.messages.idempotent_answer(conn or state.store.conn(), key_id, idempotency_key,
                                                     now - IDEMPOTENCY_WINDOW)
    if earlier is None:
        return None
    earlier_hash, status, response = earlier
    if earlier_hash != request_hash:
        raise Conflict("This Idempotency-Key was already used with a different request body.")
    return status, response


async def message_status(request: Request) -> JSONResponse:
    key = authenticate(request)
    message_id = request.path_params["message_id"]
    view = _state(request).store.messages.status(message_id, sent_by=(key.id, key.is_primary))
    if view is None:
        raise NotFound(f"No message with id {message_id!r} is known to this relay.")
    return JSONResponse(view)


async def api_health(request: Request) -> JSONResponse:
    authenticate(request)
    state = _state(request)
    health = await run_in_threadpool(assess, state.store)
    answer = {**health.as_dict(), "version": __version__}
    if not state.intake.alive:
        answer.update(ok=False, error=" ".join(filter(None, [
            "The web process cannot store messages (its writer stopped); restart it.", answer["error"]])))
    return JSONResponse(answer)


async def openapi_document(request: Request) -> Response:
    """The API's OpenAPI 3.1 document (no key needed: it holds nothing secret)."""
    return Response(openapi.document_bytes(), media_type="application/json")


async def healthz(request: Request) -> JSONResponse:
    state = _state(request)
    try:
        answer = state.health()
    except Exception:
        return JSONResponse({"ok": False, "configured": False}, status_code=503)
    return JSONResponse(answer)


def error_response(request: Request, exc: RelayError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimited):
        headers.update(exc.headers)
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse({"ok": False, "error": exc.message}, status_code=exc.status, headers=headers)


def rejection_reason(exc: RelayError) -> str:
    name = type(exc).__name__
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


async def log_rejection(request: Request, exc: RelayError) -> None:
    """A refused send with a good key: a log row of its own for the first few a minute from one
    address, then counted into one row, so a flood cannot fill the log."""
    state = _state(request)
    ip = client_ip(request, state.settings)
    reason = rejection_reason(exc)
    if not state.refusals.detailed(ip):
        state.refusals.counted(ip, exc.status, reason)
        return
    event = "unauthorized" if isinstance(exc, Unauthorized) else "rejected"
    sender, recipients = getattr(exc, "about", ("", ""))
    entry = LogEntry(event, "rejected", code=exc.status, detail=exc.message, source_ip=ip, sender=sender,
                     recipients=recipients)

    def write(conn):  # type: ignore[no-untyped-def]
        insert_log(conn, entry)
        metrics.count_rejection(conn, reason)
        return None, []

    try:
        await state.submit(write)
    except RelayError:
        pass
