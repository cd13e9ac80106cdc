"""Hostile input, read back as raw bytes at a real SMTP server.

Hypothesis builds messages whose subject, names, addresses, bodies and
attachment names and types carry CR, LF, NUL, encoded line breaks
(=0D=0A, %0d%0a, RFC 2047 words holding them), Unicode line separators,
long unbreakable words, non-ASCII text and SMTP smuggling sequences
(\\n.\\n, \\r.\\r\\n, \\n.\\r\\n, a bare CR or LF before a dot, a whole
"end of data + MAIL FROM" sequence). Each goes through the real app
(POST /api/send: key check, validation, encryption, group commit) and is
then delivered by the real ``Deliverer`` to aiosmtpd on 127.0.0.1.

Either the call is refused with 400 and nothing reaches the server, or it
is accepted and exactly one SMTP transaction arrives whose envelope holds
exactly the recipients asked for, and whose raw bytes (parsed here, by
hand) hold exactly the headers asked for with exactly the values asked
for — no extra header (no injected Bcc), no bare CR or LF, no line over
998 bytes — and the body and attachments as sent.
"""

from __future__ import annotations

import base64
import email
import mimetypes
import re
import threading
from email import policy
from email.header import decode_header, make_header
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.testclient import TestClient

from relay_core.config import load_settings
from relay_core.delivery.attempt import Deliverer
from relay_core.options import parse_option
from relay_web.app import create_app
from support import SECRET, free_port

pytestmark = pytest.mark.slow
EXAMPLES = int(__import__("os").environ.get("FUZZ_EXAMPLES", "150"))
TALLY = {"accepted": 0, "refused": 0}

HOSTILE = ["\r", "\n", "\r\n", "\x00", "\x0b", "\x85", "\u2028", "\u2029", "=0D=0A", "%0d%0a", "%0D%0A",
           "\\r\\n", "=?utf-8?q?a=0D=0ABcc:_x@evil.test?=", "\n.\n", "\r.\r\n", "\n.\r\n", "\r\n.\r\n", "\r.", "\n.",
           "\r\n.\r\nMAIL FROM:<x@evil.test>\r\nRCPT TO:<y@evil.test>\r\nDATA\r\nsmuggled\r\n.\r\n",
           "\nBcc: evil@evil.test", "\r\nBcc: evil@evil.test", "Bcc: evil@evil.test", ".", "..", "\t", " ",
           "é", "日本語", "😀", "\u202e", "x" * 1200, "a " * 700, "<script>"]
SAFE_ADDRESSES = ["ann@example.com", "Bob.Smith@example.org", "c+tag@mail.example.net", "d_e@example.com",
                  "o'neil@example.co.uk", "x@sub.domain.example"]

# Header values a portal could legitimately send (the relay must keep them intact), and the
# hostile ones (it must refuse them or keep them harmless). One in four header fields is hostile.
BENIGN = ["日本語" * 40, "y" * 300, "=0D=0A", "%0d%0a", "%0D%0A", "\\r\\n", "=?utf-8?q?a=0D=0ABcc:_x@evil.test?=", "Bcc: evil@evil.test",
          ".", "..", "\t", " ", "é", "日本語", "😀", "\u202e", "x" * 120, "a " * 90, "<script>", '"quoted"', "a,b;c"]
header_chars = st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"))
clean_header = st.lists(st.one_of(st.sampled_from(BENIGN), st.text(header_chars, max_size=20)),
                        max_size=5).map("".join)
hostile_header = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=10)), min_size=1,
                          max_size=4).map("".join)


def mostly(clean: st.SearchStrategy[str], hostile: st.SearchStrategy[str], one_in: int) -> st.SearchStrategy[str]:
    """``clean``, and ``hostile`` once in ``one_in`` draws."""
    # Not integers(): Hypothesis favours their bounds, which would make "hostile" the common case.
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda bad: hostile if bad else clean)


header_text = mostly(clean_header, hostile_header, 4)
body_text = st.lists(st.one_of(st.sampled_from(HOSTILE + BENIGN + ["line\r\n", "\n", "...", "a" * 2000]),
                               st.text(max_size=30)), max_size=12).map("".join)
