"""Queueing a message from inside the relay (the CLI's and the admin UI's test email)."""

from __future__ import annotations

import json
import socket
import time

from ..config import Settings
from ..errors import BadRequest
from ..message import new_message_id, pack_stored, parse_payload
from ..resources import read_template
from ..store import LogEntry, NewMessage, Store, insert_log, insert_message, transaction
from ..tasks import RelayQueue, build_queue


def enqueue_test_message(store: Store, settings: Settings, to: str, relay_queue: RelayQueue | None = None,
                         source_ip: str | None = None) -> str:
    """Queue the test email to ``to``; its id. ``relay_queue``: the caller's open queue, if it has one."""
    options = store.options()
    if not options.smtp_configured:
        raise BadRequest("SMTP delivery is not configured yet: set smtp_host (and the rest) first.")
    if not options.default_from:
        raise BadRequest("Set a Default From address (default_from) so the test has a sender.")
    text = read_template("emails/test.txt").format(
        host=socket.gethostname(), smtp_host=options.smtp_host, smtp_port=options.smtp_port,
        security=options.smtp_security, when=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    payload = {"to": [to], "subject": "TS Pro Relay test email", "text": text}
    message = parse_payload(payload, options)
    message_id = new_message_id()
    created = time.time()
    document = pack_stored(bytearray(json.dumps(payload).encode()), message)
    body = store.keys.encrypt_body(document, message_id)
    record = NewMessage.accepted(message, message_id, body, created, options, "test", None)
    conn = store.conn()
    with transaction(conn):
        insert_message(conn, record)
        insert_log(conn, LogEntry("accepted", "queued", message_id=message_id, sender=message.from_email,
                                  recipients=to, subject=message.subject, detail="test email", ts=created,
                                  source_ip=source_ip, attachments=0))
    (relay_queue or build_queue(settings)).enqueue(message_id)
    return message_id
