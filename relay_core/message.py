"""The portal's message: parse and validate its JSON, store it, build the MIME bytes.

Pure functions, no I/O. The store keeps the validated request's own bytes
(``pack_stored``) and the worker renders the MIME: rendering costs most of the
web's budget per accept, and a second copy of a 20 MiB attachment its memory.
Message-ID and Date come from the message's id and creation time, so every
rendering carries the same ones. Bodies and attachments are spliced into the
email package's skeleton a block at a time (already base64, validated in
chunks): letting it decode and re-encode held five to nine copies at once.
The skeleton of the usual message (ASCII headers that fit on their lines) is
written directly instead, byte for byte as the email package writes it (the
tests compare): its generator and header folding were a fifth of a worker's CPU.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import json
import mimetypes
import re
import secrets
import time
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import compat32
from email.utils import formataddr
from io import BytesIO
from typing import Any, Callable, Iterator
from urllib.parse import quote

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
# Headers folded at 78 with CRLF; bodies that are not plain short ASCII get a
# transfer encoding, so the bytes are valid without 8BITMIME.
_POLICY = compat32.clone(linesep="\r\n")
_LOOKS_ENCODED = "=?"
_LINE_END = re.compile(r"\r\n|\r")
_LONG_LINE = re.compile(r"(?:^|(?<=\r))[^\r\n]{999}", re.MULTILINE)  # over SMTP's 998 (tried at line starts)
_TEXT_BLOCK = 256 * 1024  # characters of a body encoded at a time
_FILENAME_PLAIN = 60
_SEGMENT = 60
_RFC2231_SAFE = "!#$&+-.^_`|~"  # RFC 2231 attribute-char besides letters and digits
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
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
_LINE = 76
_WRAP_BLOCK = _LINE * 1024  # whole lines: each block is wrapped on its own
_BLOCK_LINES = [slice(start, start + _LINE) for start in range(0, _WRAP_BLOCK, _LINE)]  # made once


@dataclass
class Attachment:
    filename: str
    mime_type: str  # type/subtype, lower case
    content_b64: str  # whitespace removed, validated
    size: int  # decoded bytes
    params: tuple[tuple[str, str], ...] = ()  # Content-Type parameters, as given (charset added for UTF-8 text)


# What replaces a placeholder in the rendered skeleton: a body's encoder, or an attachment.
_Content = Callable[[], Iterator[bytes]] | Attachment


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


def _mailbox(name: str | None, address: str, header_name: str) -> Header | str:
    """``Name <addr>``, the name RFC 2047-encoded when it is not ASCII.

    Split into as many encoded-words as it needs (one long word makes a line the
    server refuses). A name holding ``=?`` is encoded even in ASCII: a reader would
    decode it, and one holding "CRLF Bcc: ..." would show as another header.
    """
    if name and (not name.isascii() or _LOOKS_ENCODED in name):
        header = Header(charset="utf-8", header_name=header_name)
        header.append(name, "utf-8")
        header.append(f" <{address}>", "us-ascii")
        return header
    return formataddr((name or "", address))


def _header_text(value: str, name: str) -> Header | str:
    # Plain ASCII folds at spaces; non-ASCII, a word too long to fold, or text a reader
    # would take for an encoded-word (=?...?=) becomes RFC 2047 encoded-words, which
    # decode back to exactly this text and can be split anywhere.
    if value.isascii() and _LOOKS_ENCODED not in value and all(len(word) <= 900 for word in value.split()):
        return value
    return Header(value, "utf-8", header_name=name)


def _is_plain(body: str) -> bool:
    """Whether a body goes as 7bit: short-lined printable ASCII."""
    return body.isascii() and not _CONTROL.search(body) and not _LONG_LINE.search(body)


def _text_part(body: str, subtype: str, spliced: list[tuple[bytes, _Content]]) -> Message:
    """7bit when the text is short-lined printable ASCII; quoted-printable UTF-8 otherwise."""
    plain = _is_plain(body)
    part = MIMENonMultipart("text", subtype, charset="us-ascii" if plain else "utf-8")
    part["Content-Transfer-Encoding"] = "7bit" if plain else "quoted-printable"
    token = _placeholder(len(spliced))
    part.set_payload(token)
    spliced.append((token.encode(), functools.partial(_encoded_text, body, plain)))
    return part


def _encoded_text(body: str, plain: bool) -> Iterator[bytes]:
    """The body on the wire, a block of whole lines at a time; a bare CR ends a line too,
    as the generator would treat it."""
    start = 0
    while True:
        end = body.find("\n", start + _TEXT_BLOCK) + 1 or len(body)  # after a LF: a CRLF is never split
        block = body[start:end]
        if "\r" in block:
            block = _LINE_END.sub("\n", block)
        if end == len(body) and not block.endswith("\n"):
            block += "\n"
        data = block.encode("ascii" if plain else "utf-8").replace(b"\n", b"\r\n")
        # Each block holds a CRLF, so binascii ends its soft line breaks with CRLF too.
        yield data if plain else binascii.b2a_qp(data, istext=True)
        if end == len(body):
            return
        start = end


def _disposition(filename: str) -> str:
    """``attachment; filename=...`` with every line short enough for SMTP.

    A name that is not short plain ASCII goes in RFC 2231 continuations, one per
    folded line: a single 2 KB parameter passes the 998-byte line cap.
    """
    if filename.isascii() and _LOOKS_ENCODED not in filename and len(filename) <= _FILENAME_PLAIN:
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        return f'attachment; filename="{quoted}"'
    encoded = quote(filename, safe=_RFC2231_SAFE)
    segments, start = [], 0
    while start < len(encoded):
        end = min(start + _SEGMENT, len(encoded))
        while end < len(encoded) and "%" in encoded[end - 2:end]:
            end -= 1  # never split a %XX escape
        segments.append(encoded[start:end])
        start = end
    charset = "utf-8''"  # on the first segment only
    lines = [f"filename*{i}*={charset if i == 0 else ''}{segment}" for i, segment in enumerate(segments)]
    return "attachment;\n " + ";\n ".join(lines)


def _placeholder(index: int) -> str:
    return f"@@tspro-relay-part-{index}-{secrets.token_hex(8)}@@"


def _boundary() -> str:
    """Unguessable, so no body holds it: the bodies are spliced in after the generator's own check."""
    return f"=_{secrets.token_hex(16)}"