address = mostly(st.sampled_from(SAFE_ADDRESSES),
                 st.tuples(st.sampled_from(SAFE_ADDRESSES), st.sampled_from(HOSTILE)).map("".join), 12)
mime_types = st.one_of(st.sampled_from(["application/pdf", "text/plain", "text/plain; charset=utf-8",
                                        "image/png", 'text/csv; name="a.csv"', "application/octet-stream"]),
                       header_text)
attachment = st.fixed_dictionaries({
    "filename": header_text, "mime_type": mime_types,
    "content_b64": st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())})
message = st.fixed_dictionaries({
    "from_email": address, "to": st.lists(address, min_size=1, max_size=3), "subject": header_text,
}, optional={
    "from_name": header_text, "cc": st.lists(address, max_size=2), "bcc": st.lists(address, max_size=2),
    "text": body_text, "html": body_text, "reply_to": address,
    "reply_to_name": header_text, "attachments": st.lists(attachment, max_size=2),
})


class RawSink:
    """aiosmtpd that keeps every transaction's envelope and raw DATA bytes."""

    def __init__(self) -> None:
        self.transactions: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        with self.lock:
            self.transactions.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Deliverer, RawSink]]:
    sink = RawSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    directory: Path = tmp_path_factory.mktemp("fuzz")
    relay_settings = load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(directory / "data")})
    try:
        with TestClient(create_app(relay_settings)) as client:
            store = client.app.state.relay.store  # type: ignore[attr-defined]
            store.set_options({k: parse_option(k, v) for k, v in {
                "smtp_host": "127.0.0.1", "smtp_port": str(port), "smtp_security": "none",
                "smtp_helo_name": "relay.example.org", "connection_idle_seconds": "0"}.items()})
            client.headers["Authorization"] = f"Bearer {store.api_keys.reveal()}"
            deliverer = Deliverer(store)
            yield client, deliverer, sink
            deliverer.close()
    finally:
        controller.stop()


