"""What the real portal sends that the relay used to refuse or drop (issue 6), at the
level of the pure functions: parsing, the stored document, and the MIME bytes."""

from __future__ import annotations

import base64
import email
import json
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest

from relay_core.errors import BadRequest
from relay_core.message import (build_mime, ignored_fields, pack_stored, parse_payload, unpack_stored)
from relay_core.options import Options

DEFAULTS = Options(default_from="relay@example.org", default_from_name="The Relay")


def payload(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"from_email": "noreply@example.org", "from_name": "Portal",
                            "to": ["a@example.com"], "subject": "Hello", "text": "Body"}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not ...}


def parsed(data: bytes | bytearray) -> EmailMessage:
    return email.message_from_bytes(bytes(data), policy=policy.default)  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["", "   ", "\t", ...])
def test_empty_or_blank_from_name_with_a_from_email_gives_the_bare_address(name: Any) -> None:
    # The portal writes formataddr(("", address)) over direct SMTP: the relay must send the same From.
    message = parse_payload(payload(from_name=name), DEFAULTS)
    assert message.from_name == ""
    assert parsed(build_mime(message, "m1"))["From"] == "noreply@example.org"


@pytest.mark.parametrize("name", ["", "   ", ...])
def test_empty_from_name_without_a_from_email_takes_the_default_name(name: Any) -> None:
    message = parse_payload(payload(from_email=..., from_name=name), DEFAULTS)
    assert parsed(build_mime(message, "m1"))["From"] == "The Relay <relay@example.org>"


@pytest.mark.parametrize("address", ["", "  ", ...])
def test_empty_or_blank_from_email_falls_back_to_the_default_from(address: Any) -> None:
    assert parse_payload(payload(from_email=address), DEFAULTS).from_email == "relay@example.org"
    with pytest.raises(BadRequest, match="Default From"):
        parse_payload(payload(from_email=address), Options())


def test_cc_and_bcc_follow_the_rules_of_to() -> None:
    message = parse_payload(payload(to="a@example.com", cc="c1@example.com; c2@example.com",
                                    bcc=["b1@example.com", "A@example.com"]), Options())
    assert (message.to, message.cc, message.bcc) == (["a@example.com"], ["c1@example.com", "c2@example.com"],
                                                     ["b1@example.com"])  # a repeat keeps its first place
    assert message.envelope == [("a@example.com", "to"), ("c1@example.com", "cc"), ("c2@example.com", "cc"),
                                ("b1@example.com", "bcc")]
    for field, bad, fragment in [("cc", ["x@example.com, y@example.com"], "'cc' is not a valid email"),
                                 ("bcc", "ok@example.com\r\nX: 1", "'bcc' must not contain a line break"),
                                 ("cc", [5], "'cc' must be a string"), ("bcc", 5, "'bcc' must be a list")]:
        with pytest.raises(BadRequest, match=fragment):
            parse_payload(payload(**{field: bad}), Options())


def test_cc_and_bcc_count_toward_the_100_recipient_cap() -> None:
    to = [f"t{i}@example.com" for i in range(50)]
    cc = [f"c{i}@example.com" for i in range(30)]
    bcc = [f"b{i}@example.com" for i in range(20)]
    assert len(parse_payload(payload(to=to, cc=cc, bcc=bcc), Options()).envelope) == 100
    with pytest.raises(BadRequest, match="101 recipients"):
        parse_payload(payload(to=to, cc=cc, bcc=bcc + ["one-more@example.com"]), Options())


def test_bcc_never_reaches_the_headers_and_cc_does() -> None:
    message = parse_payload(payload(cc=["c@example.com"], bcc=["hidden@example.com"]), Options())
    raw = bytes(build_mime(message, "m1"))
    assert b"hidden@example.com" not in raw and b"Bcc" not in raw
    assert parsed(raw)["Cc"] == "c@example.com"


def test_the_stored_document_keeps_cc_and_bcc_and_an_old_one_has_none() -> None:
    request = payload(cc=["c@example.com"], bcc=["b@example.com"])
    message = parse_payload(request, Options())
    again = unpack_stored(bytes(pack_stored(bytearray(json.dumps(request).encode()), message)))
    assert (again.cc, again.bcc) == (["c@example.com"], ["b@example.com"])
    # Stored by the previous version: cc in the request, but only 'to' was accepted and recorded.
    old = json.dumps(request).encode() + b"\n" + json.dumps(
        {"v": 1, "from_email": "noreply@example.org", "from_name": "Portal", "to": ["a@example.com"]}).encode()
    assert (unpack_stored(old).cc, unpack_stored(old).bcc) == ([], [])


