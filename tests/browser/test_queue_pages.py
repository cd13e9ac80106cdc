"""The Queue, a message's page and the Transaction Log in a real browser (Debian's chromium), against a
real `tspro-relay run` and a real aiosmtpd server, used as a volunteer admin would use them.

The fixture (conftest.py) fails a test on any console error or CSP violation and saves a screenshot
of every page loaded. ``test_tour_for_the_readme`` also saves the README's screenshots under
tests/browser/artifacts/tour/ (copied by hand to docs/screenshots/ when the pages change).
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from playwright.sync_api import Page, expect

from browser_helpers import BrowserRelay, sign_in, unlabelled_inputs
from conftest import ARTIFACTS
from support import SmtpServer, cli, free_port, wait_until

pytestmark = pytest.mark.browser


def api_send(relay: BrowserRelay, key: str | None = None, **fields: Any) -> httpx.Response:
    payload = {"from_email": "noreply@example.org", "to": ["reader@example.com"], "subject": "Hello",
               "text": "hello", **fields}
    return httpx.post(f"{relay.url}/api/send", headers={"Authorization": f"Bearer {key or relay.key()}"},
                      json=payload, timeout=30)


def unreachable_smtp() -> list[str]:
    """Settings for a mail server that is down: a free port nothing listens on."""
    return ["smtp_host=127.0.0.1", f"smtp_port={free_port()}", "smtp_security=none", "smtp_timeout_seconds=10",
            "retry_base_seconds=3600", "retry_max_seconds=3600", "default_from=relay@example.org"]


def status_of(relay: BrowserRelay, message_id: str) -> str:
    response = httpx.get(f"{relay.url}/api/messages/{message_id}",
                         headers={"Authorization": f"Bearer {relay.key()}"}, timeout=30)
    return str(response.json()["status"])


def test_a_message_failing_while_the_server_is_down_is_retried_from_the_dashboard(
        page: Page, relay: BrowserRelay) -> None:
    server = SmtpServer("none")  # its port is chosen; nothing listens there yet
    relay.configure(*server.settings(), "retry_base_seconds=3600", "retry_max_seconds=3600",
                    "default_from=relay@example.org")
    response = api_send(relay, to=["volunteer@example.com"], subject="Your access request was approved")
    assert response.status_code == 202
    message_id = response.json()["id"]
    wait_until(lambda: status_of(relay, message_id) == "deferred", what="the first attempt to fail")

    sign_in(page, relay)
    row = page.locator(f"#waiting #row-{message_id}")
    expect(row).to_contain_text("Deferred")
    expect(row).to_contain_text("volunteer@example.com")
    expect(page.locator("#upstream-state")).to_contain_text("connect")
    expect(page.locator("#queue-summary .count-deferred .count")).to_have_text("1")

    with server:  # the mail server is back; the next retry would be an hour away
        row.get_by_role("button", name="Retry now").click()
        expect(page.get_by_role("status").first).to_have_text("Queued for delivery now: 1 message.")
        wait_until(lambda: server.received, what="the retried message at the SMTP server")
        [mail] = server.received
        assert mail.rcpt_tos == ["volunteer@example.com"]
        assert mail.message["Subject"] == "Your access request was approved"
        wait_until(lambda: status_of(relay, message_id) == "sent", what="the message to be sent")
        # The dashboard follows by itself: the row leaves the waiting list, the sent count moves.
        expect(page.locator(f"#row-{message_id}")).to_have_count(0, timeout=15_000)
        expect(page.locator("#queue-summary .count-sent .count")).to_have_text("1")

    page.goto(f"{relay.url}/messages/{message_id}")
    timeline = page.locator("#timeline tbody tr")
    expect(timeline).to_have_count(4)
    expect(timeline.nth(0)).to_contain_text("Accepted")
    expect(timeline.nth(1)).to_contain_text("Deferred")
    expect(timeline.nth(1)).to_contain_text("connect")
    expect(timeline.nth(2)).to_contain_text("Retried")
    expect(timeline.nth(2)).to_contain_text("retry now by admin (it was deferred)")
    expect(timeline.nth(3)).to_contain_text("Sent")
    expect(timeline.nth(3)).to_contain_text("250")
    page.get_by_role("link", name="Settings").click()
    expect(page.locator("#audit")).to_contain_text(f"retried 1 message(s): {message_id}")


def test_cancel_in_bulk_from_the_dashboard(page: Page, relay: BrowserRelay) -> None:
    relay.configure(*unreachable_smtp())  # everything waits
    ids = [api_send(relay, to=[f"member{i}@example.com"]).json()["id"] for i in range(3)]
    wait_until(lambda: all(status_of(relay, i) == "deferred" for i in ids), what="three deferred messages")
    sign_in(page, relay)
    page.get_by_role("button", name="Cancel", exact=True).first.click()  # nothing ticked
    expect(page.get_by_role("status").first).to_contain_text("Nothing was selected")
    for message_id in ids[:2]:
        page.locator(f"#row-{message_id}").get_by_role("checkbox").check()
    page.locator("#waiting .bulk-actions").get_by_role("button", name="Cancel").click()  # confirm() accepted
    expect(page.get_by_role("status").first).to_have_text("Cancelled 2 messages.")
    assert [status_of(relay, i) for i in ids] == ["cancelled", "cancelled", "deferred"]
    expect(page.locator("#waiting tbody tr")).to_have_count(1)


def test_log_search_filter_and_csv_export(page: Page, relay: BrowserRelay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "default_from=relay@example.org")
        attachment = {"filename": "minutes.txt", "mime_type": "text/plain",
                      "content_b64": base64.b64encode(b"minutes").decode()}
        for to, subject, extra in [("ann@example.com", "Reset your password", {}),
                                   ("bob@example.org", "Welcome aboard", {}),
                                   ("carol@example.net", "Minutes of the meeting", {"attachments": [attachment]})]:
            assert api_send(relay, to=[to], subject=subject, **extra).status_code == 202
        assert api_send(relay, key="tsr_not-the-key").status_code == 401
        wait_until(lambda: len(server.received) == 3, what="three deliveries")
        # Refused keys are written as one row per address and minute, within a second or so.
        wait_until(lambda: "wrong API key" in cli(relay.env, "log", "--status", "rejected", cwd=relay.cwd).stdout,
                   what="the refusal in the log")

        sign_in(page, relay)
        page.get_by_role("link", name="Transaction Log").click()
        counters = page.locator(".log-counters")
        expect(counters.locator(".counter-total .count")).to_have_text("7")  # 3 accepted, 3 sent, 1 unauthorized
        expect(counters.locator(".counter-sent .count")).to_have_text("3")
        expect(counters.locator(".counter-unauthorized .count")).to_have_text("1")
        minutes = page.locator("#log-rows tbody tr", has_text="Minutes of the meeting").last
        expect(minutes.locator("td.num")).to_have_text("1")  # the attachment count

        page.get_by_label("Search message id, recipient, sender or subject").fill("bob@example.org")
        page.get_by_role("button", name="Apply").click()
        rows = page.locator("#log-rows tbody tr")
        expect(rows).to_have_count(2)
        for i in range(2):
            expect(rows.nth(i)).to_contain_text("bob@example.org")
        page.get_by_label("Status").select_option(label="Sent")
        page.get_by_role("button", name="Apply").click()
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("Welcome aboard")

        with page.expect_download() as download_info:
            page.get_by_role("link", name="Export CSV").click()
        download = download_info.value
        assert download.suggested_filename.startswith("tspro-relay-log-") and download.suggested_filename.endswith(
            ".csv")
        saved = Path(download.path()).read_bytes().decode("utf-8-sig")
        table = list(csv.DictReader(io.StringIO(saved)))
        assert [(r["status"], r["recipients"], r["subject"]) for r in table] == [
            ("sent", "bob@example.org", "Welcome aboard")]

        page.get_by_role("link", name="Reset").click()
        page.get_by_label("Status").select_option(label="Unauthorized")
        page.get_by_label("Time").select_option(label="Last hour")
        page.get_by_role("button", name="Apply").click()
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("127.0.0.1")
        expect(rows.first).to_contain_text("1 request with a wrong API key from 127.0.0.1")

        page.get_by_role("button", name="Clear log").click()  # confirm() accepted by the fixture
        expect(page.get_by_role("status").first).to_have_text("The log was cleared (7 rows removed).")
        expect(page.locator("#log-rows tbody tr")).to_have_count(1)
        expect(page.locator("#log-rows tbody tr").first).to_contain_text("log cleared by admin")
        page.get_by_role("link", name="Settings").click()
        expect(page.locator("#audit")).to_contain_text("cleared the transaction log (7 rows)")


def test_message_page_with_an_audited_body_reveal(page: Page, relay: BrowserRelay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "default_from=relay@example.org")
        attachment = {"filename": "welcome.pdf", "mime_type": "application/pdf",
                      "content_b64": base64.b64encode(b"%PDF-1.4 " * 300).decode()}
        response = api_send(relay, to=["newmember@example.com"], subject="Welcome, your password inside",
                            text="Your temporary password is hunter2-Xy", html="<p>Hello <b>there</b></p>",
                            reply_to="help@example.org", reply_to_name="Help desk", attachments=[attachment])
        message_id = response.json()["id"]
        wait_until(lambda: server.received, what="the delivery")

        sign_in(page, relay)
        page.get_by_role("link", name="Transaction Log").click()
        page.locator("#log-rows").get_by_role("link", name=message_id).first.click()
        expect(page.get_by_role("heading", name=f"Message {message_id}")).to_be_visible()
        expect(page.locator("#envelope")).to_contain_text("newmember@example.com")
        headers = page.locator("#headers")
        expect(headers).to_contain_text("Help desk <help@example.org>")
        expect(headers).to_contain_text("Welcome, your password inside")
        expect(headers).to_contain_text(f"<{message_id}@example.org>")
        expect(page.locator("#attachments")).to_contain_text("welcome.pdf")
        expect(page.locator("#attachments")).to_contain_text("application/pdf, 2.6 KB")
        expect(page.locator("#recipients tbody tr")).to_contain_text("250")
        expect(page.locator("#timeline tbody tr")).to_have_count(2)
        expect(page.locator("#timeline tbody tr").nth(1)).to_contain_text("Sent")
        expect(page.locator("body")).not_to_contain_text("hunter2")

        page.get_by_role("button", name="Show the body").click()
        expect(page).to_have_url(f"{relay.url}/messages/{message_id}#body")  # no token in the address
        body = page.locator("#body")
        expect(body.locator("pre").first).to_have_text("Your temporary password is hunter2-Xy")
        expect(body.locator("pre").nth(1)).to_have_text("<p>Hello <b>there</b></p>")  # its source, as text
        assert body.locator("b").count() == 0  # never rendered
        page.get_by_role("link", name="Settings").click()
        entry = page.locator("#audit tr", has_text=f"body viewed: message {message_id}")
        expect(entry).to_contain_text("admin")
        expect(entry).to_contain_text("127.0.0.1")


def test_the_new_pages_on_a_phone(open_page: Callable[..., Page], relay: BrowserRelay) -> None:
    relay.configure(*unreachable_smtp())  # the message waits, so the lists have rows with checkboxes
    message_id = api_send(relay, to=["a-rather-long-address-for-a-phone@example.com"]).json()["id"]
    wait_until(lambda: status_of(relay, message_id) == "deferred", what="a waiting message")
    phone = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    sign_in(phone, relay)
    for path in ("/", "/logs", f"/messages/{message_id}", "/logs?status=exploded"):
        phone.goto(f"{relay.url}{path}")
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        assert unlabelled_inputs(phone) == [], path


def test_tour_for_the_readme(open_page: Callable[..., Page], relay: BrowserRelay) -> None:
    """Realistic traffic, then the three pages the README shows, at a laptop's size."""
    with SmtpServer("none") as server:
        server.behaviour.rcpt_replies["gone@example.com"] = "550 5.1.1 No such user here"
        server.behaviour.rcpt_replies["full@example.com"] = "452 4.2.2 Mailbox full, try again later"
        relay.configure(*server.settings(), "default_from=noreply@example.org", "default_from_name=District Portal",
                        "smtp_tls_verify=true")
        subjects = ["Reset your password", "Your access request was approved", "New message from the contact form",
                    "Meeting minutes for May", "Recovery contact confirmation"]
        for i in range(12):
            assert api_send(relay, to=[f"member{i}@example.com"], subject=subjects[i % len(subjects)]).status_code == 202
        refused = api_send(relay, to=["gone@example.com"], subject="Agenda: district assembly").json()["id"]
        later = api_send(relay, to=["full@example.com"], subject="Treasurer report for May").json()["id"]
        partly = api_send(relay, to=["member20@example.com", "gone@example.com"],
                          subject="Service committee minutes").json()["id"]
        assert api_send(relay, key="tsr_an-old-key").status_code == 401
        assert api_send(relay, to=[]).status_code == 400
        wait_until(lambda: len(server.received) == 13, what="the deliveries")
        wait_until(lambda: status_of(relay, refused) == "failed", what="the refused one to fail")
        wait_until(lambda: status_of(relay, later) == "deferred", what="the full mailbox to defer")
        wait_until(lambda: status_of(relay, partly) == "partial", what="one of two recipients to be refused")
        page = open_page(viewport={"width": 1280, "height": 900})
        sign_in(page, relay)
        tour = ARTIFACTS / "tour"
        tour.mkdir(parents=True, exist_ok=True)
        expect(page.locator("#queue-summary .count-sent .count")).to_have_text("12", timeout=15_000)
        page.screenshot(path=str(tour / "dashboard.png"))
        page.get_by_role("link", name="Transaction Log").click()
        page.screenshot(path=str(tour / "transaction-log.png"))
        # Every kind of event the relay logs, as the real processes wrote them, is on the page.
        shown = {label.strip() for label in page.locator("#log-rows tbody tr .badge").all_inner_texts()}
        assert shown >= {"Accepted", "Rejected", "Unauthorized", "Sent", "Partly sent", "Deferred",
                         "Failed"}, shown
        partial_row = page.locator("#log-rows tbody tr", has=page.locator(".badge-partial"))
        expect(partial_row).to_contain_text("gone@example.com")
        expect(partial_row).to_contain_text("550")
        page.get_by_role("link", name="Settings").click()
        page.screenshot(path=str(tour / "settings.png"))


