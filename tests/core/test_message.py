"""relay_core.message: the portal's JSON validated, and the MIME bytes it becomes.

Pure functions, so no fixtures beyond ``Options`` values; every built message is
parsed back with the standard library to check what a mail client would see.
The last section is what the real portal sends (blank names, cc and bcc, typed
parts, fields the relay does not know).
"""

from __future__ import annotations

import base64
import email
import email.header
import email.utils
import hashlib
import json
import re
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest

from relay_core.errors import BadRequest, Forbidden, PayloadTooLarge, RelayError
from relay_core.message import (MAX_ATTACHMENTS, MAX_RECIPIENTS, OutgoingMessage, ignored_fields,
                                new_message_id, pack_stored, parse_payload, unpack_stored)
from relay_core.delivery.mime import build_mime
from relay_core.options import Options, parse_option

OPTIONS = Options()
DEFAULTS = Options(default_from="relay@example.org", default_from_name="The Relay")


def payload(**overrides: Any) -> dict[str, Any]:
    """A valid payload; an override of ``...`` leaves that field out."""
    data: dict[str, Any] = {"from_email": "noreply@example.org", "from_name": "Portal",
                            "to": ["a@example.com"], "subject": "Hello", "text": "Body"}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not ...}


def attachment(content: bytes, filename: str = "file.bin", mime_type: str | None = "application/octet-stream",
               ) -> dict[str, Any]:
    item: dict[str, Any] = {"filename": filename, "content_b64": base64.b64encode(content).decode()}
    if mime_type is not None:
        item["mime_type"] = mime_type
    return item


def parsed(data: bytes | bytearray) -> EmailMessage:
    return email.message_from_bytes(bytes(data), policy=policy.default)  # type: ignore[return-value]


def content(part: Any) -> str:
    """A text part's content; on the wire its lines end in CRLF, which the parser keeps."""
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def build(options: Options = OPTIONS, message_id: str = "0190abcdef0123456789", **overrides: Any) -> bytes:
    return bytes(build_mime(parse_payload(payload(**overrides), options), message_id))


def lines_of(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


# -- parse_payload: senders ---------------------------------------------------------------
def test_a_complete_payload_is_parsed() -> None:
    message = parse_payload(payload(html="<p>Hi</p>", reply_to="help@example.org", reply_to_name="Help"), OPTIONS)
    assert message == OutgoingMessage("noreply@example.org", "Portal", ["a@example.com"], "Hello", "Body",
                                      "<p>Hi</p>", "help@example.org", "Help", [])


def test_missing_from_uses_the_default_from_and_name() -> None:
    options = Options(default_from="relay@example.org", default_from_name="The Relay")
    message = parse_payload(payload(from_email=None, from_name=None), options)
    assert (message.from_email, message.from_name) == ("relay@example.org", "The Relay")
    # An explicit name wins over the default name, even with the default address.
    message = parse_payload(payload(from_email=None, from_name="Portal"), options)
    assert (message.from_email, message.from_name) == ("relay@example.org", "Portal")
    # An explicit address never takes the default name: the sender must not change when the relay is switched on.
    message = parse_payload(payload(from_email="other@example.org", from_name=None), options)
    assert (message.from_email, message.from_name) == ("other@example.org", "")


def test_missing_from_without_a_default_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="from_email"):
        parse_payload(payload(from_email=None), OPTIONS)
    with pytest.raises(BadRequest, match="from_email"):
        parse_payload(payload(from_email=""), OPTIONS)


