"""Every state-changing form of the admin pages refuses a forged post and changes nothing.

The forms are enumerated from the application's own route table, so a new
POST route fails here until it is given a genuine form below. Each is posted
four ways a forger could (no CSRF token, a wrong one, a foreign Origin, no
Origin or Referer at all): each gets the 403 page and the whole database
(every table, every row) and the queue stay exactly as they were. Then the
same form is posted genuinely and must do its work, so the refusals above are
the checks' doing and not a form the endpoint would have refused anyway.

(The sign-in form, which has no session yet, is checked in test_admin_signin.py.)
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from starlette.routing import Route

from admin_helpers import ORIGIN, PASSWORD, AdminClient, admin_client, admin_settings
from relay_core.options import parse_option
from relay_core.store import ClaimedMessage, LogEntry
from support import free_port

# Columns a refused request may still move: reading a session marks it as seen.
MAY_MOVE = {"admin_sessions": {"last_seen"}}
FORGERIES = ["no token", "wrong token", "foreign origin", "no origin or referer"]
CHECKED_ELSEWHERE = {"/login": "test_admin_signin.py::test_the_sign_in_form_needs_its_token_and_our_origin"}
NEW_PASSWORD = "a-new-Password-9"


def database(client: AdminClient) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (the columns of MAY_MOVE left out), to compare before and after."""
    with sqlite3.connect(str(client.state.settings.db_path)) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        dump = {}
        for table in tables:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")
                       if row[1] not in MAY_MOVE.get(table, set())]
            dump[table] = sorted(conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall(), key=repr)
    return dump


def everything(client: AdminClient) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    client.state.intake.submit(lambda conn: (None, [])).result(10)  # earlier 202s' wake-ups are enqueued
    return database(client), int(client.state.queue.pending())


@dataclass
class Form:
    """A genuine post to one route, and what doing it for real shows."""

    path: str
    fields: dict[str, str]
    done: Callable[[AdminClient, Any], bool]
    token_from: str = "/settings"
    extra: dict[str, str] = field(default_factory=dict)


