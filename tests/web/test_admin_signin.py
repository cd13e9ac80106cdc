"""Signing in to the admin pages over HTTP: the forced change, lockout, sessions, CSRF, Origin,
redirects, Turnstile and a crowd of wrong passwords. The real app, store and a real local
Turnstile stand-in; nothing mocked (the crowd's password checks are counted, not replaced)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from relay_core import crypto
from relay_core.config import Settings
from relay_core.db import transaction
from relay_core.options import parse_option
from relay_core.store.sessions import LOGIN_FAILURE_LIMIT
from relay_web.admin.sessions import safe_next
from relay_web.app import create_app
from relay_web.state import PASSWORD_CHECKS_AT_ONCE, AppState
from admin_helpers import (ORIGIN, PASSWORD, SEED_PASSWORD, AdminClient, FakeTurnstile, admin_client,
                           admin_settings, field_error, set_password, token_in)
from support import free_port

pytestmark = pytest.mark.backends


def db(client: AdminClient) -> sqlite3.Connection:
    return sqlite3.connect(str(client.state.settings.db_path))


def test_pages_send_a_signed_out_visitor_to_the_sign_in_page(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        assert client.get("/").headers["location"] == "/login?next=/"
        assert client.get("/settings").headers["location"] == "/login?next=/settings"
        assert client.get("/settings/test-email/x", headers={"Accept": "application/json"}).status_code == 401
        page = client.get("/login").text
        assert 'for="f-username">Username</label>' in page and 'for="f-password">Password</label>' in page
        assert ">Sign in</button>" in page


def test_first_sign_in_with_the_seeded_password_forces_a_change(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        response = client.sign_in(password=SEED_PASSWORD, next_path="/settings")
        assert response.status_code == 303
        assert response.headers["location"] == "/account/password?next=/settings"
        first_cookie = client.session_cookie()
        # No other page opens before the change.
        for path in ("/", "/settings"):
            assert client.get(path).headers["location"].startswith("/account/password")
        assert client.post("/settings/smtp", {"smtp_host": "x.example"}, token_from="/account/password"
                           ).headers["location"].startswith("/account/password")
        assert client.state.store.options().smtp_host == ""

        bad = [({"current_password": SEED_PASSWORD, "new_password": "abc", "confirm_password": "abc"},
                 "new_password", "Too short"),
               ({"current_password": SEED_PASSWORD, "new_password": "long-enough-1", "confirm_password": "other-one-1"},
                "confirm_password", "do not match"),
               ({"current_password": "wrong-password", "new_password": "long-enough-1",
                 "confirm_password": "long-enough-1"}, "current_password", "not your current password"),
               ({"current_password": SEED_PASSWORD, "new_password": "change-me-on-first-login",
                 "confirm_password": "change-me-on-first-login"}, "new_password", "choose another"),
               ({"current_password": SEED_PASSWORD, "new_password": SEED_PASSWORD,
                 "confirm_password": SEED_PASSWORD}, "new_password", "choose another")]
        for fields, name, words in bad:
            response = client.post("/account/password", {**fields, "next": "/settings"}, token_from="/account/password")
            assert response.status_code == 200
            assert words in field_error(response.text, name)
            assert client.state.store.admin.get(1).must_change

        response = client.post("/account/password", {"current_password": SEED_PASSWORD, "new_password": PASSWORD,
                                                      "confirm_password": PASSWORD, "next": "/settings"},
                               token_from="/account/password")
        assert response.status_code == 303 and response.headers["location"] == "/settings"
        assert client.session_cookie() != first_cookie  # a new session id once the password is the admin's own
        assert client.get("/settings").status_code == 200
        assert not client.state.store.admin.get(1).must_change
        assert client.state.store.admin.verify("admin", PASSWORD) is not None
        assert "password changed" in client.state.store.log.audit_entries()[0].detail


def test_a_well_known_password_forces_a_change_even_when_not_flagged(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        client.state.store.admin.set_password("admin", "change-me-on-first-login")  # must_change off
        response = client.sign_in(password="change-me-on-first-login")
        assert response.headers["location"] == "/account/password?next=/"
        assert client.state.store.admin.get(1).must_change


def test_five_failures_a_minute_lock_the_account_across_processes(tmp_path: Path) -> None:
    settings = admin_settings(tmp_path, RELAY_TRUSTED_PROXIES="198.51.100.20")
    with admin_client(settings, sign_in=False) as client:
        set_password(client)
        for attempt in range(4):
            response = client.sign_in(password=f"wrong-{attempt}")
            assert response.status_code == 200 and "Wrong username or password." in response.text
            assert 'value="admin"' in response.text  # the username typed is kept
        response = client.sign_in(password="wrong-4")
        assert response.status_code == 200
        assert "Too many failed sign-ins" in response.text and "locked for" in response.text
        # Now even the right password is refused, from this IP...
        assert client.sign_in().status_code == 200
        # ...and for this account from anywhere, in another web process on the same data directory.
        with TestClient(create_app(settings), base_url=ORIGIN, client=("198.51.100.20", 1)) as raw:
            other = AdminClient(raw)
            response = other.post("/login", {"username": "admin", "password": PASSWORD, "next": "/"},
                                  token_from="/login", **{"X-Forwarded-For": "203.0.113.99"})
            assert response.status_code == 200 and "Too many failed sign-ins" in response.text
        # A minute later the lock opens.
        with db(client) as conn:
            conn.execute("UPDATE login_failures SET ts = ts - 61")
        assert client.sign_in().status_code == 303


def test_five_failures_from_one_ip_lock_that_ip(tmp_path: Path) -> None:
    settings = admin_settings(tmp_path, RELAY_TRUSTED_PROXIES="198.51.100.20")
    with admin_client(settings, sign_in=False) as client:
        set_password(client)
        attacker = {"X-Forwarded-For": "203.0.113.66"}
        for attempt in range(5):
            response = client.post("/login", {"username": f"guess{attempt}", "password": "x", "next": "/"},
                                   token_from="/login", **attacker)
        assert response.status_code == 200
        response = client.post("/login", {"username": "admin", "password": PASSWORD, "next": "/"},
                               token_from="/login", **attacker)
        assert response.status_code == 200
        # The admin, from elsewhere, is not locked out by someone else's guesses at other names.
        response = client.post("/login", {"username": "admin", "password": PASSWORD, "next": "/"},
                               token_from="/login", **{"X-Forwarded-For": "192.0.2.10"})
        assert response.status_code == 303


def test_a_new_session_id_at_every_sign_in_and_the_old_one_dies(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        first = client.session_cookie()
        assert first
        # Sign in again from a sign-in page opened in this browser, the old session cookie still held.
        client.client.cookies.delete("relay_session")
        token = client.token("/login")
        client.replay_session_cookie(first)
        response = client.post("/login", {"username": "admin", "password": PASSWORD, "next": "/"}, token=token)
        second = client.session_cookie()
        assert response.status_code == 303 and second and second != first
        client.replay_session_cookie(first)
        assert client.get("/settings").headers["location"] == "/login?next=/settings"
        with db(client) as conn:
            stored = [row[0] for row in conn.execute("SELECT id_hash FROM admin_sessions")]
        assert len(stored) == 1
        raw_id = second.split(".")[0]
        assert stored == [hashlib.sha256(raw_id.encode()).hexdigest()]  # the id itself is not stored


def test_the_session_cookie_is_httponly_lax_and_secure_unless_told(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        cookie = client.sign_in().headers["set-cookie"]
        assert "relay_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Secure" not in cookie.split("relay_login")[0]
    secure = admin_settings(tmp_path / "secure")
    secure = type(secure)(**{**secure.__dict__, "insecure_cookies": False})
    with TestClient(create_app(secure), base_url="https://testserver") as raw:
        client = AdminClient(raw)
        set_password(client)
        response = client.post("/login", {"username": "admin", "password": PASSWORD, "next": "/"},
                               token_from="/login", origin="https://testserver")
        assert response.status_code == 303
        assert "Secure" in response.headers["set-cookie"].split("relay_login")[0]


def test_an_idle_session_expires(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        client.state.store.set_options({"session_idle_minutes": parse_option("session_idle_minutes", "5")})
        assert client.get("/settings").status_code == 200
        with db(client) as conn:
            conn.execute("UPDATE admin_sessions SET last_seen = last_seen - 4 * 60")
        assert client.get("/settings").status_code == 200  # 4 minutes idle: still signed in
        with db(client) as conn:
            conn.execute("UPDATE admin_sessions SET last_seen = last_seen - 6 * 60")
        assert client.get("/settings").headers["location"] == "/login?next=/settings"
        with db(client) as conn:
            assert conn.execute("SELECT COUNT(*) FROM admin_sessions").fetchone()[0] == 0


def test_an_automatic_refresh_does_not_keep_a_session_alive(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        with db(client) as conn:
            conn.execute("UPDATE admin_sessions SET last_seen = last_seen - 120")
            before = conn.execute("SELECT last_seen FROM admin_sessions").fetchone()[0]
        assert client.get("/", headers={"X-Auto-Refresh": "1"}).status_code == 200
        with db(client) as conn:
            assert conn.execute("SELECT last_seen FROM admin_sessions").fetchone()[0] == before
        assert client.get("/").status_code == 200
        with db(client) as conn:
            assert conn.execute("SELECT last_seen FROM admin_sessions").fetchone()[0] > before


def test_sign_out_makes_a_replayed_cookie_useless(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        cookie = client.session_cookie()
        token = client.token()
        response = client.post("/logout", token=token)
        assert response.status_code == 303 and response.headers["location"] == "/login?notice=signed_out"
        assert "You are signed out." in client.client.get(response.headers["location"]).text
        client.replay_session_cookie(cookie)
        assert client.get("/settings").headers["location"] == "/login?next=/settings"
        response = client.post("/settings/smtp", {"smtp_host": "evil.example", "smtp_port": "25"}, token=token)
        assert response.headers["location"].startswith("/login")
        assert client.state.store.options().smtp_host == ""
        assert [e.action for e in client.state.store.log.audit_entries()][:2] == ["admin.signout", "admin.signin"]


SMTP_FORM = {"smtp_host": "mail.example.org", "smtp_port": "587", "smtp_security": "starttls", "smtp_username": "",
             "default_from": "", "default_from_name": "", "allowed_from": "", "max_attach_mb": "25"}


CSRF_CASES = ["no token", "wrong token", "token of another session", "foreign origin", "foreign referer",
              "null origin", "no origin or referer"]


def test_csrf_and_origin_failures_are_refused_and_change_nothing(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path / "other")) as other:
        foreign_token = other.token()
    with admin_client(admin_settings(tmp_path)) as client:
        for case in CSRF_CASES:
            token: str | None = client.token()
            origin: str | None = ORIGIN
            headers: dict[str, str] = {}
            if case == "no token":
                token = None
            elif case == "wrong token":
                token = "0" * 64
            elif case == "token of another session":
                token = foreign_token
            elif case == "foreign origin":
                origin = "https://evil.example"
            elif case == "foreign referer":
                origin, headers = None, {"Referer": "https://evil.example/settings"}
            elif case == "null origin":
                origin = "null"
            else:
                origin = None
            audit_before = len(client.state.store.log.audit_entries())
            response = client.post("/settings/smtp", SMTP_FORM, token=token, origin=origin, **headers)
            assert response.status_code == 403, case
            assert "nothing changed" in response.text and "<h1>" in response.text  # the 403 page
            assert client.state.store.options().smtp_host == ""
            assert len(client.state.store.log.audit_entries()) == audit_before
            # Sign-out is state-changing too.
            response = client.post("/logout", token=token, origin=origin, **headers)
            assert response.status_code == 403 and client.get("/settings").status_code == 200, case


def test_a_same_origin_referer_stands_in_for_a_missing_origin(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        response = client.post("/settings/smtp", SMTP_FORM, origin=None, Referer=f"{ORIGIN}/settings")
        assert response.status_code == 303
        assert client.state.store.options().smtp_host == "mail.example.org"


def test_the_sign_in_form_needs_its_token_and_our_origin(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        fields = {"username": "admin", "password": PASSWORD, "next": "/"}
        assert client.post("/login", fields, token=None).status_code == 403
        assert client.post("/login", fields, token="x" * 64).status_code == 403
        assert client.post("/login", fields, token_from="/login", origin="https://evil.example").status_code == 403
        assert client.session_cookie() is None
        assert client.post("/login", fields, token_from="/login").status_code == 303


OFFSITE = ["//evil.example/", "/\\evil.example", "https://evil.example/x", "javascript:alert(1)",
           "\\\\evil.example", "/\t/evil.example", "http:/evil.example", "evil.example", "/\n/evil.example"]


def test_next_never_leaves_the_site(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        for target in OFFSITE[:3]:  # through the sign-in form (each costs a password check)...
            client.client.cookies.delete("relay_session")
            assert client.sign_in(next_path=target).headers["location"] == "/", target
        for target in OFFSITE:  # ...and all of them through the signed-in visit to /login
            assert safe_next(target) == "/", target
            assert client.get("/login", params={"next": target}).headers["location"] == "/", target
        client.client.cookies.delete("relay_session")
        page = client.client.get("/login", params={"next": "//evil.example/"}).text
        assert 'name="next" value="/"' in page


def test_next_keeps_a_local_path(tmp_path: Path) -> None:
    assert safe_next("/settings?saved=smtp") == "/settings?saved=smtp"
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        login = client.get("/settings")
        assert login.headers["location"] == "/login?next=/settings"
        assert client.sign_in(next_path="/settings").headers["location"] == "/settings"


def test_an_scrypt_hash_from_before_is_upgraded_to_argon2id_at_sign_in(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        salt = os.urandom(16)  # the parameters every relay used before Argon2id: N=2^17, r=8, p=1
        digest = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=2**17, r=8, p=1, maxmem=129 * 2**20, dklen=32)
        weak = f"scrypt${2**17}$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
        assert crypto.needs_rehash(weak) and not crypto.needs_rehash(crypto.hash_password("x"))
        with db(client) as conn:
            conn.execute("UPDATE admins SET password_hash = ?, must_change = 0", (weak,))
        assert client.sign_in(password="not-it").status_code == 200
        with db(client) as conn:
            assert conn.execute("SELECT password_hash FROM admins").fetchone()[0] == weak  # only on success
        assert client.sign_in().status_code == 303
        with db(client) as conn:
            upgraded = conn.execute("SELECT password_hash FROM admins").fetchone()[0]
        assert upgraded.startswith("$argon2id$v=19$m=19456,t=2,p=1$") and crypto.verify_password(PASSWORD, upgraded)


# -- Turnstile ---------------------------------------------------------------------------------
def turnstile_on(client: AdminClient, url: str) -> None:
    client.state.store.set_options({
        "turnstile_site_key": parse_option("turnstile_site_key", "0x4AAAAAAA-site"),
        "turnstile_secret": parse_option("turnstile_secret", "0x4AAAAAAA-secret-value"),
        "turnstile_verify_url": parse_option("turnstile_verify_url", url),
    })


def turnstile_sign_in(client: AdminClient, token: str | None) -> object:
    fields = {"username": "admin", "password": PASSWORD, "next": "/"}
    if token is not None:
        fields["cf-turnstile-response"] = token
    return client.post("/login", fields, token_from="/login")


def test_turnstile_passes_fails_and_fails_closed(tmp_path: Path) -> None:
    with FakeTurnstile() as verifier, admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        page = client.get("/login")
        assert "challenges.cloudflare.com" not in page.headers["content-security-policy"]
        assert "cf-turnstile" not in page.text
        turnstile_on(client, verifier.url)
        page = client.get("/login")
        assert 'class="cf-turnstile" data-sitekey="0x4AAAAAAA-site"' in page.text
        assert "script-src 'self' https://challenges.cloudflare.com" in page.headers["content-security-policy"]
        assert "frame-src 'self' https://challenges.cloudflare.com" in page.headers["content-security-policy"]
        assert "challenges.cloudflare.com" not in client.get("/healthz").headers["content-security-policy"]

        response = turnstile_sign_in(client, None)
        assert response.status_code == 200 and "Complete the bot check" in response.text
        response = turnstile_sign_in(client, "fail-token")
        assert response.status_code == 200 and "did not pass" in response.text
        assert client.session_cookie() is None
        response = turnstile_sign_in(client, "error-token")
        assert response.status_code == 200 and "could not be verified" in response.text
        response = turnstile_sign_in(client, "pass-token")
        assert response.status_code == 303 and client.session_cookie()
        assert [c["response"] for c in verifier.calls] == ["fail-token", "error-token", "pass-token"]
        assert all(c["secret"] == "0x4AAAAAAA-secret-value" and c["remoteip"] == "198.51.100.20"
                   for c in verifier.calls)


def test_turnstile_unreachable_refuses_sign_in(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        turnstile_on(client, f"http://127.0.0.1:{free_port()}/siteverify")  # nothing listens there
        response = turnstile_sign_in(client, "pass-token")
        assert response.status_code == 200
        assert "could not be verified" in response.text and "sign-in is refused" in response.text
        assert client.session_cookie() is None


def test_cli_password_reset_signs_every_browser_out(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        assert client.get("/settings").status_code == 200
        client.state.store.admin.set_password("admin", "reset-by-cli-1")
        assert client.get("/settings").headers["location"].startswith("/login")


def test_login_page_token_is_tied_to_its_cookie(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        token = token_in(client.get("/login").text)
        client.client.cookies.delete("relay_login")
        response = client.post("/login", {"username": "admin", "password": PASSWORD, "next": "/"}, token=token)
        assert response.status_code == 403


ORIGIN_CASES = [
    ("relay.example.com", "https://relay.example.com", True),
    ("relay.example.com:8443", "https://relay.example.com:8443", True),
    ("relay.example.com", "https://relay.example.com:8443", True),  # nginx's Host $host drops the port
    ("relay.example.com:80", "https://relay.example.com", True),  # TLS ended at the proxy, forwarded to :80
    ("127.0.0.1:8000", "http://127.0.0.1:8000", True),
    ("[::1]:8000", "http://[::1]:8000", True),
    ("relay.example.com:8026", "http://relay.example.com:9999", False),
    ("relay.example.com", "https://evil.example", False),
    ("relay.example.com", "https://relay.example.com.evil.example", False),
    ("relay.example.com", "null", False),
    ("relay.example.com", "not a url", False),
]


def test_the_origin_check_compares_host_names_and_ports() -> None:
    from starlette.requests import Request

    from relay_web.admin.sessions import same_origin

    for host, origin, expected in ORIGIN_CASES:
        request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                           "headers": [(b"host", host.encode()), (b"origin", origin.encode())]})
        assert same_origin(request) is expected, (host, origin)


def test_sign_in_is_closed_while_the_turnstile_secret_cannot_be_read(tmp_path: Path) -> None:
    """Fail closed: without its secret Turnstile would be skipped, so nobody signs in (the CLI still works)."""
    from relay_core.config import load_settings
    from relay_core.store import transaction
    with admin_client(admin_settings(tmp_path), sign_in=False) as client:
        set_password(client)
        turnstile_on(client, "http://127.0.0.1:9/never-asked")
        store = client.state.store
        other = crypto.derive_keys(load_settings({"RELAY_SECRET_KEY": "another-secret-0123456789-abcdefghijklmn"}))
        conn = store.conn()
        with transaction(conn):  # the secret as a process given another RELAY_SECRET_KEY wrote it
            store._bump_rev(conn)
            conn.execute("UPDATE settings SET value = ? WHERE name = 'turnstile_secret'",
                         (other.encrypt_text("0x4AAAAAAA-secret-value"),))
        answer = client.sign_in()
        assert answer.status_code == 200 and "Signing in is closed" in answer.text
        assert client.session_cookie() is None


# -- a crowd at the sign-in page ------------------------------------------------------------------
class CountedChecks:
    """``crypto.verify_password`` as the relay calls it, counting the calls and the most at once."""

    def __init__(self, verify: Callable[[str, str], bool]) -> None:
        self.verify = verify
        self.calls = self.running = self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, password: str, encoded: str) -> bool:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return self.verify(password, encoded)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> CountedChecks:
    counted = CountedChecks(crypto.verify_password)
    monkeypatch.setattr(crypto, "verify_password", counted)
    return counted


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, AppState]]:
    """The app under a real uvicorn on loopback, in a thread of this process (so its checks can be counted)."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1500):  # up to ~30 s
        if server.started or not thread.is_alive():
            break
        time.sleep(0.02)
    assert server.started, "the web did not start"
    try:
        yield f"http://127.0.0.1:{port}", app.state.relay
    finally:
        server.should_exit = True
        thread.join(30)