@pytest.mark.parametrize("sender,allowed", [
    ("noreply@example.org", True),
    ("NoReply@Example.ORG", True),
    ("anyone@example.org", True),  # domain entry
    ("boss@other.net", True),  # address entry
    ("BOSS@OTHER.NET", True),
    ("someone@other.net", False),  # only that one address of other.net
    ("noreply@mail.example.org", False),  # a subdomain is not the domain
    ("noreply@evilexample.org", False),
    ("noreply@example.org.evil.com", False),
    ("example.org@evil.com", False),
])
def test_allowed_from_matches_exact_address_or_domain_case_insensitively(sender: str, allowed: bool) -> None:
    # As stored: through the option's parser, as `config set` and the settings page do.
    options = Options(allowed_from=parse_option("allowed_from", "Example.org; boss@Other.net"))
    if allowed:
        assert parse_payload(payload(from_email=sender), options).from_email == sender
    else:
        with pytest.raises(Forbidden) as caught:
            parse_payload(payload(from_email=sender), options)
        assert caught.value.status == 403 and sender in caught.value.message


def test_allowed_from_also_applies_to_the_default_from() -> None:
    options = Options(default_from="relay@elsewhere.net", allowed_from=parse_option("allowed_from", "example.org"))
    with pytest.raises(Forbidden):
        parse_payload(payload(from_email=None), options)


def test_empty_allowlist_admits_every_sender() -> None:
    assert parse_payload(payload(from_email="x@anything.example"), OPTIONS).from_email == "x@anything.example"


# -- parse_payload: recipients ----------------------------------------------------------------
def test_to_string_is_split_on_commas_and_semicolons() -> None:
    message = parse_payload(payload(to=" a@example.com, b@example.com;c@example.com ;; ,"), OPTIONS)
    assert message.to == ["a@example.com", "b@example.com", "c@example.com"]


def test_a_single_address_string_is_one_recipient() -> None:
    assert parse_payload(payload(to="solo@example.com"), OPTIONS).to == ["solo@example.com"]


@pytest.mark.parametrize("element", ["a@example.com, b@example.com", "a@example.com;b@example.com"])
def test_list_elements_are_never_split(element: str) -> None:
    with pytest.raises(BadRequest, match="not a valid email"):
        parse_payload(payload(to=[element]), OPTIONS)


def test_duplicates_are_dropped_case_insensitively_keeping_the_first_spelling() -> None:
    message = parse_payload(payload(to=["Ann@Example.com", "bob@example.com", "ann@example.com",
                                        "BOB@EXAMPLE.COM", "cy@example.com"]), OPTIONS)
    assert message.to == ["Ann@Example.com", "bob@example.com", "cy@example.com"]
    message = parse_payload(payload(to="x@example.com; X@example.com, x@example.com"), OPTIONS)
    assert message.to == ["x@example.com"]


def test_one_hundred_recipients_pass_and_one_hundred_and_one_do_not() -> None:
    hundred = [f"user{i}@example.com" for i in range(MAX_RECIPIENTS)]
    assert parse_payload(payload(to=hundred), OPTIONS).to == hundred
    with pytest.raises(BadRequest, match="101 recipients"):
        parse_payload(payload(to=hundred + ["one-more@example.com"]), OPTIONS)
    with pytest.raises(BadRequest, match="101 recipients"):
        parse_payload(payload(to=",".join(hundred + ["one-more@example.com"])), OPTIONS)


@pytest.mark.parametrize("to,fragment", [
    (None, "'to' is required"),
    ([], "no recipient"),
    ("", "no recipient"),
    (" ; , ", "no recipient"),
    (["ok@example.com", "broken"], "not a valid email"),
    (["ok@example.com", 7], "must be a string"),
    ({"a": "b"}, "list of addresses"),
    (["a@@example.com"], "not a valid email"),
    (["a b@example.com"], "not a valid email"),
    (["<a@example.com>"], "not a valid email"),
])
def test_bad_recipients_are_refused(to: Any, fragment: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(fragment)):
        parse_payload(payload(to=to), OPTIONS)


# -- parse_payload: header injection ---------------------------------------------------------
HEADER_FIELDS = ["from_email", "from_name", "subject", "reply_to", "reply_to_name", "to_string", "to_element",
                 "filename", "mime_type"]