# -- reading the raw bytes by hand -------------------------------------------------------------
def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Top-level headers (unfolded, in order) and the body, from CRLF-terminated bytes."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, "no blank line ends the headers"
    headers: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        assert line, "an empty header line"
        if line[:1] in (b" ", b"\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + line.decode("ascii"))
        else:
            name, colon, value = line.partition(b":")
            assert colon and re.fullmatch(rb"[!-9;-~]+", name), f"not a header line: {line!r}"
            headers.append((name.decode("ascii"), value.decode("ascii").strip()))
    return headers, body


def check_wire_format(raw: bytes) -> None:
    assert b"\r" not in raw.replace(b"\r\n", b""), "a bare CR on the wire"
    assert b"\n" not in raw.replace(b"\r\n", b""), "a bare LF on the wire"
    assert b"\x00" not in raw, "a NUL on the wire"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n")), "a line over 998 bytes"
    assert raw.isascii(), "8-bit bytes without a transfer encoding"


def text_of(value: str) -> str:
    return str(make_header(decode_header(value)))


def expected_headers(sent: dict[str, Any], cc: list[str]) -> set[str]:
    names = {"From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"}
    if cc:  # after duplicates of earlier recipients are dropped
        names.add("Cc")
    if sent.get("reply_to"):
        names.add("Reply-To")
    if not sent.get("attachments") and not (sent.get("text") and sent.get("html")):
        names.add("Content-Transfer-Encoding")  # a single text part carries its own
    return names


def unique(addresses: list[str], seen: set[str]) -> list[str]:
    kept = []
    for item in addresses:
        if item.lower() not in seen:
            seen.add(item.lower())
            kept.append(item)
    return kept


def lines_of(text: str) -> list[str]:
    """The lines a body must arrive as: a bare CR ends a line too, and the last line gets its end."""
    text = re.sub(r"\r\n|\r", "\n", text)
    return (text if text.endswith("\n") else text + "\n").splitlines()


def check_delivered(sent: dict[str, Any], mail_from: str, rcpt_tos: list[str], raw: bytes) -> None:
    check_wire_format(raw)
    seen: set[str] = set()
    to, cc, bcc = (unique([a.strip() for a in sent.get(k) or []], seen) for k in ("to", "cc", "bcc"))
    assert mail_from == sent["from_email"].strip()
    assert rcpt_tos == to + cc + bcc  # exactly the recipients asked for, Bcc in the envelope only

    headers, _ = split_message(raw)
    names = [name for name, _ in headers]
    assert len(names) == len(set(n.lower() for n in names)), f"a repeated header: {names}"
    assert set(names) == expected_headers(sent, cc), names
    values = dict(headers)
    # Parse first, then decode the name: decoded text is not header syntax any more.
    name, addr = parseaddr(values["From"])
    name = text_of(name)
    given_name = sent.get("from_name") or ""
    # Whitespace at the ends of a display name is folding whitespace on the wire: not kept.
    assert addr == sent["from_email"].strip() and name.strip() == (given_name if given_name.strip() else "").strip()
    assert [a for _, a in getaddresses([values["To"]])] == to
    if cc:
        assert [a for _, a in getaddresses([values["Cc"]])] == cc
    # Whitespace around an unstructured value is not part of it (RFC 5322 folding).
    assert text_of(values["Subject"]).strip() == (sent.get("subject") or "").strip()
    if sent.get("reply_to"):
        reply_name, reply_addr = parseaddr(values["Reply-To"])
        assert reply_addr == sent["reply_to"].strip() and text_of(reply_name).strip() == (sent.get("reply_to_name") or "").strip()
    for bad in (b"evil.test", b"smuggled"):
        if not any(bad.decode() in str(v) for v in sent.values()):
            assert bad not in raw

    parsed = email.message_from_bytes(raw, policy=policy.default)
    bodies = {part.get_content_type(): part.get_content() for part in parsed.walk()
              if part.get_content_maintype() == "text" and part.get_content_disposition() != "attachment"}
    for field_name, kind in (("text", "text/plain"), ("html", "text/html")):
        if sent.get(field_name):
            assert bodies[kind].splitlines() == lines_of(sent[field_name]), field_name
    files = [part for part in parsed.walk() if part.get_content_disposition() == "attachment"]
    assert len(files) == len(sent.get("attachments") or [])
    for index, (part, given_file) in enumerate(zip(files, sent.get("attachments") or [])):
        # Read with the header parser: get_filename() also strips angle brackets from a name
        # that has them at both ends ("<script>" reads back as "script"), the wire says "<script>".
        filename = part["Content-Disposition"].params["filename"]
        assert filename == (given_file["filename"].strip() or f"attachment-{index + 1}")
        media_type = given_file["mime_type"].split(";")[0].strip().lower()
        guessed = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        assert part.get_content_type() == (media_type or guessed)
        assert part.get_payload(decode=True) == base64.b64decode(given_file["content_b64"])


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(sent=message)
def test_hostile_messages_are_refused_or_arrive_exactly_as_asked(rig: Any, sent: dict[str, Any]) -> None:
    client, deliverer, sink = rig
    before = len(sink.transactions)
    response = client.post("/api/send", json=sent)
    if response.status_code == 400:
        assert response.json()["ok"] is False
        assert len(sink.transactions) == before
        TALLY["refused"] += 1
        return
    TALLY["accepted"] += 1
    assert response.status_code == 202, response.text
    message_id = response.json()["id"]
    outcome = deliverer.attempt(message_id)
    assert outcome is not None and outcome.status == "sent", (outcome, sent)
    assert len(sink.transactions) == before + 1, "not exactly one SMTP transaction"
    check_delivered(sent, *sink.transactions[-1])


def test_the_fuzzing_exercised_both_outcomes() -> None:
    """Runs after the fuzz test (file order): enough of both to mean something."""

    assert TALLY["accepted"] >= EXAMPLES // 10 and TALLY["refused"] >= EXAMPLES // 10, TALLY
