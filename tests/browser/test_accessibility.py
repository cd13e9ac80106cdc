"""axe-core on every admin page at desktop and phone width: zero violations is the bar.

axe-core comes from npm (tests/browser/package.json; `npm ci --prefix tests/browser`,
which .ci/run does) and is evaluated in the page through DevTools, so the page's
own CSP is left as it is. The relay holds what makes each page show all it can:
messages waiting to retry (the orange badge), failed, sent; two API keys; a
transaction log with refusals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from playwright.sync_api import Page

from browser_helpers import BrowserRelay, sign_in
from support import SmtpServer, cli, wait_until

AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"
WIDTHS = [1280, 390]


@pytest.fixture
def busy_relay(relay: BrowserRelay) -> Iterator[tuple[BrowserRelay, str]]:
    """A message deferred (waiting to retry), one failed, one sent; a second key."""
    with SmtpServer("none") as server:
        relay.configure(*server.settings(), "default_from=relay@example.org", "retry_base_seconds=3600")
        cli(relay.env, "api-key", "add", "--label", "newsletter", cwd=relay.cwd)
        server.behaviour.data_replies = ["451 4.3.0 Try again later", "550 5.1.1 No such user"]
        key = relay.key()
        ids = []
        for subject in ("Deferred one", "Failed one", "Sent one"):
            answer = httpx.post(f"{relay.url}/api/send", headers={"Authorization": f"Bearer {key}"},
                                json={"from_email": "noreply@example.org", "to": ["ann@example.com"],
                                      "subject": subject, "text": "Body"}, timeout=30)
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])

            def settled(message_id: str = ids[-1]) -> bool:
                status = httpx.get(f"{relay.url}/api/messages/{message_id}",
                                   headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["status"]
                return status in ("deferred", "failed", "sent")

            wait_until(settled, timeout=30, what=f"{subject} to settle")
        httpx.post(f"{relay.url}/api/send", headers={"Authorization": "Bearer wrong"}, json={}, timeout=30)
        yield relay, ids[0]


def violations(page: Page) -> list[str]:
    # Nothing wider than the window: a phone scrolls sideways only inside a table's own scroll box.
    wide = page.evaluate("() => document.documentElement.scrollWidth")
    width = page.viewport_size["width"] if page.viewport_size else 0
    found = [f"{page.url} is {wide} px wide at {width} px"] if wide > width else []
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text(encoding="utf-8"))
    result: dict[str, Any] = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations']})")
    return found + [f"{page.url} at {page.viewport_size['width'] if page.viewport_size else '?'} px: {v['id']} "
            f"({v['impact']}): {v['help']}: "
            + json.dumps([n["target"] for n in v["nodes"]][:5]) + " " + (v["nodes"][0].get("failureSummary") or "")
            for v in result["violations"]]


# What must stay on one line: a log row's time (it wrapped onto 3 lines at 1280 px), a message id in a
# page title (6 lines on a phone), an address in Recent changes ("127.0.0. / 1").
ONE_LINE = ['.log-table td[data-label="Time (UTC)"]', "h1 .mono", "#audit td.mono"]


def cramped(page: Page) -> list[str]:
    lines = page.evaluate("""(selectors) => selectors.flatMap(selector =>
        Array.from(document.querySelectorAll(selector)).map(el => {
          const range = document.createRange(); range.selectNodeContents(el);
          const tops = new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top)));
          return [selector, tops.size, el.textContent.trim()];
        }))""", ONE_LINE)
    return [f"{page.url}: {selector} takes {n} lines: {text!r}" for selector, n, text in lines if n > 1]


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_has_no_axe_violations(open_page: Any, watch: Any, busy_relay: tuple[BrowserRelay, str],
                                          width: int) -> None:
    relay, deferred = busy_relay
    page: Page = open_page(viewport={"width": width, "height": 900})
    found: list[str] = []
    page.goto(f"{relay.url}/login")
    found += violations(page)
    sign_in(page, relay)
    # Recent changes on Settings get rows (its audit table scrolls on a phone), and the paused page is seen.
    page.get_by_role("button", name="Pause delivery").click()
    page.wait_for_load_state()
    found += violations(page)
    page.get_by_role("button", name="Resume delivery").click()
    page.wait_for_load_state()
    for path in ("/", "/logs", "/settings", f"/messages/{deferred}", "/no-such-page"):
        page.goto(f"{relay.url}{path}")
        page.wait_for_load_state()
        found += violations(page)
        found += cramped(page)
    # The error page's own 404 is meant (the browser reports every 404 as a console error).
    watch.problems[:] = [p for p in watch.problems if "/no-such-page" not in p]
    # Settings with a key revealed (its field and Copy button).
    page.goto(f"{relay.url}/settings#keys")
    page.locator("#keys").get_by_role("button", name="Reveal").first.click()
    page.wait_for_load_state()
    assert page.locator("#keys input.mono").count() == 1
    found += violations(page)
    # A confirmation page: cancel the deferred message, asked first.
    page.goto(f"{relay.url}/")
    page.locator(f"#row-{deferred} button", has_text="Cancel").click()
    page.wait_for_load_state()
    found += violations(page)
    assert found == [], "\n".join(found)


def test_a_skip_link_is_the_first_tab_stop(page: Page, relay: BrowserRelay) -> None:
    # Settings had 12 Tab stops (the navigation) before its first field.
    sign_in(page, relay)
    page.goto(f"{relay.url}/settings")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent.trim()") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "main"
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.closest('main') !== null")
