"""The Settings page over HTTP: every card's bad input (message next to the field, input kept, nothing
saved), every card's save with its audit entry, the API key card, Test connection against a real
aiosmtpd server, and the test email through the queue."""

from __future__ import annotations

import html
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from relay_core.options import Options, parse_option
from admin_helpers import AdminClient, admin_client, admin_settings, field_error, field_value
from support import SMTP_PASSWORD, SMTP_USER, Certificates, SmtpServer

SMTP = {"smtp_host": "mail.example.org", "smtp_port": "587", "smtp_security": "starttls",
        "smtp_username": "relay@example.org", "default_from": "noreply@example.org",
        "default_from_name": "Portal", "allowed_from": "example.org", "max_attach_mb": "25"}
DELIVERY = {"retry_base_seconds": "60", "retry_max_seconds": "3600", "max_age_hours": "24",
            "max_per_minute": "0", "max_per_hour": "0", "max_per_day": "0"}
SIGNIN = {"turnstile_site_key": "", "session_idle_minutes": "30"}
ACCOUNT_PASSWORD = "correct-horse-42"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminClient]:
    with admin_client(admin_settings(tmp_path_factory.mktemp("settings"))) as client:
        yield client


def snapshot(client: AdminClient) -> tuple[Options, int, list[Any]]:
    store = client.state.store
    return store.options(), len(store.log.audit_entries(limit=1000)), store.api_keys.all()


# -- bad input: the message next to the field, the input kept, nothing saved -------------------
BAD_INPUT = [
    ("/settings/smtp", SMTP, "smtp_port", "abc", "Port must be a whole number, not 'abc'."),
    ("/settings/smtp", SMTP, "smtp_port", "70000", "Port must be between 1 and 65535"),
    ("/settings/smtp", SMTP, "smtp_security", "starttls-please", "Security must be one of"),
    ("/settings/smtp", SMTP, "allowed_from", "example.org, not a domain", "Allowed From holds 'not a domain'"),
    ("/settings/smtp", SMTP, "smtp_host", "bad host!", "SMTP host must be a host name"),
    ("/settings/smtp", SMTP, "default_from", "noreply-at-example.org", "Default From email must be an email"),
    ("/settings/smtp", SMTP, "max_attach_mb", "lots", "Max attachment size (MB) must be a number"),
    ("/settings/smtp", SMTP, "default_from_name", "Portal\r\nBcc: x@evil.example", "must not contain line breaks"),
    ("/settings/smtp/test", SMTP, "smtp_port", "twenty-five", "Port must be a whole number"),
    ("/settings/delivery", DELIVERY, "retry_base_seconds", "soon", "First retry after (seconds) must be a whole"),
    ("/settings/delivery", DELIVERY, "retry_max_seconds", "30", "must not be shorter than the first retry"),
    ("/settings/delivery", DELIVERY, "max_per_hour", "-5", "Deliveries per hour must be between 0"),
    ("/settings/delivery", DELIVERY, "max_age_hours", "forever", "Give up after (hours) must be a number"),
    ("/settings/delivery", DELIVERY, "send_per_hour", "lots", "Sends per hour per API key must be a whole number"),
    ("/settings/delivery", DELIVERY, "bad_key_per_minute", "-1", "between 0 and 1,000,000,000, not -1"),
    ("/settings/signin", SIGNIN, "session_idle_minutes", "0", "must be between 1 and"),
    ("/settings/signin", SIGNIN, "turnstile_site_key", "has spaces in it", "without spaces"),
    ("/settings/api-keys", {"label": ""}, "label", "   ", "Give the new key a name"),
    ("/settings/api-keys", {"label": ""}, "label", "x" * 80, "at most 60 characters"),
    ("/settings/api-keys", {"label": "partner"}, "new_per_hour", "-1", "Sends per hour must be between 0"),
    ("/settings/api-keys", {"label": "partner"}, "new_allowed_from", "not a domain", "Allowed From holds 'not a"),
    ("/settings/test-email", {"test_to": ""}, "test_to", "not an address", "Enter one email address"),
]


@pytest.mark.parametrize("path,form,name,value,message", BAD_INPUT,
                         ids=[f"{p.rsplit('/', 1)[1]}-{n}-{v[:12]}" for p, _, n, v, _ in BAD_INPUT])
