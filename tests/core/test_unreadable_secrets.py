"""A stored secret this RELAY_SECRET_KEY cannot decrypt fails closed, and the log names what to re-enter.

(A store made with another secret entirely is refused at start-up: Store.verify_secret. These are the
single items that can still be unreadable: a value written by a process with another secret, or copied
from another relay.)
"""

from __future__ import annotations

import logging
import time

import pytest

from relay_core import crypto
from relay_core.config import Settings, load_settings
from relay_core.delivery.attempt import Deliverer
from relay_core.delivery.mailflow import assess
from relay_core.options import parse_option
from relay_core.intake.sending import enqueue_test_message
from relay_core.store import Store, transaction

OTHER = "another-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def plant(store: Store, name: str, value: str) -> None:
    """Store ``value`` encrypted with another secret, as a process given the wrong one would have."""
    token = crypto.derive_keys(load_settings({"RELAY_SECRET_KEY": OTHER})).encrypt_text(value)
    conn = store.conn()
    with transaction(conn):
        store._bump_rev(conn)
        conn.execute("UPDATE settings SET value = ? WHERE name = ?", (token, name))


def test_an_unreadable_smtp_password_stops_delivery_and_says_what_to_re_enter(
        store: Store, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    store.set_options({k: parse_option(k, v) for k, v in {
        "smtp_host": "127.0.0.1", "smtp_port": "9", "smtp_security": "none", "smtp_username": "relayuser",
        "smtp_password": "the-real-one", "default_from": "noreply@example.org"}.items()})
    message_id = enqueue_test_message(store, settings, "ann@example.com")
    plant(store, "smtp_password", "the-real-one")
    with caplog.at_level(logging.ERROR, logger="relay.store"):
        options = store.options()
    assert options.smtp_password == "" and store.unreadable_secrets == {"smtp_password"}
    assert ("the stored smtp_password cannot be decrypted with RELAY_SECRET_KEY" in caplog.text
            and "tspro-relay config set smtp_password=..." in caplog.text and "the-real-one" not in caplog.text)
    # Delivery waits, without trying the server with no password; nothing is lost.
    outcome = Deliverer(store).attempt(message_id)
    assert outcome is not None and outcome.status == "deferred"
    assert outcome.detail.startswith("AUTH: the stored SMTP password cannot be decrypted")
    store.workers.heartbeat("w1", 1, "host", time.time())
    health = assess(store)
    assert not health.ok and "The stored SMTP password cannot be decrypted" in (health.error or "")
    # Re-entered: read again, and usable.
    store.set_options({"smtp_password": parse_option("smtp_password", "typed-again")})
    assert store.options().smtp_password == "typed-again" and store.unreadable_secrets == frozenset()


def test_an_unreadable_key_copy_names_the_key(store: Store) -> None:
    key_id, _ = store.api_keys.add("partner")
    token = crypto.derive_keys(load_settings({"RELAY_SECRET_KEY": OTHER})).encrypt_text("tsr_x")
    conn = store.conn()
    with transaction(conn):
        conn.execute("UPDATE api_keys SET secret = ? WHERE id = ?", (token, key_id))
    with pytest.raises(crypto.DecryptionError, match="API key “partner” cannot be decrypted"):
        store.api_keys.reveal(key_id)
