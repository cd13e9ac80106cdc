"""relay_core.delivery.mailflow: would mail flow now? Judged from real attempts at a real server.

Each upstream failure is produced by aiosmtpd for real (a wrong password, an
untrusted certificate, a closed port) through the Deliverer, so the sentence
checked is the one an operator or the portal would read. Both store backends.
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from relay_core.delivery.attempt import Deliverer
from relay_core.store.logbook import AttemptFact
from relay_core.delivery.mailflow import assess, assess_upstream
from relay_core.delivery.probe import check_new_settings
from relay_core.store import Store
from support import SMTP_PASSWORD, SMTP_USER, Certificates, SmtpServer, free_port, store_message

pytestmark = pytest.mark.backends


@pytest.fixture(autouse=True)
def trust_test_ca(monkeypatch: pytest.MonkeyPatch, certs: Certificates) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))


@pytest.fixture
def deliverer(store: Store) -> Iterator[Deliverer]:
    deliverer = Deliverer(store)
    yield deliverer
    deliverer.close()


def beat(store: Store) -> None:
    store.workers.heartbeat("w1", 1, "host", time.time())


def attempt_fresh(store: Store, deliverer: Deliverer, count: int) -> None:
    for _ in range(count):
        outcome = deliverer.attempt(store_message(store, time.time()))
        assert outcome is not None and outcome.status == "deferred", outcome


def test_nothing_configured_no_worker(store: Store) -> None:
    health = assess(store)
    assert (health.ok, health.configured, health.worker_alive, health.paused) == (False, False, False, False)
    assert "not configured" in health.problems[0] and "No delivery worker" in health.problems[1]
    assert health.error == " ".join(health.problems)


def test_configured_with_a_live_worker_is_ok_and_a_stale_one_is_not(store: Store) -> None:
    store.set_options({"smtp_host": "127.0.0.1"})
    beat(store)
    health = assess(store)
    assert health.ok and health.error is None and health.configured and health.worker_alive
    later = assess(store, now=time.time() + 90)
    assert not later.ok and "No delivery worker has reported for 9" in later.error  # type: ignore[operator]


def test_paused_is_not_ok(store: Store) -> None:
    store.set_options({"smtp_host": "127.0.0.1", "delivery_paused": True})
    beat(store)
    health = assess(store)
    assert not health.ok and health.paused and health.configured
    assert "Delivery is paused" in str(health.error)
    # The portal's admin reads this sentence: the relay's own button first, no shell command in backticks.
    assert "Resume delivery button on the relay's Queue page" in str(health.error)
    assert "`" not in str(health.error)


def test_wrong_password_three_times_says_so_with_the_servers_words(
        store: Store, deliverer: Deliverer, certs: Certificates) -> None:
    beat(store)
    with SmtpServer("starttls", certs, auth=True) as server:
        store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "starttls",
                           "smtp_username": SMTP_USER, "smtp_password": "wrong-password"})
        attempt_fresh(store, deliverer, 2)
        assert assess(store).ok  # two failures are not yet a pattern
        attempt_fresh(store, deliverer, 1)
        health = assess(store)
    assert not health.ok and health.upstream.failing
    assert health.upstream.stage == "AUTH" and health.upstream.code == 535
    assert "refuses the username or password (535" in str(health.error)
    assert health.upstream.server_words and health.upstream.server_words.startswith("535")
    assert "wrong-password" not in str(health.error) and len(health.upstream.attempts) == 3


def test_connection_refused_names_host_and_port(store: Store, deliverer: Deliverer) -> None:
    beat(store)
    port = free_port()
    store.set_options({"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_security": "none"})
    attempt_fresh(store, deliverer, 3)
    health = assess(store)
    assert not health.ok and health.upstream.stage == "connect"
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in str(health.error)


def test_an_untrusted_certificate_says_tls_verification_failed(
        store: Store, deliverer: Deliverer, certs: Certificates) -> None:
    beat(store)
    with SmtpServer("starttls", certs, trusted=False) as server:
        store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "starttls"})
        attempt_fresh(store, deliverer, 3)
    health = assess(store)
    assert not health.ok and health.upstream.stage == "STARTTLS"
    assert "TLS certificate verification failed for 127.0.0.1" in str(health.error)


def test_a_success_or_a_settings_change_ends_the_verdict(store: Store, deliverer: Deliverer) -> None:
    beat(store)
    store.set_options({"smtp_host": "127.0.0.1", "smtp_port": free_port(), "smtp_security": "none"})
    attempt_fresh(store, deliverer, 3)
    assert not assess(store).ok
    with SmtpServer("none") as server:
        store.set_options({"smtp_port": server.port})  # the operator fixed the port
        assert assess(store).ok
        outcome = deliverer.attempt(store_message(store, time.time()))
        assert outcome is not None and outcome.status == "sent"
    assert assess(store).ok
    # A refused recipient (5xx at RCPT) is about one message, not the server.
    with SmtpServer("none") as server:
        server.behaviour.rcpt_replies = {"ann@example.com": "550 5.1.1 no such user"}
        store.set_options({"smtp_port": server.port})
        for _ in range(3):
            deliverer.attempt(store_message(store, time.time()))
    assert assess(store).ok


def test_server_words_keep_their_own_closing_bracket() -> None:
    # Postfix's own reply ends in a bracket; the relay's detail wraps it in another.
    words = "535 5.7.8 Error: authentication failed: (reason unavailable)"
    detail = f"AUTH: the mail server mail.example.org refuses the username or password ({words})"
    facts = [AttemptFact(1000.0 - i, f"m{i}", "deferred", "AUTH", 535, detail) for i in range(3)]
    upstream = assess_upstream(facts)
    assert upstream.failing and upstream.server_words == words


def test_new_settings_are_checked_at_once_until_real_attempts_replace_the_check(
        store: Store, deliverer: Deliverer, certs: Certificates) -> None:
    beat(store)
    with SmtpServer("starttls", certs, auth=True) as server:
        store.set_options({"smtp_host": "127.0.0.1", "smtp_port": server.port, "smtp_security": "starttls",
                           "smtp_username": SMTP_USER, "smtp_password": "wrong-password"})
        checked = check_new_settings(store)
        assert checked is not None and checked["state"] == "failed"
        assert check_new_settings(store) is None  # once per change
        health = assess(store)
        assert not health.ok and health.upstream.failing and health.upstream.stage == "AUTH"
        assert "a check of the new SMTP settings failed at AUTH" in str(health.error)
        assert health.upstream.check and health.upstream.check["state"] == "failed"

        # Real attempts replace the check: one good delivery after the change says more than it.
        store.set_options({"smtp_password": SMTP_PASSWORD})
        assert check_new_settings(store)["state"] == "ok"  # type: ignore[index]
        assert assess(store).ok
        store.set_options({"smtp_password": "wrong-again"})
        check_new_settings(store)
        assert not assess(store).ok
        store.set_options({"smtp_password": SMTP_PASSWORD})
        store.set_options({"smtp_password": "wrong-once-more"})  # not yet checked: the attempts decide
        outcome = deliverer.attempt(store_message(store, time.time()))
        assert outcome is not None and outcome.status == "deferred"
        assert assess(store).ok  # one failed attempt is not yet a pattern, and the old check is stale
