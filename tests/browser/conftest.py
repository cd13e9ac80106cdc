"""Browser fixtures: Debian's chromium through Playwright, against a real `tspro-relay run`.

- ``browser``: one headless chromium per test module (never a downloaded one).
- ``open_page(**context_options)``: a fresh context and page per call; every
  page it opens is watched. A console error, an uncaught page error or a CSP
  violation anywhere FAILS the test at teardown (the violations are reported
  by a ``securitypolicyviolation`` listener injected before any page script).
  A screenshot of every page visited is saved under
  ``tests/browser/artifacts/<test name>/`` (git-ignored; the path is printed
  at the end of the run): each page is shot as it was when the browser left
  it (a route holds the next document request until the shot is taken), and
  the pages still open at the end are shot then. ``page`` is ``open_page()``;
  ``watch`` is what the test's pages reported so far.
- ``relay``: a running `tspro-relay run` (web + worker) on a free port, with a
  temp data directory and RELAY_INSECURE_COOKIES=1 (plain http), trusting
  the test CA (SSL_CERT_FILE); its admin password is already the admin's
  own, so no forced change. ``fresh_relay``
  is the same with the seeded first-boot password untouched.
- ``browser_helpers``: ``BrowserRelay`` and ``sign_in(page, relay)``.
"""

from __future__ import annotations

import base64
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, CDPSession, ConsoleMessage, Page, Route, sync_playwright

from browser_helpers import ADMIN_PASSWORD, BrowserRelay
from support import Certificates

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Injected into every page before its own scripts: CSP violations become console errors.
CSP_LISTENER = """
document.addEventListener("securitypolicyviolation", function (e) {
  console.error("CSP violation: " + e.violatedDirective + " blocked " + (e.blockedURI || "inline") +
                " at " + e.sourceFile + ":" + e.lineNumber);
});
"""


_SHOTS = pytest.StashKey[list]()


@dataclass
class Watch:
    """What went wrong in a test's pages, and the screenshots taken."""

    directory: Path
    problems: list[str] = field(default_factory=list)
    shots: list[Path] = field(default_factory=list)
    taken: int = 0

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text} ({message.location.get('url', '')})")

    def page_error(self, error: Exception) -> None:
        self.problems.append(f"page error: {error}")

    def screenshot(self, page: Page, cdp: CDPSession) -> None:
        """The whole page as it is now, in one DevTools call: Playwright's own ``page.screenshot``
        (several calls, and a wait for navigations) would hang while a navigation is held."""
        if page.is_closed() or not page.url.startswith("http"):
            return  # about:blank before the first visit, or nothing left to shoot
        self.taken += 1
        slug = re.sub(r"[^A-Za-z0-9]+", "-", page.url.split("://", 1)[-1].split("/", 1)[-1]).strip("-")[:50]
        path = self.directory / f"{self.taken:02d}-{slug or 'root'}.png"
        try:
            shot = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        except Exception as exc:
            if "0 width" not in str(exc):
                raise
            # A document not laid out yet (it has just arrived) has no size beyond the viewport.
            shot = cdp.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))
        self.shots.append(path)

    def leaving(self, page: Page, cdp: CDPSession, route: Route) -> None:
        """A request of ``page``: when it is the next document of the page, shoot the page it leaves.

        The browser keeps showing the old page until the route continues, so the shot is that page's
        last state, whatever the test does next (a listener on "load" shot too late, racing the
        test's next step, and several pages came out as the same later one).
        """
        request = route.request
        try:
            if request.is_navigation_request() and request.frame == page.main_frame:
                self.shoot(page, cdp)
        finally:
            route.continue_()

    def shoot(self, page: Page, cdp: CDPSession) -> None:
        try:
            self.screenshot(page, cdp)
        except Exception as exc:  # a page that cannot be shot is reported, not skipped in silence
            if not page.is_closed():
                self.problems.append(f"no screenshot of {page.url}: {exc}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One chromium per test module. Not per session: while Playwright's sync API runs, its event loop
    stays current in the main thread, and every later test that calls ``asyncio.run`` fails."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Pages:
    """The contexts a test opened; closed before any fixture is torn down (the relay included),
    so that nothing a page does after the test (an automatic refresh) hits a stopped server."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.contexts: list[BrowserContext] = []
        self.cdp: dict[Page, CDPSession] = {}
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for context in self.contexts:
            for page in context.pages:
                if page in self.cdp:  # a page the test opened (not a popup)
                    page.unroute("**/*")  # nothing more is shot on the way out
                    self.watch.shoot(page, self.cdp[page])  # the last state, whatever happened
            context.close()


_PAGES = pytest.StashKey[Pages]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    pages = item.stash.get(_PAGES, None)
    if pages is not None:
        pages.close()


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[..., Page]]:
    directory = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    watch = Watch(directory)
    pages = request.node.stash[_PAGES] = Pages(watch)

    def opener(**context_options: Any) -> Page:
        context = browser.new_context(**context_options)
        context.add_init_script(CSP_LISTENER)
        pages.contexts.append(context)
        page = context.new_page()
        page.on("console", watch.console)
        page.on("pageerror", watch.page_error)
        cdp = pages.cdp[page] = context.new_cdp_session(page)
        page.route("**/*", lambda route: watch.leaving(page, cdp, route))
        page.on("dialog", lambda dialog: dialog.accept())  # confirm(): tests that open one mean it
        page.set_default_timeout(15_000)
        return page

    yield opener
    pages.close()
    request.config.stash.setdefault(_SHOTS, []).extend(watch.shots)
    if watch.problems:
        pytest.fail("the browser reported problems:\n  " + "\n  ".join(watch.problems), pytrace=False)


@pytest.fixture
def page(open_page: Callable[..., Page]) -> Page:
    return open_page()


@pytest.fixture
def watch(open_page: Callable[..., Page], request: pytest.FixtureRequest) -> Watch:
    """What this test's pages reported so far (a test of the watch itself reads and clears it)."""
    return request.node.stash[_PAGES].watch


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    shots = config.stash.get(_SHOTS, [])
    if shots:
        terminalreporter.write_line(f"browser screenshots: {len(shots)} under {ARTIFACTS}")


# -- the relay ------------------------------------------------------------------------------------
@pytest.fixture
def relay(tmp_path: Path, certs: Certificates) -> Iterator[BrowserRelay]:
    running = BrowserRelay(tmp_path, ADMIN_PASSWORD, SSL_CERT_FILE=str(certs.ca_file)).start()
    yield running
    running.stop()


@pytest.fixture
def fresh_relay(tmp_path: Path, certs: Certificates) -> Iterator[BrowserRelay]:
    running = BrowserRelay(tmp_path, None, SSL_CERT_FILE=str(certs.ca_file)).start()
    yield running
    running.stop()
