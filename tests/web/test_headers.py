"""Every response carries the security headers: every route in the table (enumerated, so a new route
is walked without anyone adding it here), every method it takes plus ones it refuses, as nobody, with
a wrong API key, with the right one and signed in to the admin pages; the API's success and every
error it answers; static files; Starlette's own 404/405/413 and a crash's 500."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from relay_core.options import parse_option
from relay_web.app import create_app
from admin_helpers import ORIGIN, AdminClient, admin_settings, set_password
from api_helpers import check_headers

STATIC_FILES = ("app.css", "app.js", "favicon.svg")
GOOD_MESSAGE = {"from_email": "noreply@example.org", "to": ["a@example.com"], "subject": "Hi", "text": "Body"}


class Walk:
    """The app with SMTP set, one accepted message, a signed-in admin and the API keys to use."""

    def __init__(self, raw: TestClient) -> None:
        self.raw = raw
        self.admin = AdminClient(raw)
        set_password(self.admin)
        store = self.admin.state.store
        store.set_options({k: parse_option(k, v) for k, v in {
            "smtp_host": "127.0.0.1", "smtp_port": "2525", "smtp_security": "none",
            "default_from": "noreply@example.org"}.items()})
        self.key = store.api_keys.reveal()
        self.key_id = next(k.id for k in store.api_keys.all() if k.is_primary)
        accepted = raw.post("/api/send", json=GOOD_MESSAGE, headers=self.bearer(self.key))
        assert accepted.status_code == 202, accepted.text
        self.message_id = accepted.json()["id"]
        self.statuses: dict[tuple[str, str], set[int]] = defaultdict(set)

    @staticmethod
    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def concrete(self, path: str) -> str:
        values = {"message_id": self.message_id, "key_id": str(self.key_id)}
        for name, value in values.items():
            path = re.sub(r"\{" + name + r"(:[a-z]+)?\}", value, path)
        assert "{" not in path, f"{path}: give the walk a value for this path parameter"
        return path

    def requests(self) -> list[tuple[str, str, str]]:
        """(method, concrete path, route template) for every route and method, plus refused methods."""
        wanted = []
        by_path: dict[str, set[str]] = defaultdict(set)
        for route in self.raw.app.routes:  # type: ignore[attr-defined]
            if isinstance(route, Mount):
                assert route.path == "/static", f"a new mount {route.path}: teach the walk its files"
                for name in (*STATIC_FILES, "missing.css"):
                    wanted.append(("GET", f"{route.path}/{name}", f"{route.path}/{name}"))
                    wanted.append(("HEAD", f"{route.path}/{name}", f"{route.path}/{name}"))
            elif isinstance(route, Route):
                assert route.methods, f"{route.path} takes no method"
                by_path[route.path] |= set(route.methods)
            else:
                raise AssertionError(f"a route of a kind the walk does not know: {route!r}")
        for template, methods in by_path.items():
            for method in sorted(methods | {"OPTIONS", "DELETE"}):  # the last two are refused (405)
                wanted.append((method, self.concrete(template), template))
        # Signing out last, so that the requests before it are made signed in.
        return sorted(wanted, key=lambda item: (item[0], item[2]) == ("POST", "/logout"))

    def send(self, who: str, method: str, path: str) -> httpx.Response:
        headers: dict[str, str] = {}
        if who in ("good key", "wrong key"):
            headers.update(self.bearer(self.key if who == "good key" else "tsr_" + "x" * 43))
        if method == "POST" and path == "/api/send":
            return self.raw.post(path, json=GOOD_MESSAGE, headers=headers)
        if method == "POST":
            token = None
            if who == "admin":
                token = self.admin.token()
            elif path == "/login":  # the sign-in form's own token (with its cookie)
                token = self.admin.token("/login")
            return self.admin.post(path, {"x": "1"}, token=token, **headers)
        return self.raw.request(method, path, headers=headers, follow_redirects=False)


def test_every_route_and_method_as_everyone(tmp_path: Path) -> None:
    # /metrics is served only with RELAY_METRICS=1: on, so the walk reaches it too.
    with TestClient(create_app(admin_settings(tmp_path, RELAY_METRICS="1")), base_url=ORIGIN) as raw:
        walk = Walk(raw)
        wanted = walk.requests()
        templates = {template for _, _, template in wanted}
        assert {"/", "/login", "/settings/smtp", "/api/send", "/api/messages/{message_id}", "/healthz",
                "/api/openapi.json", "/static/app.js"} <= templates
        for who in ("nobody", "wrong key", "good key", "admin"):
            if who == "admin":
                assert walk.admin.sign_in().status_code == 303
            for method, path, template in wanted:
                response = walk.send(who, method, path)
                check_headers(response, f"{method} {path} as {who} -> {response.status_code}")
                walk.statuses[(method, template)].add(response.status_code)
        # Each route and method answered at least once without an error (the walk reached it
        # for real, not only its refusals), and the refused methods were refused.
        for (method, template), statuses in walk.statuses.items():
            if method in ("OPTIONS", "DELETE") or template.endswith("missing.css"):
                assert min(statuses) >= 400, (method, template, statuses)
            else:
                assert min(statuses) < 400, (method, template, statuses)
        seen = set().union(*walk.statuses.values())
        assert {200, 202, 303, 401, 403, 404, 405} <= seen, seen


@pytest.fixture
def walk(tmp_path: Path) -> Any:
    app = create_app(admin_settings(tmp_path))

    async def crash(request: object) -> None:
        raise RuntimeError("boom (a test of the 500 path)")

    app.router.routes.append(Route("/crash-page", crash))
    app.router.routes.append(Route("/api/crash", crash))
    with TestClient(app, base_url=ORIGIN, raise_server_exceptions=False) as raw:
        yield Walk(raw)


def test_every_api_error_and_starlette_error_carries_them(walk: Walk) -> None:
    raw, key = walk.raw, walk.bearer(walk.key)
    store = walk.admin.state.store
    store.set_options({"max_attach_mb": parse_option("max_attach_mb", "0.5")})
    too_big = b"x" * (store.options().max_body_bytes + 1)
    cases = {
        "202 send": raw.post("/api/send", json=GOOD_MESSAGE, headers=key),
        "200 status": raw.get(f"/api/messages/{walk.message_id}", headers=key),
        "200 health": raw.get("/api/health", headers=key),
        "200 healthz": raw.get("/healthz"),
        "200 openapi": raw.get("/api/openapi.json"),
        "400 empty": raw.post("/api/send", headers=key),
        "400 not json": raw.post("/api/send", content=b"{nope", headers=key),
        "400 header injection": raw.post("/api/send", json={**GOOD_MESSAGE, "subject": "a\r\nBcc: x@evil.test"},
                                         headers=key),
        "401 no key": raw.post("/api/send", json=GOOD_MESSAGE),
        "401 wrong key": raw.get("/api/health", headers=walk.bearer("tsr_wrong")),
        "404 message": raw.get("/api/messages/0000nosuchmessage", headers=key),
        "404 api": raw.get("/api/nothing"),
        "404 page": raw.get("/no/such/page"),
        "405 api": raw.get("/api/send"),
        "405 page": raw.get("/logout"),
        "409 idempotency": None,
        "413 api": raw.post("/api/send", content=too_big, headers=key),
        "413 form": walk.admin.post("/login", {"blob": "x" * 100_000}, token=None),
        "415 form": raw.post("/login", content=b"{}", headers={"Origin": ORIGIN, "Content-Type": "application/json"}),
        "500 page": raw.get("/crash-page"),
        "500 api": raw.get("/api/crash"),
    }
    first = raw.post("/api/send", json=GOOD_MESSAGE, headers={**key, "Idempotency-Key": "k1"})
    assert first.status_code == 202
    cases["409 idempotency"] = raw.post("/api/send", json={**GOOD_MESSAGE, "text": "other"},
                                        headers={**key, "Idempotency-Key": "k1"})
    _, limited = store.api_keys.add("limited", 1)
    raw.post("/api/send", json=GOOD_MESSAGE, headers=walk.bearer(limited))
    cases["429 key limit"] = raw.post("/api/send", json=GOOD_MESSAGE, headers=walk.bearer(limited))
    assert cases["429 key limit"].headers["RateLimit-Limit"] == "1"
    store.set_options({"bad_key_per_minute": parse_option("bad_key_per_minute", "1")})
    cases["429 wrong keys"] = raw.get("/api/health", headers=walk.bearer("tsr_wrong"))
    store.set_options({"allowed_from": parse_option("allowed_from", "example.com")})
    cases["403 from"] = raw.post("/api/send", json=GOOD_MESSAGE, headers=key)
    store.set_options({"allowed_from": "", "smtp_host": ""})
    cases["503 not configured"] = raw.post("/api/send", json=GOOD_MESSAGE, headers=key)
    for what, response in cases.items():
        assert response is not None and response.status_code == int(what[:3]), \
            (what, response and response.status_code, response and response.text[:300])
        check_headers(response, what)
        if what.split()[1] in ("page", "form"):
            assert response.headers["content-type"].startswith("text/html"), what
        elif what.split()[1] not in ("openapi", "health"):  # health answers ok: false, no worker here
            assert response.json()["ok"] is (response.status_code < 400), what