class Relay:
    """The app with SMTP set, a deferred message, and a named key to act on."""

    def __init__(self, client: AdminClient) -> None:
        self.client = client
        store = client.state.store
        store.set_options({k: parse_option(k, v) for k, v in {
            "smtp_host": "127.0.0.1", "smtp_port": str(free_port()), "smtp_security": "none",
            "default_from": "noreply@example.org"}.items()})
        key = store.api_keys.reveal()
        response = client.client.post("/api/send", headers={"Authorization": f"Bearer {key}"}, json={
            "from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": "Hello", "text": "body"})
        assert response.status_code == 202, response.text
        self.message_id = str(response.json()["id"])
        claimed = store.messages.claim(self.message_id, "w1", 300)
        assert isinstance(claimed, ClaimedMessage)
        assert store.messages.record_attempt(claimed, "deferred", next_attempt_at=4e9, last_error="connect: refused",
                                             recipient_updates={r.position: ("deferred", None, "refused")
                                                       for r in claimed.recipients},
                                    entry=LogEntry("attempt", "deferred", message_id=self.message_id,
                                                   stage="connect", detail="refused"))
        self.key_id, _ = store.api_keys.add("partner", None, "")

    def status(self) -> str:
        record = self.client.state.store.messages.record(self.message_id)
        assert record is not None
        return record.status

    def audited(self, action: str) -> bool:
        return any(e.action == action for e in self.client.state.store.log.audit_entries(limit=200))

    def key(self) -> Any:
        return next(k for k in self.client.state.store.api_keys.all() if k.id == self.key_id)

    def forms(self) -> list[Form]:
        """In an order where each genuine post leaves the next one something to do."""
        store = self.client.state.store
        primary = next(k.id for k in store.api_keys.all() if k.is_primary and k.revoked_at is None)
        smtp = {"smtp_host": "mail.example.org", "smtp_port": "2525", "smtp_security": "none", "smtp_username": "",
                "default_from": "noreply@example.org", "default_from_name": "Portal", "allowed_from": "",
                "max_attach_mb": "25"}
        return [
            Form("/queue/retry", {"ids": self.message_id}, lambda c, r: self.status() == "queued"),
            Form("/queue/pause", {}, lambda c, r: store.options().delivery_paused),
            Form("/queue/resume", {}, lambda c, r: not store.options().delivery_paused),
            Form("/queue/cancel", {"ids": self.message_id, "confirmed": "yes"},
                 lambda c, r: self.status() == "cancelled"),
            Form("/messages/{message_id}/body", {}, lambda c, r: self.audited("message.body_viewed")),
            Form("/settings/smtp/test", {**smtp, "smtp_host": "127.0.0.1", "smtp_port": str(free_port())},
                 lambda c, r: "The connection test failed: connect" in r.text),
            # (No Microsoft 365 app is set up: the genuine post gets as far as saying so.)
            Form("/settings/oauth/microsoft", {},
                 lambda c, r: "Microsoft 365 could not be connected: Microsoft 365 needs oauth_tenant" in r.text),
            Form("/settings/smtp", smtp, lambda c, r: store.options().smtp_host == "mail.example.org"),
            Form("/settings/delivery", {"retry_base_seconds": "30", "retry_max_seconds": "600", "max_age_hours": "12",
                                        "max_per_minute": "0", "max_per_hour": "100", "max_per_day": "0",
                                        "send_per_hour": "", "bad_key_per_minute": "100"},
                 lambda c, r: store.options().max_per_hour == 100),
            Form("/settings/signin", {"turnstile_site_key": "", "session_idle_minutes": "45"},
                 lambda c, r: store.options().session_idle_minutes == 45),
            Form("/settings/test-email", {"test_to": "me@example.org"}, lambda c, r: self.audited("test_email")),
            Form("/settings/api-keys", {"label": "portal-2026"},
                 lambda c, r: any(k.label == "portal-2026" for k in store.api_keys.all())),
            Form("/settings/api-keys/{key_id:int}/limits", {"per_hour": "7", "allowed_from": "example.org"},
                 lambda c, r: self.key().per_hour == 7),
            Form("/settings/api-keys/{key_id:int}/reveal", {}, lambda c, r: self.audited("api_key.reveal")),
            Form("/settings/api-keys/{key_id:int}/revoke", {"confirmed": "yes"},
                 lambda c, r: self.key().revoked_at is not None),
            Form("/settings/api-keys/new", {"confirmed": "yes"},
                 lambda c, r: not any(k.id == primary and k.revoked_at is None for k in store.api_keys.all())),
            Form("/settings/account", {"username": "treasurer", "current_password": PASSWORD, "new_password": "",
                                       "confirm_password": ""},
                 lambda c, r: self.audited("admin.account")),
            Form("/account/password", {"current_password": PASSWORD, "new_password": NEW_PASSWORD,
                                       "confirm_password": NEW_PASSWORD, "next": "/"},
                 lambda c, r: c.state.store.admin.verify("treasurer", NEW_PASSWORD) is not None,
                 token_from="/account/password"),
            Form("/logs/clear", {"confirmed": "yes"}, lambda c, r: self.audited("log.clear")),
            Form("/logout", {}, lambda c, r: c.get("/settings").status_code == 303, token_from="/"),
        ]


def forge(client: AdminClient, form: Form, path: str, how: str) -> Any:
    token = client.token(form.token_from)  # fetched first: a GET is allowed to touch the session
    kwargs: dict[str, Any] = {"token": token, "origin": ORIGIN}
    if how == "no token":
        kwargs["token"] = None
    elif how == "wrong token":
        kwargs["token"] = "0" * 64
    elif how == "foreign origin":
        kwargs["origin"] = "https://evil.example"
    else:
        kwargs["origin"] = None
    before = everything(client)
    response = client.post(path, form.fields, **kwargs)
    return response, before, everything(client)


def test_every_form_refuses_forged_posts_and_changes_nothing(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        relay = Relay(client)
        forms = relay.forms()
        posts = {route.path for route in client.client.app.routes  # type: ignore[attr-defined]
                 if isinstance(route, Route) and "POST" in (route.methods or set())
                 and not route.path.startswith("/api/")}  # the API takes a Bearer key, never a cookie
        assert posts == {f.path for f in forms} | set(CHECKED_ELSEWHERE), \
            "a POST route without a genuine form here (or one gone): teach this test"
        for form in forms:
            path = form.path.replace("{message_id}", relay.message_id).replace("{key_id:int}", str(relay.key_id))
            for how in FORGERIES:
                response, before, after = forge(client, form, path, how)
                assert response.status_code == 403, (path, how, response.status_code)
                assert "nothing changed" in response.text, (path, how)
                assert "tsr_" not in response.text, (path, how)  # a forged Reveal shows no key
                changed = {t for t in before[0] if before[0][t] != after[0][t]}
                assert not changed and before[1] == after[1], (path, how, changed, before[1], after[1])
            response = client.post(path, form.fields, token_from=form.token_from)
            assert response.status_code in (200, 303), (path, response.status_code, response.text[:300])
            assert form.done(client, response), f"the genuine post to {path} did not do its work"