def test_bad_input_is_shown_next_to_its_field_and_nothing_is_saved(
        client: AdminClient, path: str, form: dict[str, str], name: str, value: str, message: str) -> None:
    before = snapshot(client)
    typed = {**form, name: value}
    if path == "/settings/smtp":
        typed["smtp_password"] = "typed-but-refused-1"
    response = client.post(path, typed)
    assert response.status_code == 200, response.text[:500]
    assert message in field_error(response.text, name)
    if name not in ("smtp_security",) and "\r" not in value:
        assert field_value(response.text, name) == value  # what the admin typed is still there
    for other, other_value in form.items():  # ...and so is the rest of the card
        if other != name and other != "smtp_security" and other_value:
            assert field_value(response.text, other) == other_value
    assert snapshot(client) == before
    assert "typed-but-refused-1" not in response.text


def test_the_security_choice_typed_is_kept_when_another_field_is_wrong(client: AdminClient) -> None:
    response = client.post("/settings/smtp", {**SMTP, "smtp_security": "ssl", "smtp_port": "x"})
    assert response.status_code == 200
    assert '<option value="ssl" selected>SSL/TLS</option>' in response.text


ACCOUNT_BAD = [
    # Said once: the field's hint already asks for 8 characters, so the error says what is wrong.
    ({"new_password": "short", "confirm_password": "short"}, "new_password", "Too short: 5 characters"),
    ({"new_password": "long-enough-1", "confirm_password": "long-enough-2"}, "confirm_password", "do not match"),
    ({"current_password": "not-the-password"}, "current_password", "not your current password"),
    ({"current_password": ""}, "current_password", "Enter your current password"),
    ({"username": ""}, "username", "Enter a username"),
    ({"username": "two words"}, "username", "without spaces"),
    ({"new_password": "admin", "confirm_password": "admin"}, "new_password", "Too short"),
    ({"new_password": "change-me-on-first-login", "confirm_password": "change-me-on-first-login"},
     "new_password", "choose another"),
    ({"new_password": "12345678", "confirm_password": "12345678"}, "new_password", "widely known"),
    ({"new_password": "Password1", "confirm_password": "Password1"}, "new_password", "widely known"),
    ({"new_password": "qwertyuiop", "confirm_password": "qwertyuiop"}, "new_password", "widely known"),
]


def test_admin_account_bad_input(client: AdminClient) -> None:
    with sqlite3.connect(str(client.state.settings.db_path)) as conn:
        hash_before = conn.execute("SELECT username, password_hash FROM admins").fetchone()
    for change, name, message in ACCOUNT_BAD:
        fields = {"username": "admin", "current_password": ACCOUNT_PASSWORD, "new_password": "",
                  "confirm_password": "", **change}
        before = snapshot(client)
        response = client.post("/settings/account", fields)
        assert response.status_code == 200, change
        assert message in field_error(response.text, name), change
        assert field_value(response.text, "username") == fields["username"]
        assert snapshot(client) == before
        with sqlite3.connect(str(client.state.settings.db_path)) as conn:
            conn.execute("DELETE FROM login_failures")  # a wrong current password counts toward lockout
            assert conn.execute("SELECT username, password_hash FROM admins").fetchone() == hash_before