def _with(field: str, bad: str) -> dict[str, Any]:
    if field == "to_string":
        return payload(to=f"a@example.com{bad}")
    if field == "to_element":
        return payload(to=[f"a@example.com{bad}"])
    if field in ("filename", "mime_type"):
        item = attachment(b"abc", filename="notes.txt", mime_type="text/plain")
        item[field] = item[field] + bad
        return payload(attachments=[item])
    base = {"from_email": "noreply@example.org", "from_name": "Portal", "subject": "Hello",
            "reply_to": "help@example.org", "reply_to_name": "Help"}
    return payload(**{**base, field: base[field] + bad})


@pytest.mark.parametrize("bad", ["\r\nBcc: victim@example.com", "\nX-Injected: 1", "\rX: 1", "\x00",
                                 "\r\n", "\n"], ids=["crlf-header", "lf-header", "cr", "nul", "trailing-crlf",
                                                     "trailing-lf"])
@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_cr_lf_and_nul_are_refused_in_every_header_field(field: str, bad: str) -> None:
    data = _with(field, bad)
    with pytest.raises(BadRequest) as caught:
        parse_payload(data, OPTIONS)
    assert caught.value.status == 400


@pytest.mark.parametrize("mime_type", ["text/plain\n", "application/pdf\n"], ids=["text-plain", "application-pdf"])
def test_a_mime_type_ending_in_a_line_break_never_reaches_the_wire(mime_type: str) -> None:
    # Either refused (400) or rendered without the bare LF: smtplib sends bytes as they are.
    item = attachment(b"abc", filename="notes.txt", mime_type=mime_type)
    try:
        data = build(attachments=[item])
    except BadRequest:
        return
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_header_fields_without_breaks_are_fine() -> None:
    # The control for the test above: the same payloads without the bad characters pass.
    for field in HEADER_FIELDS:
        parse_payload(_with(field, ""), OPTIONS)


def test_subject_length_is_bounded() -> None:
    assert parse_payload(payload(subject="s" * 998), OPTIONS).subject == "s" * 998
    with pytest.raises(BadRequest, match="subject"):
        parse_payload(payload(subject="s" * 999), OPTIONS)


@pytest.mark.parametrize("changes,fragment", [
    ({"text": "", "html": None, "subject": ""}, "message is empty"),
    ({"text": None, "html": "", "subject": None}, "message is empty"),
    ({"subject": 5}, "'subject' must be a string"),
    ({"text": ["x"]}, "'text' must be a string"),
    ({"from_email": 3}, "'from_email' must be a string"),
    ({"reply_to": "not an address"}, "reply_to"),
    ({"attachments": "file"}, "must be a list"),
    ({"attachments": ["file"]}, "attachments[0]"),
])
def test_other_invalid_fields(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(fragment)):
        parse_payload(payload(**changes), OPTIONS)


def test_not_an_object_is_refused() -> None:
    for value in ([payload()], "text", None, 3):
        with pytest.raises(BadRequest, match="JSON object"):
            parse_payload(value, OPTIONS)


def test_html_only_is_accepted() -> None:
    message = parse_payload(payload(text=None, html="<p>Only</p>"), OPTIONS)
    assert (message.text, message.html) == ("", "<p>Only</p>")


# -- parse_payload: attachments ------------------------------------------------------------------
@pytest.mark.parametrize("content,size", [
    ("", 0), ("YQ==", 1), ("YWI=", 2), ("YWJj", 3), ("YWJjZA==", 4), ("YWJjZGU=", 5), ("YWJjZGVm", 6),
])
def test_decoded_size_counts_padding(content: str, size: int) -> None:
    message = parse_payload(payload(attachments=[{"filename": "a.bin", "content_b64": content}]), OPTIONS)
    assert message.attachments[0].size == size == len(base64.b64decode(content))
    assert message.attachment_bytes == size


def test_whitespace_in_base64_is_stripped_before_validation() -> None:
    data = bytes(range(256)) * 3
    wrapped = base64.encodebytes(data).decode()  # 76-column lines with \n
    spaced = "\r\n ".join(wrapped.split("\n")) + "\t"
    message = parse_payload(payload(attachments=[{"filename": "a.bin", "content_b64": spaced}]), OPTIONS)
    stored = message.attachments[0]
    assert not re.search(r"\s", stored.content_b64)
    assert base64.b64decode(stored.content_b64) == data and stored.size == len(data)