def build_mime(message: OutgoingMessage, message_id: str, created: float | None = None,
               generator: bool = False) -> bytes | bytearray:
    """Render the message as CRLF-terminated bytes ready for SMTP DATA.

    Written directly when every header is ASCII and fits on its line (``_written``);
    otherwise the classic ``email.mime`` API, which folds and encodes headers
    (``EmailMessage`` re-parses every header it is given: ~530 µs against ~125 µs
    for 2 KB; docs/architecture.md). ``generator``: always the email package.
    """
    headers: list[tuple[str, Header | str]] = [
        ("From", _mailbox(message.from_name, message.from_email, "From")),
        ("To", ", ".join(message.to)),
    ]
    if message.cc:
        headers.append(("Cc", ", ".join(message.cc)))
    # Bcc recipients are in the envelope only: no header names them.
    if message.reply_to:
        headers.append(("Reply-To", _mailbox(message.reply_to_name, message.reply_to, "Reply-To")))
    headers += [
        ("Subject", _header_text(message.subject, "Subject")),
        ("Date", _date(created if created is not None else time.time())),
        ("Message-ID", message_id_header(message_id, message.from_email)),
    ]
    segments = None if generator else _written(message, headers)
    return _assemble(segments if segments is not None else _generated(message, headers))


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date(when: float) -> str:
    """RFC 5322's date in UTC, as ``email.utils.format_datetime`` writes it."""
    t = time.gmtime(when)
    return (f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d}"
            f" {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")


# What the direct writer takes on: a header line the email package writes as it is given
# (ASCII, within compat32's 78 characters), and parameter values it quotes plainly.
_MAX_HEADER_LINE = 78
_PLAIN_PARAM = re.compile(r'[^"\\;\x00-\x1f\x7f]+')
_Segment = bytes | _Content


