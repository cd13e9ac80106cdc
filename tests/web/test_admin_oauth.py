"""The SMTP card's OAuth 2.0 part over HTTP: the method and its fields, Connect Microsoft 365 account (device
code shown and polled), Connect Google account (authorization code with PKCE, the relay's own callback),
Test connection with a token, and the revocation sentence on the page and the dashboard."""

from __future__ import annotations

import html
import re
import ssl
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from relay_core.delivery import oauth
from relay_core.options import parse_option
from admin_helpers import AdminClient, admin_client, admin_settings, field_error
from oauth_server import (CLIENT_ID, CLIENT_SECRET, GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, MAILBOX, TENANT,
                          AuthorizationServer, XOAuth2SmtpServer)
from support import Certificates, wait_until

StandIns = tuple[AuthorizationServer, XOAuth2SmtpServer]


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    yield
    oauth._cache.clear()
    oauth._apps.clear()
    oauth._discovered.clear()


@pytest.fixture
def stand_ins(certs: Certificates) -> Iterator[tuple[AuthorizationServer, XOAuth2SmtpServer]]:
    with AuthorizationServer(certs) as authority, XOAuth2SmtpServer(certs, authority) as smtp:
        yield authority, smtp


@pytest.fixture
def client(tmp_path: Path, stand_ins: StandIns) -> Iterator[AdminClient]:
    authority, _ = stand_ins
    with admin_client(admin_settings(tmp_path)) as client:
        # The sign-in addresses are not on the card (the public ones are the defaults): set as the CLI would.
        client.state.store.set_options({"oauth_authority": authority.base,
                                        "oauth_google_authority": f"{authority.base}/google"})
        yield client


def card(smtp: XOAuth2SmtpServer, certs: Certificates, **extra: str) -> dict[str, str]:
    return {"smtp_host": "127.0.0.1", "smtp_port": str(smtp.port), "smtp_security": "starttls",
            "smtp_auth": "microsoft", "smtp_username": "", "oauth_tenant": TENANT, "oauth_client_id": CLIENT_ID,
            "smtp_ca_file": str(certs.ca_file), "default_from": MAILBOX, "default_from_name": "Portal",
            "allowed_from": "", "max_attach_mb": "25", **extra}


def test_microsoft_device_code_from_the_card(client: AdminClient, stand_ins: StandIns, certs: Certificates) -> None:
    authority, smtp = stand_ins
    saved = client.post("/settings/smtp", card(smtp, certs))
    assert saved.status_code == 303, saved.text
    assert client.state.store.options().smtp_auth == "microsoft"

    started = client.post("/settings/oauth/microsoft", {})
    assert (started.status_code, started.headers["location"]) == (303, "/settings?connect=microsoft#smtp")
    page = client.get("/settings?connect=microsoft").text
    code = re.search(r'id="device-code">(\w+)<', page)
    assert code and f'href="{authority.base}/devicelogin"' in page
    assert 'data-poll="/settings/oauth/microsoft/status"' in page

    status = client.get("/settings/oauth/microsoft/status").json()
    assert status == {"ok": True, "final": False, "connected": False, "detail": "Waiting for you to sign in…"}
    authority.approve(code.group(1))
    done = wait_until(lambda: (s := client.get("/settings/oauth/microsoft/status").json())["final"] and s,
                      timeout=15, interval=0.3, what="the sign-in to be seen")
    assert done["connected"] and done["detail"] == (f"Connected: the relay now sends as {MAILBOX} through "
                                                    "Microsoft 365.")
    page = client.get("/settings").text
    assert f"Connected to Microsoft 365 as {MAILBOX}." in html.unescape(page)
    entry = client.state.store.log.audit_entries(limit=1)[0]
    assert entry.action == "settings.oauth_connect" and MAILBOX in entry.detail

    tested = client.post("/settings/smtp/test", card(smtp, certs, smtp_username=MAILBOX))
    text = html.unescape(tested.text)
    assert (f"Connected to 127.0.0.1:{smtp.port} and started TLS (STARTTLS) and signed in as {MAILBOX} with an "
            "access token from Microsoft 365 (XOAUTH2).") in text
    assert smtp.received == [] and smtp.handler.exchanges[-1]["ok"]


def test_google_authorization_code_with_pkce(client: AdminClient, stand_ins: StandIns, certs: Certificates) -> None:
    authority, smtp = stand_ins
    form = card(smtp, certs, smtp_auth="google", oauth_tenant="", oauth_client_id=GOOGLE_CLIENT_ID,
                oauth_client_secret=GOOGLE_CLIENT_SECRET)
    assert client.post("/settings/smtp", form).status_code == 303
    away = client.get("/settings/oauth/google")
    assert away.status_code == 302
    target = away.headers["location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
    assert target.startswith(f"{authority.base}/google/authorize?")
    assert query["redirect_uri"] == "http://testserver/settings/oauth/google/callback"
    assert query["code_challenge_method"] == "S256" and "https://mail.google.com/" in query["scope"].split()
    # The person allows access at the stand-in's page (a browser would post its form).
    with httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca_file))) as browser:
        allowed = browser.post(target, data={**query, "login": MAILBOX})
    back = allowed.headers["location"]
    assert back.startswith(query["redirect_uri"] + "?code=")
    forged = client.get("/settings/oauth/google/callback?code=x&state=not-the-state")
    assert "That Google sign-in was not started here or has expired" in forged.text
    finished = client.get(back.removeprefix("http://testserver"))
    assert (finished.status_code, finished.headers["location"]) == (303, "/settings?saved=oauth#smtp")
    options = client.state.store.options()
    assert (options.smtp_auth, options.smtp_username) == ("google", MAILBOX)
    assert "Connected to Google as volunteer@contoso.example." in html.unescape(client.get("/settings").text)
    assert authority.valid(MAILBOX, oauth.access_token(options, client.state.store))
    assert client.get(back.removeprefix("http://testserver")).status_code == 200  # a code works once