def test_pause_and_resume_delivery(page: Page, relay: BrowserRelay) -> None:
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "default_from=relay@example.org")
        sign_in(page, relay)
        page.get_by_role("button", name="Pause delivery").click()
        expect(page.locator("#paused-banner")).to_contain_text("Delivery is paused.")
        response = api_send(relay, to=["held@example.com"], subject="Held while paused")
        assert response.status_code == 202  # the API still accepts and queues
        message_id = response.json()["id"]
        health = httpx.get(f"{relay.url}/api/health", headers={"Authorization": f"Bearer {relay.key()}"}).json()
        assert health["ok"] is False and health["delivery_paused"] is True and "paused" in health["error"]
        # The dashboard follows by itself: the message waits, queued; nothing reaches the server.
        expect(page.locator(f"#waiting #row-{message_id}")).to_contain_text("Queued", timeout=15_000)
        page.wait_for_timeout(3000)  # a worker that ignored the pause would have sent it by now
        assert server.received == [] and status_of(relay, message_id) == "queued"

        page.get_by_role("button", name="Resume delivery").click()
        expect(page.get_by_role("status").first).to_have_text("Delivery resumed; 1 waiting message woken.")
        expect(page.locator("#paused-banner")).to_have_count(0)
        wait_until(lambda: server.received, what="the held message after resuming")
        assert server.received[0].rcpt_tos == ["held@example.com"]
        wait_until(lambda: status_of(relay, message_id) == "sent", what="it to be recorded as sent")
        health = httpx.get(f"{relay.url}/api/health", headers={"Authorization": f"Bearer {relay.key()}"}).json()
        assert health["delivery_paused"] is False
        expect(page.locator(f"#row-{message_id}")).to_have_count(0, timeout=15_000)
        page.get_by_role("link", name="Settings").click()
        expect(page.locator("#audit")).to_contain_text("paused delivery")
        expect(page.locator("#audit")).to_contain_text("resumed delivery")