def _written(message: OutgoingMessage, headers: list[tuple[str, Header | str]]) -> list[_Segment] | None:
    """The message's segments written directly; None when a header would be folded or encoded
    (the email package does those)."""
    lines = [f"{name}: {value}" for name, value in headers if isinstance(value, str)]
    if len(lines) < len(headers) or not _fits(lines):
        return None
    attachments = [_Writer.attachment(attachment) for attachment in message.attachments]
    if None in attachments:
        return None
    if message.text and message.html:
        body = _Writer.multipart("alternative", [_Writer.text(message.text, "plain"),
                                                 _Writer.text(message.html, "html")])
    elif message.html:
        body = _Writer.text(message.html, "html")
    else:
        body = _Writer.text(message.text, "plain")  # possibly empty: a subject-only message
    if attachments:
        body = _Writer.multipart("mixed", [body, *attachments])  # type: ignore[list-item]
    writer = _Writer(lines)
    writer.part(body)
    return writer.segments()


class _Writer:
    """The segments of a rendered message: header lines and delimiters as bytes, with each body
    and attachment between them as what ``_assemble`` encodes in its place. A part is its header
    lines and its body: text to encode, an attachment, or (boundary, sub-parts)."""

    Part = tuple[list[str], Any]

    def __init__(self, header_lines: list[str]) -> None:
        self._text = [line + "\r\n" for line in header_lines]  # what goes before the next segment
        self._segments: list[_Segment] = []

    @staticmethod
    def text(body: str, subtype: str) -> "_Writer.Part":
        plain = _is_plain(body)
        return ([f'Content-Type: text/{subtype}; charset="{"us-ascii" if plain else "utf-8"}"', "MIME-Version: 1.0",
                 f"Content-Transfer-Encoding: {'7bit' if plain else 'quoted-printable'}"],
                functools.partial(_encoded_text, body, plain))

    @staticmethod
    def attachment(attachment: Attachment) -> "_Writer.Part | None":
        """None when a header would be folded: a long type or name, RFC 2231 continuations."""
        if not all(_PLAIN_PARAM.fullmatch(value) for _, value in attachment.params):
            return None
        disposition = _disposition(attachment.filename)
        content_type = "Content-Type: " + attachment.mime_type
        if attachment.params:  # (set_param moves Content-Type after MIME-Version)
            lines = ["MIME-Version: 1.0", content_type + "".join(f'; {name}="{value}"'
                                                                  for name, value in attachment.params)]
        else:
            lines = [content_type, "MIME-Version: 1.0"]
        lines += [f"Content-Disposition: {disposition}", "Content-Transfer-Encoding: base64"]
        if "\n" in disposition or not _fits(lines):
            return None
        return lines, attachment

    @staticmethod
    def multipart(subtype: str, parts: list["_Writer.Part"]) -> "_Writer.Part":
        boundary = _boundary()
        line = f'Content-Type: multipart/{subtype}; boundary="{boundary}"'
        if len(line) > _MAX_HEADER_LINE:
            line = f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"'  # where compat32 folds it
        return [line, "MIME-Version: 1.0"], (boundary, parts)

    def part(self, part: "_Writer.Part") -> None:
        lines, body = part
        self._text += [line + "\r\n" for line in lines]
        self._text.append("\r\n")
        if not isinstance(body, tuple):
            self._segments += ["".join(self._text).encode("ascii"), body]
            self._text = []
            return
        boundary, parts = body
        for index, sub in enumerate(parts):
            self._text.append(self._after(parts, index) + f"--{boundary}\r\n")
            self.part(sub)
        self._text.append(self._after(parts, len(parts)) + f"--{boundary}--\r\n")

    @staticmethod
    def _after(parts: list["_Writer.Part"], index: int) -> str:
        """What ends the part before a delimiter: a line end, which an attachment's last line has."""
        return "" if index == 0 or isinstance(parts[index - 1][1], Attachment) else "\r\n"

    def segments(self) -> list[_Segment]:
        return [*self._segments, "".join(self._text).encode("ascii")]


def _fits(lines: list[str]) -> bool:
    """Whether header lines go out as they are: ASCII, none longer than compat32 would fold."""
    return all(len(line) <= _MAX_HEADER_LINE and line.isascii() for line in lines)


