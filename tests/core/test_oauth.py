"""XOAUTH2 and the token module against the stand-in authorization server and an XOAUTH2-only aiosmtpd.

Everything crosses real sockets: the token requests go over TLS to the
stand-in (trusted through smtp_ca_file, not SSL_CERT_FILE), and the SMTP
exchange is read back from the server's side.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Iterator

import pytest

from relay_core import crypto
from relay_core.delivery import mailflow, oauth
from relay_core.config import Secret, Settings
from relay_core.db import open_database
from relay_core.maintenance.rotation import rotate
from relay_core.delivery.attempt import Deliverer
from relay_core.errors import BadRequest
from relay_core.options import parse_option
from relay_core.delivery.smtp import DeliveryError, Mailer, Target, connect, xoauth2_response
from relay_core.store import Store
from oauth_server import (APP_MAILBOX, CLIENT_ID, CLIENT_SECRET, MAILBOX, SERVICE_ACCOUNT, TENANT,
                          AuthorizationServer, XOAuth2SmtpServer)
from support import Certificates, store_message, wait_until

# The compare-and-set of a rotated refresh token and the revocation mark are SQL: both backends.
pytestmark = pytest.mark.backends

BODY = b"From: portal@contoso.example\r\nTo: a@example.com\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the stand-ins' CA is trusted through smtp_ca_file only
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    yield
    oauth._cache.clear()
    oauth._apps.clear()
    oauth._discovered.clear()


@pytest.fixture
def authority(certs: Certificates) -> Iterator[AuthorizationServer]:
    with AuthorizationServer(certs) as server:
        yield server


@pytest.fixture
def smtp(certs: Certificates, authority: AuthorizationServer) -> Iterator[XOAuth2SmtpServer]:
    with XOAuth2SmtpServer(certs, authority) as server:
        yield server


def configure(store: Store, smtp: XOAuth2SmtpServer, authority: AuthorizationServer, certs: Certificates,
              **extra: str) -> None:
    pairs = {"smtp_host": "127.0.0.1", "smtp_port": str(smtp.port), "smtp_security": "starttls",
             "smtp_ca_file": str(certs.ca_file), "smtp_auth": "microsoft", "oauth_authority": authority.base,
             "oauth_tenant": TENANT, "oauth_client_id": CLIENT_ID, "smtp_username": MAILBOX, **extra}
    store.set_options({name: parse_option(name, value) for name, value in pairs.items()})


def connect_device(store: Store, authority: AuthorizationServer) -> oauth.Connected:
    """What `smtp connect microsoft` does, with the person's sign-in done by the stand-in."""
    options = store.options()
    flow = oauth.start_device_flow(options)
    assert oauth.poll_device_flow(options, flow) is None  # nobody signed in yet
    authority.approve(flow["user_code"])
    connected = oauth.poll_device_flow(options, flow)
    assert connected is not None
    oauth.save_connection(store, "microsoft", connected)
    return connected


def test_initial_response_is_the_documented_format() -> None:
    # Google's documented example (XOAUTH2 protocol page), byte for byte, before and after base64.
    raw = xoauth2_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    assert raw.encode() == (b"user=someuser@example.com\x01auth=Bearer "
                            b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01")
    assert base64.b64encode(raw.encode()) == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0"
        b"Q2cBAQ==")


def test_xoauth2_exchange_on_the_wire(store: Store, smtp: XOAuth2SmtpServer, authority: AuthorizationServer,
                                      certs: Certificates) -> None:
    configure(store, smtp, authority, certs, oauth_client_secret=CLIENT_SECRET, smtp_username=APP_MAILBOX)
    token = oauth.access_token(store.options(), store)
    assert authority.grants == ["client_credentials"]
    mailer = Mailer()
    try:
        result = mailer.deliver(Target.from_options(store.options(), token), APP_MAILBOX, ["a@example.com"], BODY)
    finally:
        mailer.close()
    assert result.recipients[0].accepted
    exchange = smtp.handler.exchanges[-1]
    expected = base64.b64encode(f"user={APP_MAILBOX}\x01auth=Bearer {token}\x01\x01".encode()).decode()
    assert exchange["initial"] == expected and exchange["ok"]
    assert smtp.received[0].auth == APP_MAILBOX


def test_refused_token_answers_the_challenge_with_an_empty_line(store: Store, smtp: XOAuth2SmtpServer,
                                                                 authority: AuthorizationServer,
                                                                 certs: Certificates) -> None:
    configure(store, smtp, authority, certs)
    with pytest.raises(DeliveryError) as caught:
        connect(Target.from_options(store.options(), "at-not-a-token-issued-here"))
    error = caught.value
    assert (error.stage, error.code, error.permanent) == ("AUTH", 535, False)
    assert smtp.handler.exchanges[-1]["challenge_reply"] == b""  # the empty line that ends the challenge
    assert "refuses the access token for volunteer@contoso.example" in error.message
    assert "status 401" in error.message and "at-not-a-token" not in error.message


