"""The admin pages' markup keeps the promises the Content-Security-Policy relies on.

No inline script, no style element or attribute, no event-handler attribute,
no javascript: URL: all behaviour is in static/app.js and all looks in
static/app.css (the CSP would block the rest, and the browser tests fail on
any violation; this finds it in every page, not only the ones a browser test
happens to open). Icons come from one partial, templates/_icons.html: the
only other drawing is the hourly chart. Checked twice: in the template files,
and in every page as the app renders it (signed out, forced to change the
password, signed in, with errors, a revealed key and a confirmation page), so
markup built in Python is caught too.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from admin_helpers import SEED_PASSWORD, AdminClient, admin_client, admin_settings
from relay_core.options import parse_option
from relay_core.resources import templates_dir

ICON_PARTIAL = "_icons.html"
CHART_PARTIAL = "_chart.html"


class Markup(HTMLParser):
    """What a page holds that the CSP forbids or the icon rule excludes."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.icons = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...>: an event handler attribute")
            if name == "style":
                self.problems.append(f"<{tag} style=...>: a style attribute")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().lower().startswith(
                    "javascript:"):
                self.problems.append(f"<{tag} {name}={value}>: a javascript: URL")
        if tag == "style":
            self.problems.append("a <style> element")
        if tag == "script":
            if not names.get("src"):
                self.problems.append("an inline <script>")
            self._in_script = True
        if tag == "svg":
            css = (names.get("class") or "").split()
            if "icon" in css:
                self.icons += 1
            elif "chart-svg" not in css:
                self.problems.append(f"an <svg> that is neither an icon of {ICON_PARTIAL} nor the chart: {attrs}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("a <script> with a body")


def problems_in(page: str) -> tuple[list[str], int]:
    parser = Markup()
    parser.feed(page)
    parser.close()
    return parser.problems, parser.icons


def test_the_templates_hold_no_inline_script_style_or_handlers() -> None:
    templates = sorted(templates_dir().rglob("*.html"))
    assert len(templates) >= 10, templates
    for template in templates:
        text = re.sub(r"\{#.*?#\}", "", template.read_text(), flags=re.S)  # Jinja comments may say anything
        name = template.name
        assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", text), f"{name}: an inline <script>"
        assert not re.search(r"<style[\s>]", text), f"{name}: a <style> element"
        assert not re.search(r"\sstyle\s*=", text), f"{name}: a style attribute"
        assert not re.search(r"\son[a-z]+\s*=", text), f"{name}: an event handler attribute"
        assert "javascript:" not in text.lower(), f"{name}: a javascript: URL"
        if name not in (ICON_PARTIAL, CHART_PARTIAL):
            assert "<svg" not in text and "<path" not in text, f"{name}: draws its own icon (use {ICON_PARTIAL})"


def check(client: AdminClient, path: str, page: str, expect_icons: bool = True) -> None:
    problems, icons = problems_in(page)
    assert problems == [], f"{path}: {problems}"
    if expect_icons:
        assert icons > 0, f"{path}: no icon from {ICON_PARTIAL} (is the page what was meant?)"


def test_every_page_as_rendered_keeps_to_the_rules(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path / "seeded"), sign_in=False) as fresh:
        page = fresh.get("/login").text
        check(fresh, "/login", page, expect_icons=False)
        assert 'name="csrf_token"' in page
        response = fresh.sign_in(password=SEED_PASSWORD)
        forced = fresh.client.get(response.headers["location"]).text
        assert "Choose your own password" in forced
        check(fresh, "/account/password", forced, expect_icons=False)

    with admin_client(admin_settings(tmp_path / "relay")) as client:
        store = client.state.store
        store.set_options({k: parse_option(k, v) for k, v in {
            "smtp_host": "127.0.0.1", "default_from": "noreply@example.org",
            "turnstile_site_key": "0x4AAA-site", "turnstile_secret": "0x4AAA-secret"}.items()})
        key = store.api_keys.reveal()
        sent = client.client.post("/api/send", headers={"Authorization": f"Bearer {key}"}, json={
            "from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": "<b>Hi</b>",
            "text": "body", "html": '<p style="color:red" onclick="x()">hi</p><script>alert(1)</script>'})
        message_id = sent.json()["id"]
        client.client.post("/api/send", headers={"Authorization": "Bearer tsr_wrong"}, json={})

        pages = {path: client.get(path).text for path in (
            "/", "/logs", "/logs?status=exploded", f"/messages/{message_id}", "/settings", "/no/such/page",
            "/messages/0000nosuchmessage")}
        revealed = client.post(f"/settings/api-keys/{store.api_keys.all()[0].id}/reveal")
        pages["/settings (a key revealed)"] = client.get(revealed.headers["location"]).text
        assert key in pages["/settings (a key revealed)"]
        tested = client.post("/settings/test-email", {"test_to": "me@example.org"})
        pages["/settings (a test email)"] = client.get(tested.headers["location"]).text
        pages["/settings (errors)"] = client.post("/settings/smtp", {"smtp_port": "abc"}).text
        shown = client.post(f"/messages/{message_id}/body")
        pages["/messages/id (the body shown)"] = client.get(shown.headers["location"]).text
        assert "alert(1)" in pages["/messages/id (the body shown)"]  # shown as text, escaped
        pages["confirm page"] = client.post("/logs/clear").text
        assert "Please confirm" in pages["confirm page"]
        for path, page in pages.items():
            check(client, path, page, expect_icons=not path.startswith(("/no/", "/messages/0000")))
        # With Turnstile on, the sign-in page loads Cloudflare's script by its URL, nothing inline.
        client.client.cookies.clear()
        login = client.get("/login").text
        check(client, "/login (Turnstile on)", login, expect_icons=False)
        assert re.search(r'<script src="https://challenges\.cloudflare\.com/[^"]+"', login)