@pytest.mark.parametrize("content", [
    "YWJ",  # length not a multiple of 4
    "YWJj!",
    "YW!j",
    "%%%%",
    "YQ==YWJj",  # padding in the middle
    "Y===",
    "====",
    "YWJjZA=",
])
def test_invalid_base64_is_refused(content: str) -> None:
    with pytest.raises(BadRequest, match="base64"):
        parse_payload(payload(attachments=[{"filename": "a.bin", "content_b64": content}]), OPTIONS)


@pytest.mark.parametrize("prefix_len", [0, 4, 4 * 65536 - 4, 4 * 65536],
                         ids=["start", "early", "end-of-first-chunk", "second-chunk"])
def test_padding_in_the_middle_is_refused_at_any_offset(prefix_len: int) -> None:
    # Validation runs in chunks of 4 * 65536 characters; padding that ends a chunk
    # must not let more data follow it.
    content = "A" * prefix_len + "YQ==" + "YWJj"
    with pytest.raises(BadRequest, match="base64"):
        parse_payload(payload(attachments=[{"filename": "a.bin", "content_b64": content}]), OPTIONS)


def test_missing_or_non_string_content_is_refused() -> None:
    for item in ({"filename": "a.txt"}, {"filename": "a.txt", "content_b64": 12},
                 {"filename": "a.txt", "content_b64": None}):
        with pytest.raises(BadRequest, match="content_b64"):
            parse_payload(payload(attachments=[item]), OPTIONS)


@pytest.mark.parametrize("filename,expected", [
    ("minutes.pdf", "application/pdf"),
    ("roster.CSV", "text/csv"),
    ("photo.png", "image/png"),
    ("notes.txt", "text/plain"),
    ("blob.unknownext", "application/octet-stream"),
    ("no-extension", "application/octet-stream"),
])
def test_mime_type_is_guessed_from_the_filename_when_missing(filename: str, expected: str) -> None:
    for item in (attachment(b"x", filename=filename, mime_type=None),
                 attachment(b"x", filename=filename, mime_type="")):
        assert parse_payload(payload(attachments=[item]), OPTIONS).attachments[0].mime_type == expected


def test_given_mime_type_wins_and_is_lowercased() -> None:
    item = attachment(b"x", filename="minutes.pdf", mime_type="Text/Plain")
    assert parse_payload(payload(attachments=[item]), OPTIONS).attachments[0].mime_type == "text/plain"


@pytest.mark.parametrize("mime_type", ["pdf", "text/", "/plain", "text plain",
                                       "text/pl ain", 5])
def test_malformed_mime_type_is_refused(mime_type: Any) -> None:
    item = attachment(b"x", filename="a.txt")
    item["mime_type"] = mime_type
    with pytest.raises(BadRequest, match="mime_type"):
        parse_payload(payload(attachments=[item]), OPTIONS)


def test_missing_filename_gets_a_numbered_name() -> None:
    items = [attachment(b"1"), {"content_b64": "Mg==", "mime_type": "text/plain"}]
    message = parse_payload(payload(attachments=items), OPTIONS)
    assert [a.filename for a in message.attachments] == ["file.bin", "attachment-2"]


def test_attachment_limit_counts_decoded_bytes_across_attachments() -> None:
    options = Options(max_attach_mb=10 / (1024 * 1024))  # 10 bytes
    assert options.max_attach_bytes == 10
    # 4 + 6 = 10 decoded bytes (16 base64 characters with padding) is exactly the limit.
    ok = [attachment(b"abcd"), attachment(b"efghij")]
    assert parse_payload(payload(attachments=ok), options).attachment_bytes == 10
    with pytest.raises(PayloadTooLarge) as caught:
        parse_payload(payload(attachments=[attachment(b"abcd"), attachment(b"efghijk")]), options)
    assert caught.value.status == 413 and "11 bytes" in caught.value.message


