"""The MIME skeleton written directly (mime._written) against the email package's rendering.

The worker writes the usual message's headers and delimiters itself (the email
package's generator and header folding were a fifth of its CPU per message)
and leaves every header it would fold or encode to the email package. Here
both render the same messages, with the same boundaries, and must give the
same bytes; every message is also read back with the standard library.
"""

from __future__ import annotations

import base64
import email
import itertools
from email import policy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from relay_core.delivery import mime as rendering
from relay_core.message import parse_payload
from relay_core.delivery.mime import build_mime
from relay_core.options import Options

OPTIONS = Options()


class Renderings:
    """Both renderings of a message, with the same boundaries; whether the default one went direct."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.generated = 0
        original = rendering._generated

        def generated(*args: Any) -> Any:
            self.generated += 1
            return original(*args)

        monkeypatch.setattr(rendering, "_generated", generated)

    def restart(self) -> None:
        counter = itertools.count()
        self.monkeypatch.setattr(rendering, "_boundary", lambda: f"=_{next(counter):032x}")

    def both(self, payload: dict[str, Any]) -> tuple[bytes, bytes, bool]:
        """The default rendering, the email package's, and whether the default went direct."""
        message = parse_payload(payload, OPTIONS)
        self.restart()
        before = self.generated
        written = bytes(build_mime(message, "0190abcdef0123456789", 1700000000.5))
        direct = self.generated == before
        self.restart()
        generated = bytes(build_mime(message, "0190abcdef0123456789", 1700000000.5, generator=True))
        return written, generated, direct


@pytest.fixture
def renderings(monkeypatch: pytest.MonkeyPatch) -> Renderings:
    return Renderings(monkeypatch)


PORTAL = {"from_email": "noreply@example.org", "from_name": "Trusted Servants Portal", "to": ["member@example.com"],
          "subject": "Reset your password", "text": "Hello,\n\nfollow the link.\n", "reply_to": "help@example.org",
          "reply_to_name": "Help"}


def file(data: bytes, name: str = "report.pdf", mime_type: str | None = None) -> dict[str, Any]:
    item = {"filename": name, "content_b64": base64.b64encode(data).decode()}
    if mime_type is not None:
        item["mime_type"] = mime_type
    return item


@pytest.mark.parametrize("changes", [
    {},
    {"html": "<p>Hello</p>"},
    {"text": "", "html": "<p>Hello</p>"},
    {"text": "", "subject": "Only a subject"},
    {"text": "Hello " * 400},  # one long line: quoted-printable
    {"text": "Grüße"},
    {"attachments": [file(b"%PDF-1.4 ...")]},
    {"html": "<p>x</p>", "attachments": [file(b"a,b\n", "list.csv", "text/csv"), file(b"")]},
    {"cc": ["a@example.com", "b@example.com"], "bcc": ["c@example.com"]},
    {"from_name": 'Portal "Team", Inc.'},
])
def test_the_usual_messages_are_written_directly_as_the_email_package_would(
        renderings: Renderings, changes: dict[str, Any]) -> None:
    written, generated, direct = renderings.both({**PORTAL, **changes})
    assert direct
    assert written == generated


@pytest.mark.parametrize("changes", [
    {"subject": "Grüße aus Köln"},
    {"subject": "A subject long enough that the header line is folded at a space before the end " * 2},
    {"from_name": "Zoë"},
    {"reply_to_name": "=?utf-8?q?looks_encoded?="},
    {"to": [f"member{i}@example.com" for i in range(8)]},
    {"attachments": [file(b"x", "ein Bericht über das Jahr.pdf")]},
    {"attachments": [file(b"x", "a" * 70 + ".pdf")]},
    {"attachments": [file(b"x", "notes.txt", 'text/plain; format="flowed \\"x\\""')]},
])
def test_headers_the_email_package_folds_or_encodes_are_left_to_it(
        renderings: Renderings, changes: dict[str, Any]) -> None:
    written, generated, direct = renderings.both({**PORTAL, **changes})
    assert not direct
    assert written == generated


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=120)
_ascii = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=90)
_header = st.one_of(_ascii, _text).filter(lambda s: "\r" not in s and "\n" not in s and s.isprintable())
_body = st.one_of(_ascii, _text, st.sampled_from(["", "line\n" * 50, "x" * 1200, ".dot\r\n.\r\n", "tab\there\r"]))
_names = st.one_of(st.sampled_from(["report.pdf", "a b.txt", 'q"uote.bin', "x" * 61, "données.csv"]), _ascii)
_types = st.sampled_from([None, "application/pdf", "text/plain", "text/csv; charset=latin-1",
                          "text/plain; format=flowed; delsp=yes", 'application/x-thing; name="a;b"'])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(from_name=_header, subject=_header, text=_body, html=st.one_of(st.none(), _body),
       to=st.lists(st.sampled_from(["a@example.com", "b.c@example.net", "longer.address.here@example.org"]),
                   min_size=1, max_size=4, unique=True),
       reply=st.one_of(st.none(), st.tuples(st.sampled_from(["help@example.org"]), _header)),
       files=st.lists(st.tuples(_names, _types, st.binary(max_size=200)), max_size=3))
def test_any_message_renders_the_same_either_way_and_reads_back(
        renderings: Renderings, from_name: str, subject: str, text: str, html: str | None, to: list[str],
        reply: tuple[str, str] | None, files: list[tuple[str, str | None, bytes]]) -> None:
    payload: dict[str, Any] = {"from_email": "noreply@example.org", "from_name": from_name, "to": to,
                               "subject": subject, "text": text, "html": html,
                               "attachments": [file(data, name, kind) for name, kind, data in files]}
    if reply:
        payload.update(reply_to=reply[0], reply_to_name=reply[1])
    if not (text or html or subject or files):
        payload["text"] = "x"
    written, generated, _ = renderings.both(payload)
    assert written == generated
    read = email.message_from_bytes(written, policy=policy.default)
    assert " ".join(str(read["Subject"]).split()) == " ".join(subject.split())  # (folding may move spaces)
    assert [a.get_payload(decode=True) for a in read.iter_attachments()] == [data for _, _, data in files]
