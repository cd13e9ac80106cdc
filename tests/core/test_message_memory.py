"""The worker's memory for a large message: a small multiple of the message, and the same bytes on the wire.

The delivery goes to aiosmtpd in a child process, so tracemalloc here counts
the worker's side only (claim, decrypt, render, DATA, record); the server
writes what it received to a file, which must be the rendered message
exactly (but for the multipart boundaries, which are random per rendering).
Then DATA's pieces, and the budget that bounds a worker's threads together.
"""

from __future__ import annotations

import base64
import json
import os
import re
import smtplib
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Iterator

import pytest

from relay_core.delivery.attempt import Deliverer, Outcome
from relay_core.message import new_message_id, pack_stored, parse_payload
from relay_core.delivery.mime import build_mime
from relay_core.delivery.smtp import _data_pieces
from relay_core.store import NewMessage, Store, insert_message, transaction
from support import SmtpServer, free_port

MIB = 1024 * 1024
# The largest ratio allowed between the attempt's peak of traced allocations and the
# rendered message. Measured: 2.0 with attachments (ciphertext and plaintext while
# decrypting; the request's text and its parsed strings; those strings and the MIME),
# 2.6 for the HTML below, whose text Python holds at two bytes a character. The send
# adds nothing; smtplib's own DATA added three copies.
MAX_RATIO = 3.0

_SINK = """
import sys
from aiosmtpd.controller import Controller

class Keeping:
    async def handle_DATA(self, server, session, envelope):
        with open(sys.argv[2], "wb") as file:
            file.write(envelope.original_content)
        return "250 2.0.0 kept"

controller = Controller(Keeping(), hostname="127.0.0.1", port=int(sys.argv[1]), data_size_limit=0)
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
"""


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """aiosmtpd in a child process: its port, and the file holding the last message it received."""
    port, received = free_port(), tmp_path / "received.eml"
    with subprocess.Popen([sys.executable, "-c", _SINK, str(port), str(received)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline() == b"ready\n"
            yield port, received
        finally:
            proc.stdin.close()  # the child stops its server at end of input
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def queue(store: Store, attachments: list[bytes], html: str | None = None) -> tuple[str, bytes]:
    """Store a message as the web does; its id and the MIME bytes it renders to."""
    payload = {"from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": "Minutes",
               "text": "Hello,\n.a line that begins with a dot\n", "html": html,
               "attachments": [{"filename": f"f{i}.bin", "content_b64": base64.b64encode(data).decode()}
                               for i, data in enumerate(attachments)]}
    options = store.options()
    message = parse_payload(payload, options)
    message_id, created = new_message_id(), time.time()
    sealed = store.keys.encrypt_body(pack_stored(bytearray(json.dumps(payload).encode()), message), message_id)
    conn = store.conn()
    with transaction(conn):
        insert_message(conn, NewMessage.accepted(message, message_id, sealed, created, options, "api", None))
    return message_id, bytes(build_mime(message, message_id, created))


@pytest.mark.parametrize("sizes,html", [
    ([8 * MIB], None),
    ([160 * 1024] * 50, None),
    ([], "<p>Caf\u00e9 \u2014 the minutes.</p>\n" * 160_000),  # 5 MB of quoted-printable HTML
], ids=["one-8MiB", "50x160KiB", "html-5MB"])
def test_a_large_delivery_peaks_at_a_small_multiple_of_the_message(store: Store, sink: tuple[int, Path],
                                                                   sizes: list[int], html: str | None) -> None:
    port, received = sink
    store.set_options({"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_security": "none",
                       "smtp_helo_name": "relay.example.org", "max_attach_mb": 16})
    deliverer = Deliverer(store)
    try:
        warm_id, _ = queue(store, [])  # the connection, the store's statements, lazy imports: not this figure
        assert deliverer.attempt(warm_id).status == "sent"  # type: ignore[union-attr]
        message_id, rendered = queue(store, [os.urandom(size) for size in sizes], html)
        tracemalloc.start()
        try:
            outcome = deliverer.attempt(message_id)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        deliverer.close()
    assert outcome is not None and outcome.status == "sent", outcome
    assert same_but_boundaries(received.read_bytes(), rendered)
    assert peak <= MAX_RATIO * len(rendered), f"peak {peak / MIB:.1f} MiB for a {len(rendered) / MIB:.1f} MiB message"


def same_but_boundaries(wire: bytes, rendered: bytes) -> bool:
    boundaries = re.compile(rb'boundary="([^"]+)"')
    for mine, theirs in zip(boundaries.findall(rendered), boundaries.findall(wire), strict=True):
        wire = wire.replace(theirs, mine)
    return wire == rendered


@pytest.mark.parametrize("body", [
    b"",
    b".",
    b"no line end",
    b".leading dot\r\n..two\r\nmid.dle\r\n.\r\n",
    b"a" * (65536 - 2) + b"\r\n.dot right after a piece's cut\r\n",
    b"a" * 65535 + b"\n" + b"." * 70000 + b"\r\n.x",  # a line longer than a piece: cut inside it
    b"\n.bare LF counts as a line end, as smtplib has it\n",
])
def test_data_pieces_are_dot_stuffed_as_smtplib_would(body: bytes) -> None:
    pieces = list(_data_pieces(bytearray(body)))
    ending = b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"
    assert b"".join(pieces) == smtplib._quote_periods(body) + ending  # type: ignore[attr-defined]
    assert all(len(piece) <= 2 * 65536 for piece in pieces)
    if len(body) < 65536:
        assert len(pieces) == 1  # the ending is never a send of its own (Nagle would hold it)


def test_large_deliveries_wait_for_the_render_budget(store: Store) -> None:
    """Three 1.4 MB stored messages and a small one on four threads. A thread claims only when
    the largest admitted message (3.1 MB here) fits in the 4 MB budget beside what the others
    keep, so the large ones are held one at a time: the budget counts what it held at once."""
    with SmtpServer("none") as server:
        server.behaviour.delay = 0.3  # each DATA takes a while, so the threads overlap
        options = store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "none",
                                     "smtp_helo_name": "relay.example.org", "max_attach_mb": 1.5})
        assert options.max_body_bytes == 3_145_732
        deliverer = Deliverer(store, render_budget=4_000_000)
        ids = [queue(store, [os.urandom(MIB)])[0] for _ in range(3)] + [queue(store, [])[0]]
        outcomes: list[Outcome | None] = []
        threads = [threading.Thread(target=lambda m=m: outcomes.append(deliverer.attempt(m))) for m in ids]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            deliverer.close()
    assert sorted(o.status for o in outcomes if o is not None) == ["sent"] * 4
    budget = deliverer.render_budget
    assert options.max_body_bytes <= budget.peak <= 4_000_000 and budget.used == 0
    assert len(server.received) == 4