def test_fifty_attachments_pass_and_fifty_one_are_413_before_any_is_decoded() -> None:
    assert MAX_ATTACHMENTS == 50  # the number the README and the API document give
    fifty = [attachment(b"x", f"f{i}.txt") for i in range(MAX_ATTACHMENTS)]
    assert len(parse_payload(payload(attachments=fifty), OPTIONS).attachments) == 50
    # The 51st is not even valid base64: the count is refused first, without decoding any.
    over = fifty + [{"filename": "bad.bin", "content_b64": "!"}]
    with pytest.raises(PayloadTooLarge) as caught:
        parse_payload(payload(attachments=over), OPTIONS)
    assert caught.value.status == 413
    assert caught.value.message == "The message has 51 attachments; the relay accepts at most 50 per message."


def test_a_message_stored_before_the_attachment_cap_still_renders() -> None:
    """Queued under an earlier release (no count cap): the worker must still deliver it."""
    request = payload(attachments=[attachment(b"x", f"f{i}.txt") for i in range(MAX_ATTACHMENTS + 10)])
    message = parse_payload(request, OPTIONS, max_attachments=None)
    document = pack_stored(bytearray(json.dumps(request).encode()), message)
    assert len(list(parsed(build_mime(unpack_stored(bytes(document)), "m1")).iter_attachments())) == 60


def test_every_error_is_one_sentence() -> None:
    bad = [payload(to=None), payload(from_email="x"), payload(subject="a\nb"),
           payload(attachments=[{"filename": "a", "content_b64": "!"}])]
    for data in bad:
        with pytest.raises(RelayError) as caught:
            parse_payload(data, OPTIONS)
        text = caught.value.message
        assert text.endswith((".", ")")) and "\n" not in text and "\r" not in text


# -- build_mime ---------------------------------------------------------------------------------
def test_message_ids_are_unique_and_time_ordered() -> None:
    ids = [new_message_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"[0-9a-f]{22}", i) for i in ids)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)


def test_headers_and_bodies_round_trip() -> None:
    data = build(from_name="Trusted Servants Pörtal", to=["ann@example.com", "Bob@Example.net"],
                 subject="Reset your password ✓", text="Hello ünïcode\nSecond line",
                 html="<p>Hello <b>ünïcode</b></p>", reply_to="help@example.org", reply_to_name="Help Desk")
    msg = parsed(data)
    assert msg["From"] == "Trusted Servants Pörtal <noreply@example.org>"
    assert msg["To"] == "ann@example.com, Bob@Example.net"
    assert msg["Reply-To"] == "Help Desk <help@example.org>"
    assert msg["Subject"] == "Reset your password ✓"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime is not None and msg["Date"].datetime.tzinfo is not None
    assert msg.get_content_type() == "multipart/alternative"
    assert content(msg.get_body(("plain",))) == "Hello ünïcode\nSecond line\n"
    assert content(msg.get_body(("html",))) == "<p>Hello <b>ünïcode</b></p>\n"
    assert "Bcc" not in msg and len(msg.get_all("To")) == 1


def test_message_id_is_the_id_at_the_from_domain() -> None:
    msg = parsed(build(message_id="0190abcdef01deadbeef42", from_email="noreply@Portal.Example.org"))
    assert msg["Message-ID"] == "<0190abcdef01deadbeef42@Portal.Example.org>"


def test_date_header_uses_the_creation_time() -> None:
    data = build_mime(parse_payload(payload(), OPTIONS), "abc", created=0.0)
    assert parsed(data)["Date"].datetime.timestamp() == 0.0


def test_text_only_and_html_only_bodies() -> None:
    msg = parsed(build(text="just text", html=None))
    assert msg.get_content_type() == "text/plain" and content(msg) == "just text\n"
    msg = parsed(build(text=None, html="<p>just html</p>"))
    assert msg.get_content_type() == "text/html" and content(msg) == "<p>just html</p>\n"


def test_no_reply_to_header_unless_given() -> None:
    assert "Reply-To" not in parsed(build())