async def crowd(url: str, passwords: list[str]) -> list[httpx.Response]:
    """A sign-in with each password, all at once, with one sign-in form's cookie and token."""
    limits = httpx.Limits(max_connections=len(passwords))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        token = token_in((await client.get("/login")).text)

        async def sign_in(password: str) -> httpx.Response:
            return await client.post("/login", data={"username": "admin", "password": password, "next": "/",
                                                     "csrf_token": token}, headers={"Origin": url})

        return list(await asyncio.gather(*(sign_in(p) for p in passwords)))


def wrong_guesses(count: int, start: int = 0) -> list[str]:
    return [f"wrong-guess-{i}" for i in range(start, start + count)]


def unlock(state: AppState) -> None:
    """A minute passes: every recorded failure falls out of the window."""
    conn = state.store.conn()
    with transaction(conn):
        conn.execute("UPDATE login_failures SET ts = ts - 61")


def test_crowds_of_wrong_passwords_are_checked_at_most_the_lockouts_worth(
        tmp_path: Path, backend_env: dict[str, str], checks: CountedChecks) -> None:
    with serving(admin_settings(tmp_path, **backend_env)) as (url, state):
        state.store.admin.set_password("admin", PASSWORD)
        answers: list[httpx.Response] = []
        for round_ in range(10):  # until locked: the gate may turn a whole crowd away but for two
            answers += asyncio.run(crowd(url, wrong_guesses(50, start=50 * round_)))
            if state.store.admin.locked_until("127.0.0.1", "admin") is not None:
                break
        assert checks.calls == LOGIN_FAILURE_LIMIT  # of all those attempts, five passwords were checked
        assert checks.most_at_once <= PASSWORD_CHECKS_AT_ONCE
        for answer in answers:
            if answer.status_code == 429:
                assert answer.headers["retry-after"] == "5" and "Too many sign-in attempts right now" in answer.text
            else:
                assert answer.status_code == 200
                assert "Wrong username or password." in answer.text or "Too many failed sign-ins" in answer.text
        # The right password, now: refused without being checked, until the lockout ends.
        (right,) = asyncio.run(crowd(url, [PASSWORD]))
        assert right.status_code == 200 and "Too many failed sign-ins" in right.text
        assert "relay_session" not in right.cookies and checks.calls == LOGIN_FAILURE_LIMIT
        unlock(state)
        assert asyncio.run(crowd(url, [PASSWORD]))[0].status_code == 303
        assert checks.calls == LOGIN_FAILURE_LIMIT + 1


