"""Driving the admin pages over HTTP (Starlette's TestClient on the real app, nothing mocked)."""

from __future__ import annotations

import html
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
from starlette.testclient import TestClient

from relay_core.config import Settings, load_settings
from relay_web.app import create_app
from support import SECRET

ORIGIN = "http://testserver"
SEED_PASSWORD = "admin-pass-123"
PASSWORD = "correct-horse-42"
_TOKEN = re.compile(r'name="csrf_token" value="([^"]*)"')


def admin_settings(tmp_path: Path, **env: str) -> Settings:
    return load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "data"),
                          "RELAY_ADMIN_PASSWORD": SEED_PASSWORD, "RELAY_INSECURE_COOKIES": "1", **env})


def token_in(page: str) -> str:
    match = _TOKEN.search(page)
    assert match, "no CSRF token on the page"
    return html.unescape(match.group(1))


def field_error(page: str, name: str) -> str:
    """The message shown next to field ``name`` (its ``f-<name>-error`` paragraph)."""
    match = re.search(rf'id="f-{re.escape(name)}-error">([^<]*)<', page)
    assert match, f"no error shown next to {name}"
    return html.unescape(match.group(1))


def field_value(page: str, name: str) -> str:
    match = re.search(rf'<input id="f-{re.escape(name)}" name="{re.escape(name)}" type="[a-z]+" value="([^"]*)"', page)
    assert match, f"no input {name} with a value"
    return html.unescape(match.group(1))


class AdminClient:
    """A browser-like client: keeps cookies, sends Origin on posts, finds CSRF tokens."""

    def __init__(self, client: TestClient, origin: str = ORIGIN) -> None:
        self.client = client
        self.origin = origin  # what the browser sends as Origin on its posts

    @property
    def state(self) -> Any:
        return self.client.app.state.relay  # type: ignore[attr-defined]

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, follow_redirects=False, **kwargs)

    def token(self, path: str = "/settings") -> str:
        response = self.client.get(path)
        return token_in(response.text)

    def post(self, path: str, data: dict[str, str] | None = None, token: str | None = "auto",
             origin: str | None = "", token_from: str = "/settings", **headers: str) -> httpx.Response:
        fields = dict(data or {})
        if token == "auto":
            fields["csrf_token"] = self.token(token_from)
        elif token is not None:
            fields["csrf_token"] = token
        if origin is not None:
            headers.setdefault("Origin", origin or self.origin)
        return self.client.post(path, data=fields, headers=headers, follow_redirects=False)

    def sign_in(self, username: str = "admin", password: str = PASSWORD, next_path: str = "/") -> httpx.Response:
        return self.post("/login", {"username": username, "password": password, "next": next_path},
                         token_from="/login")

    def replay_session_cookie(self, value: str) -> None:
        """Put back a session cookie the browser held earlier (as an attacker replaying it would)."""
        self.client.cookies.delete("relay_session")
        self.client.cookies.set("relay_session", value, domain="testserver.local")

    def session_cookie(self) -> str | None:
        return self.client.cookies.get("relay_session")


def set_password(client: AdminClient, password: str = PASSWORD) -> None:
    """The admin's own password (not the seed), so no forced change; as `admin set-password` does."""
    client.state.store.admin.set_password("admin", password)


@contextmanager
def admin_client(settings: Settings, sign_in: bool = True, base_url: str = ORIGIN) -> Iterator[AdminClient]:
    with TestClient(create_app(settings), base_url=base_url, client=("198.51.100.20", 40000)) as raw:
        client = AdminClient(raw, base_url)
        if sign_in:
            set_password(client)
            response = client.sign_in()
            assert response.status_code == 303 and response.headers["location"] == "/", response.text
        yield client


class FakeTurnstile:
    """A stand-in for Cloudflare's siteverify endpoint: a real HTTP server on 127.0.0.1.

    Answers success for the token "pass-token", failure for anything else,
    and a 500 for "error-token"; records every verification it was asked for.
    """

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs

        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                fields = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                calls.append(fields)
                if fields.get("response") == "error-token":
                    self.send_response(500)
                    self.end_headers()
                    return
                ok = fields.get("response") == "pass-token"
                body = json.dumps({"success": ok, "error-codes": [] if ok else ["invalid-input-response"]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/turnstile/v0/siteverify"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeTurnstile":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