def test_output_is_crlf_only_and_seven_bit() -> None:
    data = build(text="line one\nline two\r\nline three\rline four\n\n", html="<p>a</p>\n<p>b</p>",
                 subject="Ünïcode subject", attachments=[attachment(b"x\ny\n" * 100, "a.txt", "text/plain")])
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert all(byte < 128 for byte in data)


def test_lines_stay_within_998_bytes_even_for_a_5000_character_line() -> None:
    long_text = "word" * 1250  # 5,000 characters and no place to break
    long_html = "<p>" + "ü" * 5000 + "</p>"
    data = build(text=long_text, html=long_html)
    assert max(len(line) for line in lines_of(data)) <= 998
    msg = parsed(data)
    assert content(msg.get_body(("plain",))) == long_text + "\n"
    assert content(msg.get_body(("html",))) == long_html + "\n"


def test_long_subject_stays_within_998_bytes() -> None:
    data = build(subject="s" * 998)  # the longest subject allowed, with no space to fold at
    assert max(len(line) for line in lines_of(data)) <= 998
    assert parsed(data)["Subject"] == "s" * 998


@pytest.mark.parametrize("field", ["from_name", "reply_to_name"])
def test_long_display_names_stay_within_998_bytes(field: str) -> None:
    # A name without spaces cannot be folded at whitespace; the bytes must still be
    # valid SMTP (a server answers "500 Line too long" otherwise), or the name refused.
    name = "n" * 1500
    try:
        data = build(reply_to="help@example.org", **{field: name})
    except BadRequest:
        return
    assert max(len(line) for line in lines_of(data)) <= 998
    header = "From" if field == "from_name" else "Reply-To"
    assert parsed(data)[header].addresses[0].display_name == name


def test_attachments_round_trip_byte_exact() -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
    csv = "name,city\nÅsa,Malmö\n".encode() * 50
    data = build(attachments=[attachment(pdf, "minutes.pdf", "application/pdf"),
                              attachment(csv, "roster.csv", None),
                              attachment(b"", "empty.bin")])
    msg = parsed(data)
    assert msg.get_content_type() == "multipart/mixed"
    assert content(msg.get_body(("plain",))) == "Body\n"
    parts = list(msg.iter_attachments())
    assert [(p.get_filename(), p.get_content_type()) for p in parts] == [
        ("minutes.pdf", "application/pdf"), ("roster.csv", "text/csv"), ("empty.bin", "application/octet-stream")]
    assert [p["Content-Transfer-Encoding"] for p in parts] == ["base64"] * 3
    assert [p.get_payload(decode=True) for p in parts] == [pdf, csv, b""]
    assert max(len(line) for line in lines_of(data)) <= 998


def test_attachments_with_html_alternative_keep_both_bodies() -> None:
    msg = parsed(build(html="<p>rich</p>", attachments=[attachment(b"data", "d.bin")]))
    assert content(msg.get_body(("plain",))) == "Body\n"
    assert content(msg.get_body(("html",))) == "<p>rich</p>\n"
    assert [p.get_payload(decode=True) for p in msg.iter_attachments()] == [b"data"]


@pytest.mark.parametrize("filename", ["Protokoll Sitzung März – Übersicht.pdf", "会议记录.pdf",
                                      "x" * 300 + "ü.pdf", 'quote "and" semi;colon.txt'])
def test_unusual_filenames_round_trip(filename: str) -> None:
    data = build(attachments=[attachment(b"content", filename, "application/pdf")])
    (part,) = parsed(data).iter_attachments()
    assert part.get_filename() == filename
    assert part.get_payload(decode=True) == b"content"
    assert max(len(line) for line in lines_of(data)) <= 998


def test_three_mib_attachment_round_trips_byte_exact() -> None:
    blob = hashlib.shake_256(b"tspro").digest(3 * 1024 * 1024)
    data = build(attachments=[attachment(blob, "big.bin")])
    assert max(len(line) for line in lines_of(data)) <= 998
    (part,) = parsed(data).iter_attachments()
    assert part.get_payload(decode=True) == blob