# -- saving ---------------------------------------------------------------------------------------
def test_saving_the_smtp_card_stores_encrypts_and_audits(client: AdminClient) -> None:
    secret = "smtp-Card-Secret-77"
    response = client.post("/settings/smtp", {**SMTP, "smtp_port": "2525", "smtp_security": "none",
                                              "smtp_password": secret})
    assert response.status_code == 303 and response.headers["location"] == "/settings?saved=smtp#smtp"
    options = client.state.store.options()
    assert (options.smtp_host, options.smtp_port, options.smtp_security) == ("mail.example.org", 2525, "none")
    assert options.smtp_password == secret and options.allowed_from == "example.org"
    with sqlite3.connect(str(client.state.settings.db_path)) as conn:
        stored = conn.execute("SELECT value FROM settings WHERE name = 'smtp_password'").fetchone()[0]
    assert secret not in stored
    entry = client.state.store.log.audit_entries()[0]
    assert entry.action == "settings.smtp" and entry.actor == "admin" and entry.ip == "198.51.100.20"
    assert "Port: 587 → 2525" in entry.detail and "SMTP password changed" in entry.detail
    page = client.get("/settings?saved=smtp").text
    assert "SMTP settings saved." in page and secret not in page and "A password is stored" in page
    # Recent changes on the page: when, who, from which IP, what (the secret only as "changed").
    audit = page.split('id="audit"', 1)[1]
    row = html.unescape(re.sub(r"<[^>]+>", " ", audit.split("<tr>", 2)[2].split("</tr>", 1)[0]))
    assert "just now" in row and "admin" in row and "198.51.100.20" in row, row
    assert "Port: 587 → 2525" in row and "SMTP password changed" in row, row
    assert re.search(r'<span title="\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC">just now</span>', audit), audit[:400]
    assert secret not in " ".join(e.detail for e in client.state.store.log.audit_entries(limit=1000))

    # An empty password field keeps the stored one; the checkbox clears it.
    client.post("/settings/smtp", {**SMTP, "smtp_port": "2525", "smtp_security": "none"})
    assert client.state.store.options().smtp_password == secret
    client.post("/settings/smtp", {**SMTP, "smtp_port": "2525", "smtp_security": "none",
                                   "clear_smtp_password": "yes"})
    assert client.state.store.options().smtp_password == ""
    assert "SMTP password cleared" in client.state.store.log.audit_entries()[0].detail


def test_saving_retries_and_pacing(client: AdminClient) -> None:
    response = client.post("/settings/delivery", {**DELIVERY, "retry_base_seconds": "30", "max_per_hour": "500"})
    assert response.status_code == 303
    options = client.state.store.options()
    assert options.retry_base_seconds == 30 and options.max_per_hour == 500
    assert "Deliveries per hour: 0 → 500" in client.state.store.log.audit_entries()[0].detail


def test_saving_turnstile_keeps_its_secret_secret(client: AdminClient) -> None:
    response = client.post("/settings/signin", {**SIGNIN, "turnstile_site_key": "0x4AAA-site"})
    assert response.status_code == 200
    assert "Enter the secret key too" in field_error(response.text, "turnstile_secret")
    assert not client.state.store.options().turnstile_enabled
    response = client.post("/settings/signin", {"turnstile_site_key": "0x4AAA-site", "turnstile_secret": "0x4AAA-sec",
                                                "session_idle_minutes": "20"})
    assert response.status_code == 303
    options = client.state.store.options()
    assert options.turnstile_enabled and options.turnstile_secret == "0x4AAA-sec" and options.session_idle_minutes == 20
    page = client.get("/settings").text
    assert "0x4AAA-sec" not in page and "A secret is stored" in page
    assert "0x4AAA-sec" not in client.state.store.log.audit_entries()[0].detail
    client.post("/settings/signin", {"turnstile_site_key": "", "clear_turnstile_secret": "yes",
                                     "session_idle_minutes": "30"})
    assert not client.state.store.options().turnstile_enabled


# -- API keys --------------------------------------------------------------------------------------
def api_send(client: AdminClient, key: str) -> httpx.Response:
    return client.client.post("/api/send", json={"from_email": "noreply@example.org", "to": ["a@example.com"],
                                                 "subject": "s", "text": "t"},
                              headers={"Authorization": f"Bearer {key}"})


def revealed_keys(page: str) -> list[str]:
    return re.findall(r'value="(tsr_[A-Za-z0-9_-]{20,})"', page)