def _generated(message: OutgoingMessage, headers: list[tuple[str, Header | str]]) -> list[_Segment]:
    """The message's skeleton rendered by the email package, placeholders where the bodies go."""
    # Each body and attachment is a placeholder in the rendered skeleton, listed in the order
    # they are written with what replaces it.
    spliced: list[tuple[bytes, _Content]] = []
    if message.text and message.html:
        body: Message = MIMEMultipart("alternative", boundary=_boundary())
        body.attach(_text_part(message.text, "plain", spliced))
        body.attach(_text_part(message.html, "html", spliced))
    elif message.html:
        body = _text_part(message.html, "html", spliced)
    else:
        body = _text_part(message.text, "plain", spliced)  # possibly empty: a subject-only message

    if message.attachments:
        msg: Message = MIMEMultipart("mixed", boundary=_boundary())
        msg.attach(body)
        for attachment in message.attachments:
            token = _placeholder(len(spliced))
            part = MIMEBase(*attachment.mime_type.split("/", 1))
            for param, param_value in attachment.params:
                part.set_param(param, param_value)
            part["Content-Disposition"] = _disposition(attachment.filename)
            part["Content-Transfer-Encoding"] = "base64"
            part.set_payload(token)
            msg.attach(part)
            spliced.append((token.encode(), attachment))
    else:
        msg = body

    # Top-level headers first, in the usual order, then the MIME ones the parts set.
    mime_headers = msg.items()
    for key in list(msg.keys()):
        del msg[key]
    for key, value in headers:
        msg[key] = value  # type: ignore[assignment]  # compat32 takes Header objects
    for key, value in mime_headers:
        msg[key] = value

    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
    rendered = out.getvalue()
    segments: list[_Segment] = []
    position = 0
    for token, content in spliced:
        at = rendered.index(token, position)
        segments += [rendered[position:at], content]
        position = at + len(token)
        if isinstance(content, Attachment) and rendered[position:position + 2] == b"\r\n":
            position += 2  # the last base64 line's CRLF stands for the one written after the token
    segments.append(rendered[position:])
    return segments


def _assemble(segments: list[_Segment]) -> bytearray:
    """The segments joined, each body and attachment encoded in its place (a body's encoded
    pieces, an attachment's base64 wrapped at 76).

    The result is allocated once at its final size: a buffer grown by
    appending may be copied as it grows, briefly holding two large messages.
    A body of one block is encoded once and kept; a larger one is encoded
    twice, to hold only a block of it at a time.
    """
    sizes, kept = 0, {}
    for index, segment in enumerate(segments):
        if isinstance(segment, bytes):
            sizes += len(segment)
        elif isinstance(segment, Attachment):
            sizes += _size(segment)
        else:
            pieces = segment()
            first = next(pieces, b"")
            second = next(pieces, None)
            if second is None:
                kept[index] = first
                sizes += len(first)
            else:
                sizes += len(first) + len(second) + sum(map(len, pieces))
    out = bytearray(sizes)
    filled = 0
    for index, segment in enumerate(segments):
        if isinstance(segment, bytes):
            pieces = (segment,)
        elif index in kept:
            pieces = (kept.pop(index),)
        else:
            pieces = _pieces(segment)
        for piece in pieces:
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
    return out


def _size(content: _Content) -> int:
    if not isinstance(content, Attachment):
        return sum(map(len, content()))  # encoded twice, to hold only a block of it at a time
    length = len(content.content_b64)
    return length + 2 * -(-length // _LINE)  # lines of 76, each ending CRLF


def _pieces(content: _Content) -> Iterator[bytes]:
    if not isinstance(content, Attachment):
        yield from content()
        return
    text = content.content_b64
    for start in range(0, len(text), _WRAP_BLOCK):
        block = text[start:start + _WRAP_BLOCK].encode("ascii")
        lines = list(map(block.__getitem__, _BLOCK_LINES[:-(-len(block) // _LINE)]))  # no Python loop
        lines.append(b"")
        yield b"\r\n".join(lines)