def test_filename_that_looks_like_a_header_does_not_break_the_attachment() -> None:
    tricky = "report Content-Transfer-Encoding: 7bit.pdf"
    first, second = b"first attachment", bytes(range(256))
    data = build(text="Content-Transfer-Encoding: 7bit\n",
                 attachments=[attachment(first, tricky, "application/pdf"), attachment(second, "second.bin")])
    msg = parsed(data)
    assert content(msg.get_body(("plain",))) == "Content-Transfer-Encoding: 7bit\n"
    parts = list(msg.iter_attachments())
    assert [p.get_filename() for p in parts] == [tricky, "second.bin"]
    assert [p["Content-Transfer-Encoding"] for p in parts] == ["base64", "base64"]
    assert [p.get_payload(decode=True) for p in parts] == [first, second]


def test_no_placeholder_survives_in_the_output() -> None:
    data = build(html="<p>é</p>", attachments=[attachment(b"a", "a.bin"), attachment(b"b", "b.bin")])
    assert b"@@tspro-relay-" not in data


@pytest.mark.parametrize("text", [
    "",
    "no line end",
    "crlf\r\nand bare cr\rand lf\n" * 40_000,  # several blocks, every kind of line end
    "é and a NUL \x00\n" * 30_000,
    ("x" * 998 + "\n") * 300 + "y" * 999,  # the last line is one over the limit: quoted-printable
])
def test_large_bodies_are_encoded_a_block_at_a_time_and_read_back_as_written(text: str) -> None:
    data = build(text=text, html=text or None)
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    assert max(map(len, data.split(b"\r\n"))) <= 998 and data.isascii()
    message = parsed(data)
    written = text.replace("\r\n", "\n").replace("\r", "\n")
    expected = written if written.endswith("\n") else written + "\n"
    parts = [message] if not text else [message.get_body(("plain",)), message.get_body(("html",))]
    for part in parts:
        assert content(part) == expected
    plain = text.isascii() and "\x00" not in text and "y" * 999 not in text
    assert parts[0]["Content-Transfer-Encoding"] == ("7bit" if plain else "quoted-printable")


@pytest.mark.parametrize("filename", ["日本語の議事録" * 40, "y" * 2000, "=?utf-8?q?a=0D=0ABcc:_x@evil.test?=",
                                      'quote " and \\ backslash.txt', "report.pdf"])
def test_any_filename_arrives_whole_on_short_lines(filename: str) -> None:
    """Long names go in RFC 2231 continuations: one 2 KB line would make the server refuse the message."""
    message = parse_payload(payload(attachments=[attachment(b"x", filename=filename)]), OPTIONS)
    raw = bytes(build_mime(message, new_message_id()))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 100
    parsed = email.message_from_bytes(raw, policy=policy.default)
    (part,) = [p for p in parsed.walk() if p.get_content_disposition() == "attachment"]
    assert part.get_filename() == filename


def test_a_filename_in_angle_brackets_is_sent_as_given() -> None:
    """Quoted on the wire as it is; Python's own get_filename() would read back "script" (it strips
    angle brackets around any parameter value), so the header's parsed parameters are read here."""
    message = parse_payload(payload(attachments=[attachment(b"x", filename="<script>")]), OPTIONS)
    raw = bytes(build_mime(message, new_message_id()))
    assert b'filename="<script>"' in raw
    parsed = email.message_from_bytes(raw, policy=policy.default)
    (part,) = [p for p in parsed.walk() if p.get_content_disposition() == "attachment"]
    assert part["Content-Disposition"].params["filename"] == "<script>"


def test_a_blank_filename_gets_the_default_and_a_long_mime_type_is_refused() -> None:
    item = attachment(b"x", filename=" \t ")
    assert parse_payload(payload(attachments=[item]), OPTIONS).attachments[0].filename == "attachment-1"
    item = attachment(b"x", mime_type="text/plain; x=" + "a" * 300)
    with pytest.raises(BadRequest, match="mime_type is longer than 255"):
        parse_payload(payload(attachments=[item]), OPTIONS)