def test_a_password_server_is_told_apart(store: Store, certs: Certificates, authority: AuthorizationServer) -> None:
    from support import SmtpServer
    with SmtpServer("starttls", certs, auth=True) as server:
        configure(store, server, authority, certs)  # type: ignore[arg-type]
        with pytest.raises(DeliveryError) as caught:
            connect(Target.from_options(store.options(), "at-whatever"))
    assert "does not offer XOAUTH2 (it offers LOGIN PLAIN)" in caught.value.message


def test_smtp_ca_file_is_trusted_besides_the_system_store(store: Store, smtp: XOAuth2SmtpServer,
                                                          authority: AuthorizationServer, certs: Certificates) -> None:
    configure(store, smtp, authority, certs, smtp_ca_file="")
    with pytest.raises(DeliveryError) as caught:
        connect(Target.from_options(store.options(), "at-x"))
    assert "name its CA in smtp_ca_file" in caught.value.message
    configure(store, smtp, authority, certs, smtp_ca_file="/nonexistent/ca.pem")
    with pytest.raises(DeliveryError) as caught:
        connect(Target.from_options(store.options(), "at-x"))
    assert caught.value.message == ("connect: the smtp_ca_file /nonexistent/ca.pem cannot be read as PEM "
                                    "certificates: No such file or directory")


def test_device_code_connects_and_tokens_are_cached_then_refreshed(store: Store, smtp: XOAuth2SmtpServer,
                                                                    authority: AuthorizationServer,
                                                                    certs: Certificates) -> None:
    configure(store, smtp, authority, certs, smtp_username="")
    connected = connect_device(store, authority)
    assert connected.mailbox == MAILBOX and store.options().smtp_username == MAILBOX
    assert store.options().oauth_refresh_token == connected.refresh_token
    stored = store.conn().execute("SELECT value FROM settings WHERE name = 'oauth_refresh_token'").fetchone()[0]
    assert connected.refresh_token not in stored  # encrypted at rest

    first = oauth.access_token(store.options(), store)
    assert oauth.access_token(store.options(), store) == first  # from memory: no second request
    assert authority.grants.count("refresh_token") == 1
    # The refresh rotated the refresh token: the store keeps the one issued last.
    assert store.options().oauth_refresh_token == authority.newest_refresh_token() != connected.refresh_token

    authority.access_lifetime = 2
    short = oauth.access_token(store.options(), store, fresh=True)
    assert authority.valid(MAILBOX, short)
    wait_until(lambda: not authority.valid(MAILBOX, short), timeout=10, what="the short token to expire")
    renewed = oauth.access_token(store.options(), store)
    assert renewed != short and authority.valid(MAILBOX, renewed)


def test_a_late_rotation_never_replaces_a_newer_token_or_a_new_connection(store: Store, smtp: XOAuth2SmtpServer,
                                                                          authority: AuthorizationServer,
                                                                          certs: Certificates) -> None:
    configure(store, smtp, authority, certs)
    connect_device(store, authority)
    _, grant = oauth._stored_grant(store, "microsoft")
    now = time.time()
    assert oauth._save_rotated(store, grant, "rt-newer-one", now + 10)
    assert not oauth._save_rotated(store, grant, "rt-older-one", now + 5)  # answered earlier, arrived later
    assert store.options().oauth_refresh_token == "rt-newer-one"
    connect_device(store, authority)  # connected again meanwhile
    assert not oauth._save_rotated(store, grant, "rt-from-the-old-grant", now + 3600)
    assert store.options().oauth_refresh_token == authority.newest_refresh_token()
    # Switched to Google since: Microsoft's refresh token is not offered to Google's endpoint.
    store.set_options({"smtp_auth": "google"})
    assert oauth._stored_grant(store, "google")[0] == ""


