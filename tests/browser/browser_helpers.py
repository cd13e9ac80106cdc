"""Helpers for the browser tests: the relay process they drive and the sign-in form."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page

from support import RelayProcess, cli, free_port, initialise_store, relay_env

SEED_PASSWORD = "first-boot-Seed-1"
ADMIN_PASSWORD = "volunteer-Pass-2"


class BrowserRelay:
    """`tspro-relay run` in a temp directory, with helpers for what the browser tests check."""

    def __init__(self, cwd: Path, password: str | None, **env: str) -> None:
        self.cwd = cwd
        self.env = relay_env(cwd / "data", RELAY_ADMIN_PASSWORD=SEED_PASSWORD, RELAY_INSECURE_COOKIES="1", **env)
        if password is not None:  # as `tspro-relay admin set-password` would (tests/cli/test_configure.py runs it)
            initialise_store(self.env, admin_password=password)
        self.process = RelayProcess("run", self.env, cwd, port=free_port())

    @property
    def url(self) -> str:
        return self.process.url

    def configure(self, *pairs: str) -> None:
        cli(self.env, "config", "set", *pairs, cwd=self.cwd)

    def key(self) -> str:
        return cli(self.env, "api-key", "show", cwd=self.cwd).stdout.strip()

    def start(self) -> "BrowserRelay":
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()


def sign_in(page: Page, relay: BrowserRelay, password: str = ADMIN_PASSWORD, username: str = "admin") -> None:
    if "/login" not in page.url:
        page.goto(f"{relay.url}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


# Every input, select and textarea a person can see must have a label they can see.
_UNLABELLED = """
() => Array.from(document.querySelectorAll("input:not([type=hidden]), select, textarea"))
  .filter(el => !Array.from(el.labels || []).some(l => l.textContent.trim() && l.getClientRects().length))
  .map(el => el.id || el.name || el.outerHTML.slice(0, 80))
"""


def unlabelled_inputs(page: Page) -> list[str]:
    """The fields on the page without a visible label (an empty list is what a page should give)."""
    return list(page.evaluate(_UNLABELLED))