def google_redirect_uri(client: AdminClient, stand_ins: StandIns, certs: Certificates, **headers: str) -> str:
    """The redirect URI Connect Google account sends Google to (the address Google comes back to)."""
    form = card(stand_ins[1], certs, smtp_auth="google", oauth_tenant="", oauth_client_id=GOOGLE_CLIENT_ID,
                oauth_client_secret=GOOGLE_CLIENT_SECRET)
    assert client.post("/settings/smtp", form).status_code == 303
    away = client.get("/settings/oauth/google", headers=headers)
    assert away.status_code == 302, away.text
    return parse_qs(urlsplit(away.headers["location"]).query)["redirect_uri"][0]


@pytest.mark.parametrize("how", ["public url", "trusted proxy"])
def test_the_google_redirect_uri_is_the_relays_public_address(tmp_path: Path, stand_ins: StandIns,
                                                               certs: Certificates, how: str) -> None:
    """Google sends the admin back to the address the relay names, which must be the one registered
    with Google: not the address this request happened to reach (a loopback name, http behind TLS)."""
    authority, _ = stand_ins
    if how == "public url":  # the admin came in through an SSH tunnel to 127.0.0.1:8000
        settings = admin_settings(tmp_path, RELAY_PUBLIC_URL="http://relay.example.org:8026")
        base, headers, expected = "http://127.0.0.1:8000", {}, "http://relay.example.org:8026"
    else:  # TLS ended at a trusted proxy, which says so
        settings = admin_settings(tmp_path, RELAY_TRUSTED_PROXIES="198.51.100.20")
        base, headers, expected = "http://testserver", {"X-Forwarded-Proto": "https"}, "https://testserver"
    with admin_client(settings, base_url=base) as client:
        client.state.store.set_options({"oauth_google_authority": f"{authority.base}/google"})
        uri = google_redirect_uri(client, stand_ins, certs, **headers)
    assert uri == f"{expected}/settings/oauth/google/callback"


def test_revoked_connection_is_said_on_the_card_and_the_dashboard(client: AdminClient, stand_ins: StandIns,
                                                                   certs: Certificates) -> None:
    authority, smtp = stand_ins
    store = client.state.store
    assert client.post("/settings/smtp", card(smtp, certs)).status_code == 303
    flow = oauth.start_device_flow(store.options())
    authority.approve(flow["user_code"])
    connected = oauth.poll_device_flow(store.options(), flow)
    assert connected is not None
    oauth.save_connection(store, "microsoft", connected)
    authority.revoke()
    with pytest.raises(oauth.OAuthError):
        oauth.access_token(store.options(), store)
    sentence = "The Microsoft 365 connection was revoked (AADSTS50173): reconnect it in Settings."
    assert sentence in html.unescape(client.get("/settings").text)
    assert sentence in html.unescape(client.get("/").text)


def test_bad_oauth_fields_are_refused_next_to_the_field(client: AdminClient, stand_ins: StandIns,
                                                         certs: Certificates) -> None:
    _, smtp = stand_ins
    page = client.post("/settings/smtp", card(smtp, certs, smtp_auth="kerberos", smtp_ca_file="ca.pem")).text
    assert field_error(page, "smtp_auth") == ("Sign-in method must be one of password, microsoft, google, not "
                                              "'kerberos'.")
    assert field_error(page, "smtp_ca_file").startswith("Extra CA file must be an absolute path")
    assert client.state.store.options().smtp_auth == "password"  # nothing saved
    assert parse_option("smtp_auth", " MICROSOFT ") == "microsoft"


def test_the_application_way_needs_no_connection(client: AdminClient, stand_ins: StandIns,
                                                 certs: Certificates) -> None:
    _, smtp = stand_ins
    form = card(smtp, certs, smtp_username="portal@contoso.example", oauth_client_secret=CLIENT_SECRET)
    assert client.post("/settings/smtp", form).status_code == 303
    page = html.unescape(client.get("/settings").text)
    assert ("The relay signs in to Microsoft 365 as the application (its client secret or certificate) and sends "
            "as portal@contoso.example; there is no account to connect.") in page
    assert CLIENT_SECRET not in page and "A client secret is stored (encrypted)." in page
    tested = html.unescape(client.post("/settings/smtp/test", form).text)
    assert "signed in as portal@contoso.example with an access token from Microsoft 365 (XOAUTH2)" in tested
