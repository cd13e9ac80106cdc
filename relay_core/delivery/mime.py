"""The MIME bytes of a stored message, built by the worker at each attempt.

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
import functools
import re
import secrets
import time
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

from ..message import Attachment, OutgoingMessage, message_id_header

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
_LINE = 76
_WRAP_BLOCK = _LINE * 1024  # whole lines: each block is wrapped on its own
_BLOCK_LINES = [slice(start, start + _LINE) for start in range(0, _WRAP_BLOCK, _LINE)]  # made once
# What replaces a placeholder in the rendered skeleton: a body's encoder, or an attachment.
_Content = Callable[[], Iterator[bytes]] | Attachment


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
