"""`tspro-relay rotate-secret` on a running relay, then the old secret dropped (SQLite, then PostgreSQL).

1. With the old secret: SMTP settings with an AUTH password, Turnstile's
   secret, a second API key, and four messages accepted while no worker runs.
2. Web and worker started with the new secret and the old one as
   RELAY_SECRET_KEY_OLD; the SMTP server takes 2 s per message, so the first
   message is being delivered when `rotate-secret` runs. It reports what it
   rotated, the message in flight arrives once and intact, and delivery is
   paused to keep the rest waiting.
3. Everything restarted with the new secret alone: the waiting messages are
   delivered (with AUTH: the password still works), both keys send and
   reveal as before, and the Turnstile secret reads back; a process given
   only the old secret refuses to start; and no value in any table or
   column of the database is a token, body or lookup hash of the old secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.fernet import InvalidToken

from relay_core import crypto
from relay_core.config import load_settings
from relay_core.message import new_message_id, pack_stored, parse_payload
from relay_core.options import parse_option
from relay_core.store import NewMessage, Store, insert_message, transaction
from support import SMTP_PASSWORD, Relay, SmtpServer, cli, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.backends]
OLD = "the-old-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
NEW = "the-new-secret-9876543210-zyxwvutsrqponmlkjihgfedcba"
TURNSTILE = "0x4AAAAAAA-turnstile-secret-for-rotation"


@pytest.fixture
def relay(tmp_path: Path, backend_env: dict[str, str]) -> Iterator[Relay]:
    relay = Relay(tmp_path, RELAY_SECRET_KEY=OLD, RELAY_WORKER_THREADS="1", **backend_env)
    try:
        yield relay
    finally:
        relay.close()


def message(i: int) -> dict[str, Any]:
    return {"from_email": "noreply@example.org", "to": [f"m{i}@example.com"], "subject": f"rotation {i}",
            "text": f"body of message {i}: the welcome mail's password",
            "attachments": [{"filename": f"f{i}.txt", "mime_type": "text/plain",
                             "content_b64": base64.b64encode(f"attachment {i}".encode()).decode()}]}


def values(relay: Relay) -> Iterator[tuple[str, str, Any, Any]]:
    """(table, column, row id, value) for every value of every table."""
    if relay.env.get("RELAY_DATABASE_URL"):
        tables = [r[0] for r in relay.query("SELECT table_name FROM information_schema.tables"
                                            " WHERE table_schema = current_schema()")]
    else:
        tables = [r[0] for r in relay.query("SELECT name FROM sqlite_master WHERE type = 'table'"
                                            " AND name NOT LIKE 'sqlite_%'")]
    for table in tables:
        if relay.env.get("RELAY_DATABASE_URL"):
            columns = [r[0] for r in relay.query("SELECT column_name FROM information_schema.columns"
                                                 " WHERE table_schema = current_schema() AND table_name = ?", (table,))]
        else:
            conn = sqlite3.connect(str(relay.data_dir / "relay.db"))
            columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            conn.close()
        for row in relay.query(f'SELECT * FROM "{table}"'):
            record = dict(zip(columns, row))
            for column, value in record.items():
                yield table, column, record.get("id"), value


def readable_with(secret: str, relay: Relay, api_keys: list[str]) -> list[str]:
    """Every stored value the given secret decrypts (Fernet or AES-GCM) or hashed (an API key lookup)."""
    keys = crypto.derive_keys(load_settings({"RELAY_SECRET_KEY": secret}))
    fernet, body_key, lookup_key = keys.fernets[0], keys.body_keys[0], keys.lookup_keys[0]
    lookups = {hmac.new(lookup_key, k.encode(), hashlib.sha256).hexdigest() for k in api_keys}
    found = []
    for table, column, row_id, value in values(relay):
        if isinstance(value, memoryview):
            value = bytes(value)
        if isinstance(value, str):
            if value in lookups:
                found.append(f"{table}.{column}: a lookup hash")
            try:
                fernet.decrypt(value.encode())
                found.append(f"{table}.{column}: a Fernet token")
            except (InvalidToken, ValueError):
                pass
        elif isinstance(value, bytes) and len(value) > 28 and isinstance(row_id, str):
            try:
                body_key.decrypt(value[:12], value[12:], row_id.encode())
                found.append(f"{table}.{column}: a body of {row_id}")
            except InvalidTag:
                pass
    return found


def accept(store: Store, payload: dict[str, Any]) -> str:
    """Store a message as the web process does (its request encrypted to its id), enqueueing nothing:
    the sweeper wakes a worker for it."""
    options = store.options()
    parsed = parse_payload(payload, options)
    message_id = new_message_id()
    sealed = store.keys.encrypt_body(pack_stored(bytearray(json.dumps(payload).encode()), parsed), message_id)
    conn = store.conn()
    with transaction(conn):
        # As sent with the portal's key: the API answers a message's own key only.
        portal = next(k.id for k in store.api_keys.all() if k.is_primary and k.revoked_at is None)
        insert_message(conn, NewMessage.accepted(parsed, message_id, sealed, time.time(), options, "api", portal))
    return message_id


def test_rotate_while_running_then_drop_the_old_secret(relay: Relay) -> None:
    portal = relay.key
    with SmtpServer("none", auth=True) as server:
        # 1. The old secret: settings, a second key and four waiting messages, written as the relay would.
        store = Store.open(load_settings({k: v for k, v in relay.env.items() if k.startswith("RELAY_")}))
        try:
            pairs = [p.split("=", 1) for p in server.settings(auth=True)] + [
                ["turnstile_site_key", "0x4AAAAAAA-site"], ["turnstile_secret", TURNSTILE],
                ["retry_base_seconds", "1"], ["retry_max_seconds", "2"]]
            store.set_options({name: parse_option(name, value) for name, value in pairs})
            _, second = store.api_keys.add("second")
            ids = [accept(store, message(i)) for i in range(4)]
        finally:
            store.shutdown()
        before = readable_with(OLD, relay, [portal, second])
        assert len(before) == 2 + 2 * 2 + 1 + 4  # 2 settings, 2 keys (copy + hash), the key check, 4 bodies

        # 2. The new secret, the old one beside it; rotate while the first message is being delivered.
        relay.env.update(RELAY_SECRET_KEY=NEW, RELAY_SECRET_KEY_OLD=OLD)
        server.behaviour.delay = 2.0
        relay.start_web()
        relay.start_worker()
        cli(relay.env, "resume", cwd=relay.cwd)  # wakes every waiting message (none was enqueued)
        wait_until(lambda: server.handler.attempt_times, what="a delivery in flight")
        report = cli(relay.env, "rotate-secret", cwd=relay.cwd).stdout
        cli(relay.env, "pause", cwd=relay.cwd)
        assert report.startswith("Rotated 9 item(s) from RELAY_SECRET_KEY_OLD to RELAY_SECRET_KEY in one "
                                 "transaction: 2 secret setting(s), 2 API key(s) (their Reveal copies and lookup "
                                 "hashes), 1 key check, 4 message bodies; 0 item(s) were already under the new "
                                 "secret."), report
        # Accepted during the switch, with either key: stored under the new secret.
        during = relay.http.post("/api/send", json=message(4), headers={"Authorization": f"Bearer {second}"})
        assert during.status_code == 202
        ids.append(during.json()["id"])
        keys = {during.json()["id"]: second}  # the other ids were sent with the portal's key
        in_flight = relay.wait_status(ids[0], "sent", timeout=30)
        assert in_flight["attempt_count"] == 1
        relay.close()

        # 3. The new secret alone.
        del relay.env["RELAY_SECRET_KEY_OLD"]
        server.behaviour.delay = 0.0
        refused = cli({**relay.env, "RELAY_SECRET_KEY": OLD}, "config", "show", cwd=relay.cwd, check=False)
        assert refused.returncode == 2 and "RELAY_SECRET_KEY is not the key" in refused.stderr
        relay.http = type(relay.http)(timeout=30)
        relay.start_web()
        relay.start_worker()
        cli(relay.env, "resume", cwd=relay.cwd)
        for key in (portal, second):
            answer = relay.http.post("/api/send", json=message(len(ids)), headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
            keys[ids[-1]] = key
        for message_id in ids:
            relay.wait_status(message_id, "sent", timeout=60, key=keys.get(message_id))
        received = [r.message for r in server.received]
        assert sorted(str(m["Subject"]) for m in received) == sorted(f"rotation {i}" for i in range(len(ids)))
        assert all(r.auth == "relayuser" for r in server.received)  # the SMTP password still works
        for mail in received:
            i = int(str(mail["Subject"]).split()[1])
            assert mail.get_body(preferencelist=("plain",)).get_content().startswith(f"body of message {i}")
            assert [p.get_content() for p in mail.iter_attachments()] == [f"attachment {i}"]
        assert cli(relay.env, "api-key", "show", cwd=relay.cwd).stdout.strip() == portal
        settings = load_settings({k: v for k, v in relay.env.items() if k.startswith("RELAY_")})
        store = Store.open(settings)
        try:
            assert store.options().turnstile_secret == TURNSTILE and store.options().smtp_password == SMTP_PASSWORD
            assert store.unreadable_secrets == frozenset()
            second_id = next(k.id for k in store.api_keys.all() if k.label == "second")
            assert store.api_keys.reveal(second_id) == second
        finally:
            store.shutdown()
        relay.close()

        assert readable_with(OLD, relay, [portal, second]) == []  # not one token of the old secret is left
        after = readable_with(NEW, relay, [portal, second])
        assert len(after) >= len(before)  # the same items (and the new messages' bodies), under the new one