def test_reveal_add_use_and_revoke_keys(client: AdminClient, tmp_path: Path) -> None:
    store = client.state.store
    store.set_options({"smtp_host": parse_option("smtp_host", "127.0.0.1")})
    page = client.get("/settings").text
    assert revealed_keys(page) == []  # nothing shown until Reveal
    primary = next(k for k in store.api_keys.all() if k.is_primary and k.revoked_at is None)
    response = client.post(f"/settings/api-keys/{primary.id}/reveal")
    assert response.status_code == 303
    page = client.get(response.headers["location"])
    assert revealed_keys(page.text) == [store.api_keys.reveal()]
    assert 'data-copy="key-' in page.text and page.headers["cache-control"] == "no-store"
    assert store.log.audit_entries()[0].action == "api_key.reveal"

    response = client.post("/settings/api-keys", {"label": "portal-2025"})
    assert response.status_code == 303
    page = client.get(response.headers["location"]).text
    assert "Key added." in page
    [second] = revealed_keys(page)
    assert api_send(client, second).status_code == 202
    second_id = next(k.id for k in store.api_keys.all() if k.label == "portal-2025")
    assert client.state.intake.submit(lambda conn: (None, [])).result(10) is None  # the use is recorded by now
    assert second_id in store.api_keys.usage()
    assert [k.label for k in store.api_keys.all()].count("portal-2025") == 1  # reloading the page added nothing

    # Revoking asks first; without the confirmation nothing happens.
    response = client.post(f"/settings/api-keys/{primary.id}/revoke")
    assert response.status_code == 200 and "Please confirm" in response.text
    assert 'name="confirmed" value="yes"' in response.text
    assert next(k for k in store.api_keys.all() if k.id == primary.id).revoked_at is None
    response = client.post(f"/settings/api-keys/{primary.id}/revoke", {"confirmed": "yes"})
    assert response.status_code == 303
    old = store.api_keys.reveal(primary.id)
    assert api_send(client, old).status_code == 401
    assert api_send(client, second).status_code == 202
    assert store.log.audit_entries()[0].action == "api_key.revoke"
    assert client.post(f"/settings/api-keys/{primary.id}/reveal").status_code == 404
    assert client.post("/settings/api-keys/99999/reveal").status_code == 404

    # A new portal key, confirmed: shown once, working at once.
    assert "Please confirm" in client.post("/settings/api-keys/new").text
    response = client.post("/settings/api-keys/new", {"confirmed": "yes"})
    assert response.status_code == 303
    page = client.get(response.headers["location"]).text
    assert "A new portal key was generated" in page
    [new] = revealed_keys(page)
    assert new == store.api_keys.reveal() and api_send(client, new).status_code == 202


SHOW_COOKIE = "relay_show"


def test_a_shown_key_never_travels_in_a_url_and_shows_once(client: AdminClient, tmp_path: Path) -> None:
    """Reveal, Add and Generate: the address holds no token (it would stay in the history and in proxies'
    access logs); the page after the redirect shows the key once, to this session only."""
    store = client.state.store
    primary = next(k for k in store.api_keys.all() if k.is_primary and k.revoked_at is None)
    posts = [(f"/settings/api-keys/{primary.id}/reveal", {}, "revealed"),
             ("/settings/api-keys", {"label": f"shown-once-{primary.id}"}, "added"),
             ("/settings/api-keys/new", {"confirmed": "yes"}, "generated")]
    for path, form, saved in posts:
        response = client.post(path, form)
        assert response.status_code == 303
        assert response.headers["location"] == f"/settings?saved={saved}#keys", path
        held = client.client.cookies.get(SHOW_COOKIE)
        assert held and "tsr_" not in held and "Path=/settings" in response.headers["set-cookie"]
        [shown] = revealed_keys(client.get(response.headers["location"]).text)
        assert shown in {store.api_keys.reveal(k.id) for k in store.api_keys.all() if k.revoked_at is None}, path
        assert client.client.cookies.get(SHOW_COOKIE) is None, path  # used: gone from the browser
        assert revealed_keys(client.get(response.headers["location"]).text) == [], path  # a reload shows nothing
        # Put back (as a replay would): another session cannot read it, nor a tampered one.
        with admin_client(admin_settings(tmp_path / saved)) as stranger:
            stranger.client.cookies.set(SHOW_COOKIE, held, domain="testserver.local", path="/settings")
            assert revealed_keys(stranger.get("/settings").text) == []
        client.client.cookies.set(SHOW_COOKIE, "x" + held, domain="testserver.local", path="/settings")
        assert revealed_keys(client.get("/settings").text) == []