def test_text_a_reader_would_decode_is_encoded_so_it_reads_back_as_sent() -> None:
    """'=?utf-8?q?...?=' typed by someone is text, not an encoded-word for the reader to decode."""
    trick = "=?utf-8?q?a=0D=0ABcc:_x@evil.test?="
    message = parse_payload(payload(subject=trick, from_name=trick, reply_to="r@example.org", reply_to_name=trick,
                                    text="a\rb\x00c"), OPTIONS)
    parsed = email.message_from_bytes(bytes(build_mime(message, new_message_id())), policy=policy.default)
    assert str(parsed["Subject"]) == trick and "Bcc" not in parsed
    assert parsed["From"].addresses[0].display_name == trick
    assert parsed["Reply-To"].addresses[0].display_name == trick
    assert parsed.get_content().splitlines() == ["a", "b\x00c"]  # a bare CR is a line end; NUL kept, encoded
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"


def test_a_long_non_ascii_name_is_split_into_short_encoded_words() -> None:
    name = "日本語の名前" * 42 + "𐀀" * 4  # 256 characters, 4 bytes each at the end
    message = parse_payload(payload(from_name=name, reply_to="r@example.org", reply_to_name=name), OPTIONS)
    raw = bytes(build_mime(message, new_message_id()))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(raw)  # compat32: its address parser keeps RFC 2047's rule that
    for header in ("From", "Reply-To"):     # whitespace between encoded-words is not part of the text
        shown, _address = email.utils.parseaddr(parsed[header])
        assert str(email.header.make_header(email.header.decode_header(shown))) == name


# -- what the real portal sends: blank names and senders, cc and bcc, typed parts, unknown fields ---
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


def notes(content: bytes, mime_type: str) -> dict[str, Any]:
    """An attachment named notes.txt of this type."""
    return attachment(content, filename="notes.txt", mime_type=mime_type)


@pytest.mark.parametrize("mime_type,params", [
    ("text/plain; charset=utf-8", {"charset": "utf-8"}),
    ("Text/Plain;Charset=ISO-8859-1", {"charset": "ISO-8859-1"}),
    ('text/csv; charset="utf-8"; header=present', {"charset": "utf-8", "header": "present"}),
    ('application/octet-stream; name="a b.bin"', {"name": "a b.bin"}),
])
def test_a_media_type_with_parameters_is_accepted_and_kept_on_the_part(mime_type: str,
                                                                       params: dict[str, str]) -> None:
    message = parse_payload(payload(attachments=[notes(b"abc", mime_type)]), Options())
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
        parse_payload(payload(attachments=[notes(b"abc", mime_type)]), Options())


def test_text_without_a_charset_gets_utf8_when_its_bytes_are_utf8() -> None:
    items = [notes("Åsa, Malmö\n".encode(), "text/plain"), notes(b"\xff\xfe latin junk", "text/plain"),
             notes("ünï".encode(), "text/plain; charset=iso-8859-1"),
             notes("ünï".encode(), "application/octet-stream")]
    message = parse_payload(payload(attachments=items), Options())
    assert [dict(a.params).get("charset") for a in message.attachments] == ["utf-8", None, "iso-8859-1", None]
    parts = list(parsed(build_mime(message, "m1")).iter_attachments())
    assert parts[0].get_content_charset() == "utf-8"
    assert parts[0].get_payload(decode=True) == "Åsa, Malmö\n".encode()


def test_utf8_split_across_base64_chunks_is_still_recognised() -> None:
    text = ("é" * 200_000).encode()  # 400 KB: several validation chunks, a character cut at each edge
    message = parse_payload(payload(attachments=[notes(text, "text/plain")]), Options())
    assert dict(message.attachments[0].params) == {"charset": "utf-8"}


@pytest.mark.parametrize("changes", [{"text": ""}, {"text": "", "html": None}, {"text": None},
                                     {"text": "", "subject": "", "attachments": [notes(b"x", "text/plain")]}])
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
