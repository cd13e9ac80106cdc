"""The portal's message: parse and validate its JSON, and its stored form.

Pure functions, no I/O. The store keeps the validated request's own bytes
(``pack_stored``) and the worker renders the MIME (``mime.py``): rendering
costs most of the web's budget per accept, and a second copy of a 20 MiB
attachment its memory.
"""

from __future__ import annotations

import binascii
import codecs
import json
import mimetypes
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .crypto import random_bytes
from .errors import BadRequest, Forbidden, PayloadTooLarge
from .options import Options, is_address

MAX_RECIPIENTS = 100
# The portal attaches a few files at most; each one costs the worker a MIME part to render,
# so a count in the hundreds of thousands (one-byte files well under the size cap) is refused.
MAX_ATTACHMENTS = 50
MAX_SUBJECT = 998
MAX_NAME = 256
MAX_MIME_TYPE = 255
_MIME_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
# RFC 2045 parameters: `; name=token` or `; name="quoted string"`, strictly.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(rf'\s*;\s*({_TOKEN})=({_TOKEN}|"(?:[^"\\\x00-\x1f\x7f]|\\[^\x00-\x1f\x7f])*")\s*')
# The request's top-level fields; anything else is ignored and named in the answer.
KNOWN_FIELDS = frozenset({"from_email", "from_name", "to", "cc", "bcc", "subject", "text", "html", "reply_to",
                          "reply_to_name", "attachments"})
RECIPIENT_KINDS = ("to", "cc", "bcc")
_HEADER_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_B64_CHUNK = 4 * 65536
_UNLIMITED = Options(max_attach_mb=1024 * 1024)


@dataclass
class Attachment:
    filename: str
    mime_type: str  # type/subtype, lower case
    content_b64: str  # whitespace removed, validated
    size: int  # decoded bytes
    params: tuple[tuple[str, str], ...] = ()  # Content-Type parameters, as given (charset added for UTF-8 text)


@dataclass
class OutgoingMessage:
    from_email: str
    from_name: str
    to: list[str]
    subject: str
    text: str
    html: str | None = None
    reply_to: str | None = None
    reply_to_name: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)

    @property
    def attachment_bytes(self) -> int:
        return sum(a.size for a in self.attachments)

    @property
    def envelope(self) -> list[tuple[str, str]]:
        """Every recipient with its kind (to, cc, bcc): the RCPT TO list."""
        return ([(a, "to") for a in self.to] + [(a, "cc") for a in self.cc] + [(a, "bcc") for a in self.bcc])


def ignored_fields(payload: Any) -> list[str]:
    """Top-level names the relay does not know, sorted (at most 20, each cut to 64 characters)."""
    if not isinstance(payload, dict) or payload.keys() <= KNOWN_FIELDS:
        return []
    names = sorted(str(name)[:64] for name in payload if name not in KNOWN_FIELDS)
    return names[:20]


def message_id_header(message_id: str, from_email: str) -> str:
    return f"<{message_id}@{from_email.rpartition('@')[2]}>"


def new_message_id() -> str:
    """Time-ordered and unguessable: 12 hex digits of milliseconds, 10 random."""
    return f"{int(time.time() * 1000):012x}{random_bytes(5).hex()}"


def _string(payload: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required.")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string.")
    return value


def _no_breaks(name: str, value: str) -> str:
    """Refuse control characters and whatever ``str.splitlines`` (and so the email package)
    treats as a line boundary, not only CR and LF."""
    if value.isprintable():  # (what is refused below is never printable; nearly every value is)
        return value
    if "\r" in value or "\n" in value:
        raise BadRequest(f"'{name}' must not contain a line break (CR or LF).")
    if _HEADER_UNSAFE.search(value):
        raise BadRequest(f"'{name}' must not contain control characters or line separators.")
    return value


def _name(field_name: str, value: str) -> str:
    """A display name: no line breaks, and short enough to fold into a header line."""
    _no_breaks(field_name, value)
    if len(value) > MAX_NAME:
        raise BadRequest(f"'{field_name}' is longer than {MAX_NAME} characters.")
    return value