# -- proving the settings ----------------------------------------------------------------------------
def test_test_connection_reports_the_server_and_sends_nothing(
        client: AdminClient, certs: Certificates, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
    before = snapshot(client)
    with SmtpServer("starttls", certs, auth=True) as server:
        form = {**SMTP, "smtp_host": "127.0.0.1", "smtp_port": str(server.port), "smtp_security": "starttls",
                "smtp_username": SMTP_USER, "smtp_password": SMTP_PASSWORD}
        response = client.post("/settings/smtp/test", form)
        assert response.status_code == 200
        text = response.text
        assert f"Connected to 127.0.0.1:{server.port} and started TLS (STARTTLS) and signed in as {SMTP_USER}" in text
        # One sentence each: the server's name is not run into "No mail was sent."
        assert re.search(r"\. The server calls itself [^ <]+\. No mail was sent\.", text), text
        assert "not saved yet" in text
        assert field_value(text, "smtp_port") == str(server.port)  # the form stays as typed
        response = client.post("/settings/smtp/test", {**form, "smtp_password": "wrong-password"})
        assert "The connection test failed: AUTH" in response.text and "refuses the username or password" in response.text
        assert server.received == []
    assert snapshot(client)[0] == before[0]  # testing saves nothing


def test_test_connection_to_a_closed_port_fails_clearly(client: AdminClient) -> None:
    from support import free_port
    response = client.post("/settings/smtp/test", {**SMTP, "smtp_host": "127.0.0.1", "smtp_port": str(free_port()),
                                                   "smtp_security": "none", "smtp_username": ""})
    assert response.status_code == 200
    assert "The connection test failed: connect: cannot connect to 127.0.0.1" in response.text


def test_a_test_email_is_queued_and_followed(client: AdminClient) -> None:
    store = client.state.store
    store.set_options({"smtp_host": parse_option("smtp_host", "127.0.0.1"),
                       "default_from": parse_option("default_from", "relay@example.org")})
    response = client.post("/settings/test-email", {"test_to": "me@example.org"})
    assert response.status_code == 303
    message_id = response.headers["location"].split("test=")[1].split("#")[0]
    assert store.messages.status(message_id)["status"] == "queued"
    assert client.state.queue.pending() >= 1
    page = client.get(response.headers["location"]).text
    assert f'href="/messages/{message_id}"' in page and "Waiting for a worker" in page
    status = client.get(f"/settings/test-email/{message_id}").json()
    assert status["status"] == "queued" and status["final"] is False and status["to"] == "me@example.org"
    assert store.log.audit_entries()[0].action == "test_email"


def test_a_test_email_without_smtp_says_what_is_missing(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as fresh:
        response = fresh.post("/settings/test-email", {"test_to": "me@example.org"})
        assert response.status_code == 200
        assert "SMTP delivery is not configured yet" in response.text
        assert field_value(response.text, "test_to") == "me@example.org"
        assert fresh.state.store.messages.counts() == {}


@pytest.mark.parametrize("card,path,form", [
    ("smtp", "/settings/smtp", SMTP),
    ("keys", "/settings/api-keys", {"label": "newsletter"}),
])
def test_the_saved_message_shows_on_the_card_it_belongs_to(client: AdminClient, card: str, path: str,
                                                           form: dict[str, str]) -> None:
    # The page jumps to the card (#smtp): a message at the top of the page was out of sight.
    response = client.post(path, form)
    page = client.get(response.headers["location"] if response.status_code == 303 else "/settings").text \
        if response.status_code == 303 else response.text
    notice = page.index('class="card-result ok" role="status"')
    section = page.index(f'<section class="card" id="{card}"')
    assert section < notice < page.index("</section>", section)


def test_the_keys_card_tells_keys_apart_and_has_no_copyable_mask(client: AdminClient) -> None:
    # Both the current and a replaced portal key read "portal [portal]"; the masked key was an input
    # that could be focused and copied (bullets).
    client.state.store.api_keys.new_primary()
    page = client.get("/settings").text
    keys = page[page.index('id="keys"'):page.index("</section>", page.index('id="keys"'))]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", keys, flags=re.S)
    words = [" ".join(re.sub(r"<[^>]+>", " ", row).split()) for row in rows[1:]]
    assert any(w.startswith("portal in use by the portal") for w in words), words
    assert any(w.startswith("portal former portal key") for w in words), words
    assert not re.search(r"<input[^>]*value=\"tsr_•", keys)