def test_the_lockout_alone_bounds_the_checks_when_every_attempt_gets_a_slot(
        tmp_path: Path, backend_env: dict[str, str], checks: CountedChecks) -> None:
    """Check and record are one step: 50 attempts at once, none turned away at the gate, check 5 passwords."""
    with serving(admin_settings(tmp_path, **backend_env)) as (url, state):
        state.store.admin.set_password("admin", PASSWORD)
        state.password_checks = threading.BoundedSemaphore(50)
        answers = asyncio.run(crowd(url, wrong_guesses(50)))
        assert checks.calls == LOGIN_FAILURE_LIMIT
        assert all(a.status_code == 200 for a in answers)
        assert all("Wrong username or password." in a.text or "Too many failed sign-ins" in a.text for a in answers)
        (right,) = asyncio.run(crowd(url, [PASSWORD]))
        assert right.status_code == 200 and "Too many failed sign-ins" in right.text
        assert checks.calls == LOGIN_FAILURE_LIMIT
        unlock(state)
        assert asyncio.run(crowd(url, [PASSWORD]))[0].status_code == 303


def test_an_attempt_beyond_the_running_checks_is_refused_at_once(
        tmp_path: Path, backend_env: dict[str, str], checks: CountedChecks, caplog: pytest.LogCaptureFixture) -> None:
    with admin_client(admin_settings(tmp_path, **backend_env), sign_in=False) as client:
        set_password(client)
        gate = client.state.password_checks
        for _ in range(PASSWORD_CHECKS_AT_ONCE):  # every slot taken, as by checks still running
            assert gate.acquire(blocking=False)
        with caplog.at_level(logging.WARNING, logger="relay.web"):
            response = client.sign_in()
        assert response.status_code == 429 and response.headers["retry-after"] == "5"
        assert "Too many sign-in attempts right now; try again in a few seconds." in response.text
        assert 'value="admin"' in response.text and client.session_cookie() is None
        refused = [r for r in caplog.records if r.name == "relay.web"]
        assert len(refused) == 1 and "refused" in refused[0].getMessage() and refused[0].exc_info is None
        assert checks.calls == 0 and client.state.store.admin.locked_until("198.51.100.20", "admin") is None
        conn = client.state.store.conn()
        assert conn.execute("SELECT COUNT(*) FROM login_failures").fetchone()[0] == 0  # nothing counted
        gate.release()  # one slot free: just under the limit
        assert client.sign_in(username="nobody").status_code == 200 and checks.calls == 1  # same cost, no oracle
        assert client.sign_in().status_code == 303 and checks.calls == 2
        # The account card's current password goes through the same slots.
        fields = {"username": "admin", "current_password": PASSWORD, "new_password": "", "confirm_password": ""}
        assert gate.acquire(blocking=False)
        response = client.post("/settings/account", fields)
        assert response.status_code == 200 and "Too many sign-in attempts right now" in response.text
        assert checks.calls == 2
        gate.release()
        gate.release()
        assert client.post("/settings/account", fields).headers["location"] == "/settings?saved=account#account"
        assert checks.calls == 3


def test_signing_in_over_plain_http_with_secure_cookies_names_the_cause(tmp_path: Path) -> None:
    # The guide's LAN test (http://relay.lan:8000): the browser keeps the Secure sign-in cookie to itself
    # over plain HTTP, and the refusal used to blame an expired form.
    with admin_client(admin_settings(tmp_path, RELAY_INSECURE_COOKIES="0"), sign_in=False) as client:
        page = client.client.get("/login")
        assert "secure" in page.headers["set-cookie"].lower()
        response = client.client.post("/login", data={"username": "admin", "password": "x",
                                                       "csrf_token": token_in(page.text)},
                                      headers={"Origin": ORIGIN})
        assert response.status_code == 403
        text = html.unescape(response.text)
        assert "RELAY_INSECURE_COOKIES=1" in text and "HTTPS" in text and "Secure" in text
        assert "has expired" not in text