def _address(name: str, value: str) -> str:
    value = _no_breaks(name, value).strip()
    if not is_address(value):
        raise BadRequest(f"'{name}' is not a valid email address: {value!r}.")
    return value


def _address_list(name: str, raw: Any) -> list[str]:
    """One recipient field: a list (one address per element) or a string split on , and ;."""
    if isinstance(raw, str):
        _no_breaks(name, raw)
        items = [part.strip() for part in re.split(r"[,;]", raw)]
        items = [item for item in items if item]
    elif isinstance(raw, list):
        items = []
        for item in raw:
            if not isinstance(item, str):
                raise BadRequest(f"Each element of '{name}' must be a string holding one address.")
            items.append(_no_breaks(name, item).strip())
    else:
        raise BadRequest(f"'{name}' must be a list of addresses or a comma-separated string.")
    if len(items) > MAX_RECIPIENTS:
        raise BadRequest(f"'{name}' holds {len(items)} recipients; at most {MAX_RECIPIENTS} are allowed.")
    return [_address(name, item) for item in items]


def _recipients(payload: dict[str, Any]) -> dict[str, list[str]]:
    """to, cc and bcc, validated alike; an address appears once, in its first field."""
    if payload.get("to") is None:
        raise BadRequest("'to' is required: give one address or a list of addresses.")
    lists = {kind: _address_list(kind, payload[kind]) if payload.get(kind) is not None else []
             for kind in RECIPIENT_KINDS}
    if not lists["to"]:
        raise BadRequest("'to' holds no recipient address.")
    total = sum(len(items) for items in lists.values())
    if total > MAX_RECIPIENTS:
        raise BadRequest(f"'to', 'cc' and 'bcc' hold {total} recipients; at most {MAX_RECIPIENTS} are allowed.")
    seen: set[str] = set()
    unique: dict[str, list[str]] = {}
    for kind, items in lists.items():
        unique[kind] = []
        for address in items:
            if address.lower() not in seen:
                seen.add(address.lower())
                unique[kind].append(address)
    return unique


def from_permitted(address: str, allowed: tuple[str, ...]) -> bool:
    """Exact address or exact domain, case-insensitive; an empty list admits all."""
    if not allowed:
        return True
    address = address.lower()
    domain = address.rpartition("@")[2]
    return any(item == address or item == domain for item in allowed)


def _attachment(index: int, raw: Any) -> Attachment:
    if not isinstance(raw, dict):
        raise BadRequest(f"attachments[{index}] must be an object with filename, mime_type and content_b64.")
    filename = raw.get("filename") or ""
    if not isinstance(filename, str):
        raise BadRequest(f"attachments[{index}].filename must be a string.")
    # Whitespace around a name is lost in the header anyway; a blank one gets the default.
    filename = _no_breaks(f"attachments[{index}].filename", filename).strip() or f"attachment-{index + 1}"
    mime_type = raw.get("mime_type") or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if not isinstance(mime_type, str):
        raise BadRequest(f"attachments[{index}].mime_type is not a MIME type such as application/pdf.")
    media_type, params = _media_type(index, mime_type)
    content = raw.get("content_b64")
    if not isinstance(content, str):
        raise BadRequest(f"attachments[{index}].content_b64 is required and must be a base64 string.")
    if any(ch in content for ch in " \t\r\n"):
        content = "".join(content.split())
    wants_charset = media_type.startswith("text/") and not any(k == "charset" for k, _ in params)
    size, utf8 = _decoded_size(index, content, check_utf8=wants_charset)
    if wants_charset and utf8:
        # Without a charset a reader assumes US-ASCII and garbles anything else.
        params = (*params, ("charset", "utf-8"))
    return Attachment(filename, media_type, content, size, params)


