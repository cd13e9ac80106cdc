"""The admin pages in a real browser (Debian's chromium) against a real `tspro-relay run` and a real
aiosmtpd server: as a volunteer admin would use them. Any console error or CSP violation fails a test
(see conftest.py); every page visited is saved as a screenshot."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import httpx
import pytest
from playwright.sync_api import Page, expect

from browser_helpers import ADMIN_PASSWORD, SEED_PASSWORD, BrowserRelay, sign_in, unlabelled_inputs
from conftest import Watch
from support import SMTP_PASSWORD, SMTP_USER, Certificates, SmtpServer, cli, free_port, wait_until

pytestmark = pytest.mark.browser
NAVIGATION = ["Queue", "Transaction Log", "Settings", "Sign out"]


def api_send(relay: BrowserRelay, key: str, to: str = "reader@example.com") -> httpx.Response:
    return httpx.post(f"{relay.url}/api/send", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"from_email": "noreply@example.org", "to": [to], "subject": "via the copied key",
                            "text": "hello"})


def api_status(relay: BrowserRelay, key: str, message_id: str) -> str:
    response = httpx.get(f"{relay.url}/api/messages/{message_id}", headers={"Authorization": f"Bearer {key}"})
    return str(response.json()["status"])


def nav_labels(page: Page) -> list[str]:
    return [" ".join(text.split()) for text in page.locator("header nav a, header nav button").all_inner_texts()]


def test_first_sign_in_forces_a_new_password_then_opens_the_queue(page: Page, fresh_relay: BrowserRelay) -> None:
    page.goto(fresh_relay.url)
    expect(page).to_have_url(f"{fresh_relay.url}/login?next=/")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    sign_in(page, fresh_relay, password=SEED_PASSWORD)
    expect(page.get_by_role("heading", name="Choose your own password")).to_be_visible()
    page.goto(f"{fresh_relay.url}/settings")  # nothing else opens before the change
    expect(page.get_by_role("heading", name="Choose your own password")).to_be_visible()

    page.get_by_label("Current password").fill(SEED_PASSWORD)
    page.get_by_label("New password", exact=True).fill(ADMIN_PASSWORD)
    page.get_by_label("Confirm new password").fill("a-different-one")
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#f-confirm_password-error")).to_have_text("The two new passwords do not match.")

    page.get_by_label("Current password").fill(SEED_PASSWORD)
    page.get_by_label("New password", exact=True).fill(ADMIN_PASSWORD)
    page.get_by_label("Confirm new password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Change password").click()
    expect(page).to_have_url(f"{fresh_relay.url}/settings")
    assert nav_labels(page) == NAVIGATION
    page.get_by_role("link", name="Queue", exact=True).click()
    expect(page.get_by_role("heading", name="Queue")).to_be_visible()
    assert nav_labels(page) == NAVIGATION


def test_smtp_card_test_connection_and_a_test_email_that_arrives(
        page: Page, relay: BrowserRelay, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True) as server:
        sign_in(page, relay)
        page.get_by_role("link", name="Settings", exact=True).click()
        card = page.locator("#smtp")
        card.get_by_label("SMTP host").fill("127.0.0.1")
        card.get_by_label("Port").fill(str(server.port))
        card.get_by_label("Security").select_option(label="STARTTLS")
        card.get_by_label("Username").fill(SMTP_USER)
        card.get_by_label("Password", exact=True).fill(SMTP_PASSWORD)
        card.get_by_label("Default From email").fill("relay@example.org")
        card.get_by_label("Default From name").fill("TS Pro Relay")
        card.get_by_label("Allowed From").fill("example.org")
        card.get_by_label("Max attachment size (MB)").fill("10")

        card.get_by_role("button", name="Test connection").click()
        result = page.locator("#smtp .card-result")
        expect(result).to_contain_text(f"Connected to 127.0.0.1:{server.port} and started TLS (STARTTLS) "
                                       f"and signed in as {SMTP_USER}.")
        expect(result).to_contain_text("No mail was sent.")
        assert server.received == []
        expect(page.locator("#f-smtp_port")).to_have_value(str(server.port))  # still as typed

        # The password field is write-only: type it again to save it.
        page.locator("#smtp").get_by_label("Password", exact=True).fill(SMTP_PASSWORD)
        page.get_by_role("button", name="Save SMTP settings").click()
        expect(page.get_by_role("status").first).to_contain_text("SMTP settings saved.")
        expect(page.locator("#f-smtp_host")).to_have_value("127.0.0.1")
        expect(page.locator("#smtp")).to_contain_text("A password is stored")

        test_card = page.locator("#test-email")
        test_card.get_by_label("Send to").fill("volunteer@example.com")
        test_card.get_by_role("button", name="Send test").click()
        link = page.locator("#test-email a.mono")
        expect(link).to_be_visible()
        message_id = link.inner_text()
        assert link.get_attribute("href") == f"/messages/{message_id}"
        # app.js follows the message until the worker has delivered it.
        expect(page.locator("#test-email [data-poll-field=badge]")).to_have_text("Sent", timeout=30_000)
        expect(page.locator("#test-email [data-poll-field=detail]")).to_contain_text("Delivered")
        wait_until(lambda: server.received, what="the test email at the SMTP server")
        [mail] = server.received
        assert mail.rcpt_tos == ["volunteer@example.com"] and mail.auth == SMTP_USER
        assert mail.message["Subject"] == "TS Pro Relay test email"
        # A test email was sent by no API key, so the API answers no key about it (404); the CLI reads the store.
        assert json.loads(cli(relay.env, "status", message_id, "--json", cwd=relay.cwd).stdout)["status"] == "sent"
        page.reload()
        expect(page.locator("#audit")).to_contain_text("queued a test email to volunteer@example.com")
        # ...and the Transaction Log shows it sent, as the guide promises (Part 3.4).
        page.get_by_role("link", name="Transaction Log").click()
        sent = page.locator("#log-rows tbody tr", has_text="TS Pro Relay test email").filter(
            has=page.locator(".badge-sent"))
        expect(sent).to_have_count(1)
        expect(sent).to_contain_text("volunteer@example.com")
        expect(sent).to_contain_text("250")
        expect(sent.get_by_role("link", name=message_id)).to_be_visible()


def test_reveal_copy_add_and_revoke_keys(open_page: Callable[..., Page], relay: BrowserRelay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings())
        page = open_page()
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=relay.url)
        sign_in(page, relay)
        page.goto(f"{relay.url}/settings#keys")
        keys = page.locator("#keys")
        expect(keys.locator(".key-masked")).to_contain_text("tsr_••••")  # text, not a field to copy bullets from
        expect(keys.get_by_label("Portal key")).to_have_count(0)
        keys.get_by_role("button", name="Reveal").first.click()
        # No token in the address: it would stay in the history and in a proxy's access log.
        expect(page).to_have_url(f"{relay.url}/settings?saved=revealed#keys")
        keys = page.locator("#keys")
        first_key = keys.get_by_label("Portal key").input_value()
        assert first_key.startswith("tsr_") and "•" not in first_key
        assert [c["name"] for c in page.context.cookies() if c["name"] == "relay_show"] == []  # used up
        keys.get_by_role("button", name="Copy").first.click()
        expect(keys.get_by_role("button", name="Copied")).to_be_visible()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied == first_key
        response = api_send(relay, copied)
        assert response.status_code == 202
        wait_until(lambda: api_status(relay, copied, response.json()["id"]) == "sent", what="the first key's send")

        # Rotation without downtime: a second key, with limits of its own, used, then the first revoked.
        page.get_by_label("New key name").fill("portal-2025")
        page.locator("#f-new_per_hour").fill("50")
        page.locator("#f-new_allowed_from").fill("example.org")
        page.get_by_role("button", name="Add key").click()
        expect(page.get_by_role("status").first).to_contain_text("Key added.")
        expect(page).to_have_url(f"{relay.url}/settings?saved=added#keys")
        row = page.locator("#keys tr", has_text="portal-2025")
        expect(row.get_by_label("Sends per hour")).to_have_value("50")
        expect(row.locator("td").nth(1)).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d UTC$"))  # created
        expect(row.locator("td").nth(2)).to_have_text("never")  # last used
        expect(row.get_by_label("Allowed From")).to_have_value("example.org")
        row.get_by_role("button", name="Copy").click()
        expect(row.get_by_role("button", name="Copied")).to_be_visible()  # written to the clipboard now
        second_key = page.evaluate("navigator.clipboard.readText()")
        assert second_key.startswith("tsr_") and second_key != first_key
        response = api_send(relay, second_key, to="second@example.com")
        assert response.status_code == 202
        wait_until(lambda: api_status(relay, second_key, response.json()["id"]) == "sent", what="the second key's send")
        spoofed = httpx.post(f"{relay.url}/api/send", headers={"Authorization": f"Bearer {second_key}"}, timeout=30,
                             json={"from_email": "ceo@elsewhere.example", "to": ["x@example.com"], "subject": "s",
                                   "text": "t"})
        assert spoofed.status_code == 403 and "Allowed From list of the API key" in spoofed.json()["error"]
        page.reload()
        expect(page.locator("#keys input.mono")).to_have_count(0)  # shown once: a reload shows no key
        row = page.locator("#keys tr", has_text="portal-2025")
        expect(row).to_contain_text("just now")  # last used
        row.get_by_label("Sends per hour").fill("60")
        row.get_by_role("button", name="Save limits").click()
        expect(page.get_by_role("status").first).to_have_text("The key's limits were saved.")
        expect(page.locator("#keys tr", has_text="portal-2025").get_by_label("Sends per hour")).to_have_value("60")

        page.locator("#keys tr", has_text="portal").filter(has=page.locator(".tag")).get_by_role(
            "button", name="Revoke").click()  # app.js asks confirm(); the fixture accepts it
        expect(page.get_by_role("status").first).to_contain_text("The key was revoked")
        assert api_send(relay, first_key).status_code == 401
        assert api_send(relay, second_key, to="third@example.com").status_code == 202
        wait_until(lambda: len(server.received) == 3, what="three deliveries")
        assert sorted(m.rcpt_tos[0] for m in server.received) == ["reader@example.com", "second@example.com",
                                                                  "third@example.com"]


def test_five_wrong_passwords_lock_signing_in(page: Page, relay: BrowserRelay) -> None:
    page.goto(f"{relay.url}/login")
    for attempt in range(4):
        sign_in(page, relay, password=f"wrong-guess-{attempt}")
        expect(page.get_by_role("alert")).to_have_text("Wrong username or password.")
        expect(page.get_by_label("Username")).to_have_value("admin")
    sign_in(page, relay, password="wrong-guess-5")
    expect(page.get_by_role("alert")).to_contain_text("Too many failed sign-ins. Signing in is locked for")
    sign_in(page, relay)  # the right password, too soon
    expect(page.get_by_role("alert")).to_contain_text("Too many failed sign-ins")
    assert "/login" in page.url


def test_sign_out_then_a_replayed_cookie_is_refused(open_page: Callable[..., Page], relay: BrowserRelay,
                                                    watch: Watch) -> None:
    page = open_page()
    sign_in(page, relay)
    expect(page.get_by_role("heading", name="Queue")).to_be_visible()
    # First, the watch that fails every browser test: an inline script is blocked by the relay's CSP
    # and reported, and so is a console error (cleared here, or this test would fail for them).
    page.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
                  " document.head.appendChild(s); console.error('a deliberate console error'); }")
    wait_until(lambda: page.wait_for_timeout(50) or len(watch.problems) >= 2, what="the watch's reports")
    assert page.evaluate("window.ran") is None  # the CSP blocked it
    assert any(p.startswith("console error: CSP violation: script-src") for p in watch.problems), watch.problems
    assert any("a deliberate console error" in p for p in watch.problems), watch.problems
    watch.problems.clear()
    [cookie] = [c for c in page.context.cookies() if c["name"] == "relay_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You are signed out.")

    replay = open_page()
    replay.context.add_cookies([cookie])
    replay.goto(f"{relay.url}/settings")
    expect(replay).to_have_url(f"{relay.url}/login?next=/settings")
    response = httpx.get(f"{relay.url}/settings", cookies={"relay_session": cookie["value"]})
    assert response.status_code == 303 and response.headers["location"].startswith("/login")


def test_readable_on_a_phone_and_usable_without_javascript(open_page: Callable[..., Page],
                                                            relay: BrowserRelay) -> None:
    # A mail server that is down (nothing listens on the port), so a message waits on the dashboard.
    relay.configure("smtp_host=127.0.0.1", f"smtp_port={free_port()}", "smtp_security=none",
                    "retry_base_seconds=3600", "retry_max_seconds=3600", "default_from=relay@example.org")
    response = api_send(relay, relay.key(), to="waiting@example.com")
    assert response.status_code == 202
    message_id = response.json()["id"]
    wait_until(lambda: api_status(relay, relay.key(), message_id) == "deferred", what="the message to wait")

    phone = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                      java_script_enabled=False)
    sign_in(phone, relay)
    expect(phone.get_by_role("heading", name="Queue")).to_be_visible()
    # Without JavaScript: a message's body, a bulk Cancel (asked on a page of its own), Pause and
    # Resume, and the log's search all work by plain forms and links.
    phone.locator(f"#row-{message_id}").get_by_role("link").click()
    phone.get_by_role("button", name="Show the body").click()
    expect(phone.locator("#body pre").first).to_have_text("hello")
    phone.get_by_role("link", name="Queue", exact=True).click()
    phone.locator(f"#row-{message_id}").get_by_role("checkbox").check()
    phone.locator("#waiting .bulk-actions").get_by_role("button", name="Cancel").click()
    expect(phone.get_by_role("heading", name="Please confirm")).to_be_visible()
    phone.get_by_role("button", name="Cancel delivery").click()
    expect(phone.get_by_role("status").first).to_have_text("Cancelled 1 message.")
    assert api_status(relay, relay.key(), message_id) == "cancelled"
    phone.get_by_role("button", name="Pause delivery").click()
    expect(phone.locator("#paused-banner")).to_contain_text("Delivery is paused.")
    phone.get_by_role("button", name="Resume delivery").click()
    expect(phone.locator("#paused-banner")).to_have_count(0)
    phone.get_by_role("link", name="Transaction Log").click()
    phone.get_by_label("Search message id, recipient, sender or subject").fill("waiting@example.com")
    phone.get_by_role("button", name="Apply").click()
    expect(phone.locator("#log-rows tbody tr").first).to_contain_text("waiting@example.com")
    assert "q=waiting" in phone.url

    phone.goto(f"{relay.url}/settings")
    # Without JavaScript a dangerous button asks on a page of its own.
    old = relay.key()
    phone.locator("#keys").get_by_role("button", name="Generate new key").click()
    expect(phone.get_by_role("heading", name="Please confirm")).to_be_visible()
    phone.get_by_role("button", name="Generate new key").click()
    expect(phone.get_by_role("status").first).to_contain_text("A new portal key was generated")
    new = phone.locator("#keys").get_by_label("Portal key").input_value()
    assert new == relay.key() != old

    # On a phone's width nothing overflows sideways, and every field has a visible label
    # (measured with scripts on: the context above has none).
    measured = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    measured.goto(f"{relay.url}/login")
    assert unlabelled_inputs(measured) == []
    assert measured.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "/login"
    sign_in(measured, relay)
    for path in ("/", "/settings", "/account/password"):
        measured.goto(f"{relay.url}{path}")
        assert measured.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        assert unlabelled_inputs(measured) == [], path
    measured.goto(f"{relay.url}/settings")
    measured.get_by_label("New key name").fill("phone")
    measured.get_by_role("button", name="Add key").click()
    expect(measured.locator("#keys tr", has_text="phone").get_by_label("Key")).to_be_visible()
    assert unlabelled_inputs(measured) == []
    assert measured.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_queue_page_refreshes_itself(page: Page, relay: BrowserRelay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "default_from=relay@example.org")
        sign_in(page, relay)
        sent = page.locator("#queue-summary li", has=page.locator(".badge-sent")).locator(".count")
        expect(sent).to_have_text("0")
        page.evaluate("window.stillTheSamePage = true")
        response = api_send(relay, relay.key())
        assert response.status_code == 202
        wait_until(lambda: server.received, what="the delivery")
        expect(sent).to_have_text("1", timeout=15_000)  # app.js reloaded the region; nobody clicked
        assert page.evaluate("window.stillTheSamePage") is True  # the region was replaced, not the page


def test_the_admin_pages_at_the_relays_public_url(open_page: Callable[..., Page], watch: Watch, tmp_path: Any,
                                                  certs: Certificates) -> None:
    """RELAY_PUBLIC_URL in a real browser: the pages work at that address (Chromium's own Origin on every
    post), still at 127.0.0.1 (loopback), and another name gets the 400 page. (*.localhost is loopback
    to Chromium, so relay.localhost needs no DNS; to the relay it is a name like any other.)"""
    relay = BrowserRelay(tmp_path, ADMIN_PASSWORD, SSL_CERT_FILE=str(certs.ca_file))
    public = f"http://relay.localhost:{relay.process.port}"
    relay.env["RELAY_PUBLIC_URL"] = public
    relay.start()
    try:
        page = open_page()
        page.goto(f"{public}/login")
        sign_in(page, relay)
        expect(page).to_have_url(f"{public}/")
        page.goto(f"{public}/settings#keys")
        page.locator("#keys").get_by_role("button", name="Reveal").first.click()
        expect(page).to_have_url(f"{public}/settings?saved=revealed#keys")
        assert page.locator("#keys").get_by_label("Portal key").input_value() == relay.key()
        page.get_by_role("button", name="Save sign-in protection").click()
        expect(page.get_by_role("status").first).to_have_text("Sign-in protection saved.")

        other = open_page()
        other.goto(f"{relay.url}/login")  # 127.0.0.1: the health check's name, always answered
        expect(other.get_by_role("button", name="Sign in")).to_be_visible()
        answer = other.goto(f"http://other.localhost:{relay.process.port}/login")
        assert answer is not None and answer.status == 400
        expect(other.locator("main")).to_contain_text("does not answer to the host name")
        expect(other.locator("main")).to_contain_text("RELAY_ALLOWED_HOSTS")
        other.close()  # before its favicon's 400 can come in after the line below
    finally:
        relay.stop()
    # That 400 is meant (the browser reports every 4xx document, and its favicon's, as a console error).
    watch.problems[:] = [p for p in watch.problems if "other.localhost" not in p]