def test_revocation_defers_with_one_sentence_and_reconnecting_delivers(store: Store, smtp: XOAuth2SmtpServer,
                                                                        authority: AuthorizationServer,
                                                                        certs: Certificates,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    configure(store, smtp, authority, certs)
    connect_device(store, authority)
    deliverer = Deliverer(store)
    try:
        assert deliverer.attempt(store_message(store, time.time())).status == "sent"  # type: ignore[union-attr]
        authority.revoke()
        oauth._cache.clear()
        waiting = store_message(store, time.time())
        outcome = deliverer.attempt(waiting)
        assert outcome is not None and outcome.status == "deferred"
        sentence = ("The Microsoft 365 connection was revoked (AADSTS50173): reconnect it in Settings")
        assert outcome.detail == f"AUTH: {sentence}"
        health = mailflow.assess(store)
        assert not health.ok and sentence + "." in str(health.error)
        assert [r.getMessage() for r in caplog.records if r.name == "relay.oauth"] == [sentence + "."]

        authority.restore()
        connect_device(store, authority)
        assert sentence not in str(mailflow.assess(store).error)
        _make_due(store, waiting)  # its retry is due later: now, as if that time had come
        assert deliverer.attempt(waiting).status == "sent"  # type: ignore[union-attr]
    finally:
        deliverer.close()
    assert len(smtp.received) == 2


def _make_due(store: Store, message_id: str) -> None:
    from relay_core.db import transaction
    conn = store.conn()
    with transaction(conn):
        conn.execute("UPDATE messages SET next_attempt_at = 0 WHERE id = ?", (message_id,))


def test_client_credentials_with_a_certificate(store: Store, smtp: XOAuth2SmtpServer,
                                               authority: AuthorizationServer, certs: Certificates) -> None:
    configure(store, smtp, authority, certs, oauth_client_certificate=authority.client_certificate(),
              smtp_username=APP_MAILBOX)
    token = oauth.access_token(store.options(), store)
    assert authority.grants == ["client_credentials"] and authority.valid(APP_MAILBOX, token)
    authority.certificates.clear()  # the certificate removed from the app registration
    with pytest.raises(oauth.OAuthError, match="AADSTS700027"):
        oauth.access_token(store.options(), store, fresh=True)


def test_client_credentials_refused_secret_is_named(store: Store, smtp: XOAuth2SmtpServer,
                                                    authority: AuthorizationServer, certs: Certificates) -> None:
    configure(store, smtp, authority, certs, oauth_client_secret="wrong-secret-value")
    with pytest.raises(oauth.OAuthError) as caught:
        oauth.access_token(store.options(), store)
    assert caught.value.message == ("Microsoft 365 refused the token request (AADSTS7000215: Invalid client secret "
                                    "provided.)")
    assert not caught.value.revoked and oauth.revoked_sentence(store) is None


def test_msal_and_google_auth_are_not_loaded_for_password_relays() -> None:
    import subprocess
    import sys
    code = ("import json, sys, relay_core.delivery.attempt, relay_core.delivery.mailflow, relay_cli.main; "
            "heavy = ('msal', 'requests', 'jwt', 'google'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_rotate_secret_covers_the_client_secret_and_refresh_token(store: Store, settings: Settings) -> None:
    store.set_options({"oauth_client_secret": "client-secret-to-rotate", "oauth_refresh_token": "rt-to-rotate"})
    rotating_settings = dataclasses.replace(
        settings, secret_key=Secret("another-secret-key-9876543210-zyxwvutsrqponm"), secret_key_old=settings.secret_key)
    rotating = Store(open_database(rotating_settings), crypto.derive_keys(rotating_settings))
    try:
        assert rotate(rotating).settings == 2
        new_only = crypto.derive_keys(dataclasses.replace(rotating_settings, secret_key_old=None))
        rows = dict(rotating.conn().execute("SELECT name, value FROM settings WHERE name LIKE 'oauth_%'").fetchall())
        assert new_only.decrypt_text(rows["oauth_client_secret"]) == "client-secret-to-rotate"
        assert new_only.decrypt_text(rows["oauth_refresh_token"]) == "rt-to-rotate"
    finally:
        rotating.shutdown()


def test_google_service_account_with_domain_wide_delegation(store: Store, smtp: XOAuth2SmtpServer,
                                                            authority: AuthorizationServer,
                                                            certs: Certificates) -> None:
    key = authority.service_account_key()
    configure(store, smtp, authority, certs, smtp_auth="google", oauth_google_authority=f"{authority.base}/google",
              oauth_service_account=key, oauth_client_id="")
    assert "PRIVATE KEY" not in store.conn().execute(
        "SELECT value FROM settings WHERE name = 'oauth_service_account'").fetchone()[0]
    with pytest.raises(oauth.OAuthError) as caught:
        oauth.access_token(store.options(), store)
    assert caught.value.message.startswith(f"Google refused the service account for {MAILBOX} (unauthorized_client: "
                                           "Client is unauthorized to retrieve access tokens")
    assert caught.value.message.endswith("check its domain-wide delegation for the scope https://mail.google.com/")
    authority.delegated.add(SERVICE_ACCOUNT)
    token = oauth.access_token(store.options(), store)
    connect(Target.from_options(store.options(), token)).quit()
    assert smtp.handler.exchanges[-1]["ok"] and smtp.handler.exchanges[-1]["user"] == MAILBOX
    with pytest.raises(BadRequest, match="must be a service account's JSON key"):
        parse_option("oauth_service_account", '{"type": "authorized_user"}')