def attachment(content: bytes, mime_type: str) -> dict[str, Any]:
    return {"filename": "notes.txt", "mime_type": mime_type, "content_b64": base64.b64encode(content).decode()}


@pytest.mark.parametrize("mime_type,params", [
    ("text/plain; charset=utf-8", {"charset": "utf-8"}),
    ("Text/Plain;Charset=ISO-8859-1", {"charset": "ISO-8859-1"}),
    ('text/csv; charset="utf-8"; header=present', {"charset": "utf-8", "header": "present"}),
    ('application/octet-stream; name="a b.bin"', {"name": "a b.bin"}),
])
def test_a_media_type_with_parameters_is_accepted_and_kept_on_the_part(mime_type: str,
                                                                       params: dict[str, str]) -> None:
    message = parse_payload(payload(attachments=[attachment(b"abc", mime_type)]), Options())
    assert dict(message.attachments[0].params) == params
    (part,) = parsed(build_mime(message, "m1")).iter_attachments()
    assert part.get_content_type() == mime_type.split(";")[0].lower()
    for name, value in params.items():
        assert part.get_param(name) == value


@pytest.mark.parametrize("mime_type", ["text/plain;", "text/plain; charset", "text/plain; charset=a b",
                                       "text/plain; charset=utf-8; charset=latin1", 'text/plain; x="open',
                                       "text/plain; charset=utf-8\r\nX-Injected: 1", "text/plain charset=utf-8"])
def test_a_malformed_parameter_is_refused(mime_type: str) -> None:
    with pytest.raises(BadRequest, match="mime_type"):
        parse_payload(payload(attachments=[attachment(b"abc", mime_type)]), Options())


def test_text_without_a_charset_gets_utf8_when_its_bytes_are_utf8() -> None:
    items = [attachment("Åsa, Malmö\n".encode(), "text/plain"), attachment(b"\xff\xfe latin junk", "text/plain"),
             attachment("ünï".encode(), "text/plain; charset=iso-8859-1"),
             attachment("ünï".encode(), "application/octet-stream")]
    message = parse_payload(payload(attachments=items), Options())
    assert [dict(a.params).get("charset") for a in message.attachments] == ["utf-8", None, "iso-8859-1", None]
    parts = list(parsed(build_mime(message, "m1")).iter_attachments())
    assert parts[0].get_content_charset() == "utf-8"
    assert parts[0].get_payload(decode=True) == "Åsa, Malmö\n".encode()


def test_utf8_split_across_base64_chunks_is_still_recognised() -> None:
    text = ("é" * 200_000).encode()  # 400 KB: several validation chunks, a character cut at each edge
    message = parse_payload(payload(attachments=[attachment(text, "text/plain")]), Options())
    assert dict(message.attachments[0].params) == {"charset": "utf-8"}


@pytest.mark.parametrize("changes", [{"text": ""}, {"text": "", "html": None}, {"text": None},
                                     {"text": "", "subject": "", "attachments": [attachment(b"x", "text/plain")]}])
def test_an_empty_body_is_an_empty_text_part_when_a_subject_or_attachment_carries_the_message(
        changes: dict[str, Any]) -> None:
    msg = parsed(build_mime(parse_payload(payload(**changes), Options()), "m1"))
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content().strip() == ""
    assert msg.get_body(("html",)) is None


def test_a_message_with_nothing_at_all_is_still_refused() -> None:
    with pytest.raises(BadRequest, match="message is empty"):
        parse_payload(payload(text="", subject=""), Options())


def test_unknown_top_level_fields_are_named_not_refused() -> None:
    request = payload(cc=["c@example.com"], reply_to_nmae="typo", priority="high")
    assert parse_payload(request, Options()).to == ["a@example.com"]
    assert ignored_fields(request) == ["priority", "reply_to_nmae"]
    assert ignored_fields(payload()) == []
    many = {f"field{i:03d}" + "x" * 100: 1 for i in range(50)}
    named = ignored_fields({**payload(), **many})
    assert len(named) == 20 and all(len(name) == 64 for name in named)