def _media_type(index: int, value: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``type/subtype`` and its parameters (names lower-cased, values unquoted), strictly parsed."""
    _no_breaks(f"attachments[{index}].mime_type", value)
    if len(value) > MAX_MIME_TYPE:  # it becomes one header line, which SMTP caps
        raise BadRequest(f"attachments[{index}].mime_type is longer than {MAX_MIME_TYPE} characters.")
    head, sep, rest = value.partition(";")
    head = head.strip()
    if not _MIME_TYPE_RE.fullmatch(head):
        raise BadRequest(f"attachments[{index}].mime_type is not a MIME type such as application/pdf.")
    params: list[tuple[str, str]] = []
    position, rest = 0, sep + rest
    while position < len(rest):
        match = _PARAM_RE.match(rest, position)
        if match is None:
            raise BadRequest(f"attachments[{index}].mime_type has a malformed parameter: give "
                             "type/subtype; name=value (for example text/plain; charset=utf-8).")
        name, raw_value = match.group(1).lower(), match.group(2)
        if raw_value.startswith('"'):
            raw_value = re.sub(r"\\(.)", r"\1", raw_value[1:-1])
        if any(existing == name for existing, _ in params):
            raise BadRequest(f"attachments[{index}].mime_type gives the parameter {name!r} twice.")
        params.append((name, raw_value))
        position = match.end()
    return head.lower(), tuple(params)


def _decoded_size(index: int, content: str, check_utf8: bool = False) -> tuple[int, bool]:
    """Validate base64 a chunk at a time; its decoded size, and whether those bytes are UTF-8."""
    first_pad = content.find("=")  # no stripped copy: this may be 28 MB of text
    if first_pad != -1 and (first_pad < len(content) - 2 or content[-1] != "="):
        # Checked here because the chunked decode below sees each chunk alone.
        raise BadRequest(f"attachments[{index}].content_b64 is not valid base64 (padding before the end).")
    if len(content) % 4:
        raise BadRequest(f"attachments[{index}].content_b64 is not valid base64 (its length is not a multiple of 4).")
    decoder = codecs.getincrementaldecoder("utf-8")() if check_utf8 else None
    utf8 = check_utf8
    try:
        for start in range(0, len(content), _B64_CHUNK):
            chunk = binascii.a2b_base64(content[start:start + _B64_CHUNK], strict_mode=True)
            if decoder is not None and utf8:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8 = False
    except (binascii.Error, ValueError):
        raise BadRequest(f"attachments[{index}].content_b64 is not valid base64.") from None
    if decoder is not None and utf8:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8 = False
    padding = len(content) - first_pad if first_pad != -1 else 0
    return len(content) // 4 * 3 - padding, utf8


def parse_payload(payload: Any, options: Options, key_allowed: tuple[str, ...] = (),
                  key_label: str = "", max_attachments: int | None = MAX_ATTACHMENTS) -> OutgoingMessage:
    """Validate the portal's JSON in the contract's order: from, recipients, attachments.

    ``key_allowed``: the sending key's own Allowed From list, checked as well as
    the relay's. ``max_attachments``: None for a message accepted under an
    earlier limit.
    """
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")

    # Missing, empty and blank all mean "use the Default From". The default name goes only with the
    # default address: the portal sends "from_name": "" for a site without a sender name and writes the
    # bare address over direct SMTP, so the sender must not change when the relay is switched on.
    # A line break is refused even where stripping would leave nothing.
    given_email = _no_breaks("from_email", _string(payload, "from_email") or "").strip()
    from_email = given_email or options.default_from
    if not from_email:
        raise BadRequest("'from_email' is missing and the relay has no Default From address.")
    from_email = _address("from_email", from_email)
    given_name = _no_breaks("from_name", _string(payload, "from_name") or "")
    if not given_name.strip():
        given_name = "" if given_email else options.default_from_name
    from_name = _name("from_name", given_name)
    if not from_permitted(from_email, options.allowed_from_items):
        raise Forbidden(f"The From address {from_email} is not permitted by the relay's Allowed From list.")
    if not from_permitted(from_email, key_allowed):
        raise Forbidden(f"The From address {from_email} is not permitted by the Allowed From list of the API key "
                        f"“{key_label}”.")

    recipients = _recipients(payload)

    subject = _no_breaks("subject", _string(payload, "subject") or "")
    if len(subject) > MAX_SUBJECT:
        raise BadRequest(f"'subject' is longer than {MAX_SUBJECT} characters.")
    text = _string(payload, "text") or ""
    html = _string(payload, "html") or None
    reply_to = _string(payload, "reply_to") or None
    if reply_to is not None:
        reply_to = _address("reply_to", reply_to)
    reply_to_name = _string(payload, "reply_to_name")
    if reply_to_name is not None:
        _name("reply_to_name", reply_to_name)

    raw_attachments = payload.get("attachments") or []
    if not isinstance(raw_attachments, list):
        raise BadRequest("'attachments' must be a list.")
    if max_attachments is not None and len(raw_attachments) > max_attachments:
        raise PayloadTooLarge(f"The message has {len(raw_attachments)} attachments; the relay accepts at most "
                              f"{max_attachments} per message.")
    attachments = [_attachment(i, raw) for i, raw in enumerate(raw_attachments)]
    if not text and not html and not subject and not attachments:
        # An empty body is fine (an empty text part) when something else carries the message.
        raise BadRequest("The message is empty: give a 'text' or 'html' body, a 'subject' or an attachment.")
    message = OutgoingMessage(from_email, from_name, recipients["to"], subject, text, html, reply_to,
                              reply_to_name, attachments, recipients["cc"], recipients["bcc"])
    if message.attachment_bytes > options.max_attach_bytes:
        raise PayloadTooLarge(
            f"The attachments total {message.attachment_bytes} bytes, over the relay's limit of "
            f"{options.max_attach_mb:g} MB ({options.max_attach_bytes} bytes)."
        )
    return message


STORED_VERSION = 1
_RESOLVED_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))  # made once, not per message


def pack_stored(raw_request: bytearray, message: OutgoingMessage) -> bytearray:
    """The request, newline, the resolved values as compact ASCII JSON (so the last newline
    is the separator), appended to ``raw_request`` in place: no second copy of a large body."""
    header = _RESOLVED_ENCODER.encode({"v": STORED_VERSION, "from_email": message.from_email,
                                       "from_name": message.from_name, "to": message.to, "cc": message.cc,
                                       "bcc": message.bcc}).encode()
    raw_request += b"\n"
    raw_request += header
    return raw_request


def is_rendered_mime(document: bytes) -> bool:
    """Whether a stored document is finished MIME, as schema version 1 stored, which an
    upgrade must still deliver."""
    return document.lstrip()[:1] != b"{"


def unpack_stored(document: bytes) -> OutgoingMessage:
    return parse_stored(*read_stored(document))


def read_stored(document: bytes) -> tuple[str, dict[str, Any]]:
    """``pack_stored``'s document as the request's text and the resolved values, decoded in
    place, so a caller that lets go of the document holds one large copy at a time."""
    newline = document.rindex(b"\n")
    resolved = json.loads(document[newline + 1:])
    if resolved.get("v") != STORED_VERSION:
        raise ValueError(f"stored message format {resolved.get('v')!r} is not known to this version")
    return str(memoryview(document)[:newline], json.detect_encoding(document), "surrogatepass"), resolved


def parse_stored(request: str, resolved: dict[str, Any]) -> OutgoingMessage:
    payload = json.loads(request)
    # The resolved line is the truth for recipients: a document stored before cc and bcc
    # were supported has none there, whatever its request held (those were not accepted).
    payload.update(from_email=resolved["from_email"], from_name=resolved["from_name"], to=resolved["to"],
                   cc=resolved.get("cc") or None, bcc=resolved.get("bcc") or None)
    return parse_payload(payload, _UNLIMITED, max_attachments=None)
