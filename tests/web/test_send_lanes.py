"""Which writer stores a send in `tspro-relay web`: the writer process takes the sends that only insert
rows; the web process's own writer thread takes the rest. The real app, its child and its store run
through Starlette's TestClient; nothing is mocked."""

from __future__ import annotations

import base64
import dataclasses

from relay_core.config import Settings
from support import wait_until
from test_api import payload, queued, running_client


def test_only_small_sends_without_a_key_or_a_limit_go_to_the_writer_process(settings: Settings) -> None:
    """The child gets sends that only insert rows; one with an Idempotency-Key, or a body large enough
    that copying it to another process would cost its size twice, is stored by the web's own writer."""
    with running_client(dataclasses.replace(settings, writer_process=True)) as client:
        state = client.app.state.relay
        wait_until(lambda: state.writer.alive, timeout=20, what="the writer process to start")
        original, handed = state.writer.submit, []

        def submit(*args):  # type: ignore[no-untyped-def]
            handed.append(args[1].id)
            return original(*args)

        state.writer.submit = submit
        small = client.post("/api/send", json=payload())
        keyed = client.post("/api/send", json=payload(), headers={"Idempotency-Key": "k-1"})
        attachment = [{"filename": "a.bin", "mime_type": "application/octet-stream",
                       "content_b64": base64.b64encode(b"x" * 300_000).decode()}]
        large = client.post("/api/send", json=payload(attachments=attachment))
        assert [r.status_code for r in (small, keyed, large)] == [202, 202, 202]
        assert handed == [small.json()["id"]]
        assert queued(client) == (3, 3)
