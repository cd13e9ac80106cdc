"""Connecting the mailbox through the Settings page in chromium, against a real `tspro-relay run`.

Google: "Connect Google account" goes to the stand-in's consent page, Allow
sends the browser back to the relay's own callback, and the card says who is
connected; a message sent through the API then goes out over XOAUTH2.
Microsoft: "Connect Microsoft 365 account" shows the code in the card and the
card notices the sign-in by itself.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from browser_helpers import BrowserRelay, sign_in
from oauth_server import MAILBOX, AuthorizationServer, XOAuth2SmtpServer, google_settings, microsoft_settings
from support import Certificates, wait_until

pytestmark = pytest.mark.browser


@pytest.fixture
def stand_ins(certs: Certificates) -> Iterator[tuple[AuthorizationServer, XOAuth2SmtpServer]]:
    with AuthorizationServer(certs) as authority, XOAuth2SmtpServer(certs, authority) as smtp:
        yield authority, smtp


def test_google_account_connected_through_the_settings_page(
        relay: BrowserRelay, open_page: Callable[..., Page], certs: Certificates,
        stand_ins: tuple[AuthorizationServer, XOAuth2SmtpServer]) -> None:
    authority, smtp = stand_ins
    relay.configure(*google_settings(smtp, authority, certs), "default_from=" + MAILBOX)
    page = open_page(ignore_https_errors=True)  # the stand-in's certificate is from the test CA
    sign_in(page, relay)
    page.goto(f"{relay.url}/settings")
    page.get_by_role("link", name="Connect Google account").click()
    expect(page).to_have_title("Stand-in sign-in")
    assert "code_challenge_method=S256" in page.url
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(re.compile(r".*/settings\?saved=oauth#smtp$"))
    expect(page.locator("#oauth")).to_contain_text(f"Connected to Google as {MAILBOX}.")

    answer = httpx.post(f"{relay.url}/api/send", headers={"Authorization": f"Bearer {relay.key()}"},
                        json={"from_email": MAILBOX, "to": ["ann@example.com"], "subject": "Via Google", "text": "Hi"})
    assert answer.status_code == 202, answer.text
    wait_until(lambda: smtp.received, timeout=30, what="the message at the XOAUTH2 server")
    assert smtp.received[0].auth == MAILBOX and smtp.received[0].message["Subject"] == "Via Google"


def test_microsoft_device_code_shown_and_noticed_in_the_card(
        relay: BrowserRelay, page: Page, certs: Certificates,
        stand_ins: tuple[AuthorizationServer, XOAuth2SmtpServer]) -> None:
    authority, smtp = stand_ins
    relay.configure(*microsoft_settings(smtp, authority, certs, mailbox=""))
    sign_in(page, relay)
    page.goto(f"{relay.url}/settings")
    page.get_by_role("button", name="Connect Microsoft 365 account").click()
    code = page.locator("#device-code")
    expect(code).to_have_text(re.compile(r"^\w{8}$"))
    expect(page.get_by_role("link", name=f"{authority.base}/devicelogin")).to_be_visible()
    authority.approve(code.inner_text())
    expect(page.locator(".device-code [data-poll-field=detail]")).to_have_text(
        f"Connected: the relay now sends as {MAILBOX} through Microsoft 365.", timeout=20_000)
    page.reload()
    expect(page.locator("#oauth")).to_contain_text(f"Connected to Microsoft 365 as {MAILBOX}.")
