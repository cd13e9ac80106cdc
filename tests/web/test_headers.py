"""Every response carries the security headers: every route in the table, each method, signed in and
out, success and error, API and page, static files, and Starlette's own 404/405/413/500 answers."""

from __future__ import annotations

from pathlib import Path

import httpx
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from relay_web.app import create_app
from relay_web.headers import BASE_POLICY
from admin_helpers import ORIGIN, AdminClient, admin_settings, set_password

PATH_VALUES = {"message_id": "0000nosuchmessage", "key_id": "1"}


def check(response: httpx.Response, what: str) -> None:
    headers = response.headers
    assert headers.get("content-security-policy") == BASE_POLICY, what
    assert headers.get("x-content-type-options") == "nosniff", what
    assert headers.get("referrer-policy") == "same-origin", what
    assert headers.get("x-frame-options") == "DENY", what
    static_ok = response.request.url.path.startswith("/static/") and response.status_code < 400
    expected_cache = "public, max-age=86400" if static_ok else "no-store"
    assert headers.get("cache-control") == expected_cache, what
    content_type = headers.get("content-type", "")
    if content_type.startswith(("text/", "application/javascript", "image/svg")):
        assert "charset=utf-8" in content_type, what


def concrete(path: str) -> str:
    for name, value in PATH_VALUES.items():
        path = path.replace("{" + name + "}", value).replace("{" + name + ":int}", value)
    return path


def requests_for(app: object) -> list[tuple[str, str]]:
    wanted = []
    for route in app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Mount):
            for name in ("app.css", "app.js", "favicon.svg", "missing.css"):
                wanted.append(("GET", f"{route.path}/{name}"))
        elif isinstance(route, Route):
            for method in sorted(route.methods or ()):
                wanted.append((method, concrete(route.path)))
    # Signing out last, so that the requests before it are made signed in.
    return sorted(wanted, key=lambda pair: pair == ("POST", "/logout"))


def test_every_route_and_method_signed_in_and_out(tmp_path: Path) -> None:
    with TestClient(create_app(admin_settings(tmp_path)), base_url=ORIGIN) as raw:
        client = AdminClient(raw)
        set_password(client)
        wanted = requests_for(raw.app)
        assert {("GET", "/"), ("POST", "/login"), ("POST", "/settings/smtp"), ("POST", "/api/send"),
                ("GET", "/static/app.js")} <= set(wanted)
        seen_statuses = set()
        for signed_in in (False, True):
            if signed_in:
                assert client.sign_in().status_code == 303
            for method, path in wanted:
                if method == "POST":
                    token = client.token() if signed_in else None
                    response = client.post(path, {"x": "1"}, token=token)
                else:
                    response = raw.request(method, path, follow_redirects=False)
                check(response, f"{method} {path} signed_in={signed_in} -> {response.status_code}")
                seen_statuses.add(response.status_code)
        # Between them: pages (bad input included), redirects, CSRF refusals, 401s, 404s, static files.
        assert {200, 303, 401, 403, 404} <= seen_statuses


def test_starlette_errors_and_crashes_carry_them_too(tmp_path: Path) -> None:
    app = create_app(admin_settings(tmp_path))

    async def crash(request: object) -> None:
        raise RuntimeError("boom (a test of the 500 path)")

    app.router.routes.append(Route("/crash-page", crash))
    app.router.routes.append(Route("/api/crash", crash))
    with TestClient(app, base_url=ORIGIN, raise_server_exceptions=False) as raw:
        client = AdminClient(raw)
        set_password(client)
        cases = {
            "404 page": raw.get("/no/such/page"),
            "404 api": raw.get("/api/nothing"),
            "405 page": raw.get("/logout"),
            "405 api": raw.get("/api/send"),
            "413 api": raw.post("/api/send", content=b"x" * (40 * 1024 * 1024),
                                headers={"Authorization": f"Bearer {client.state.store.reveal_api_key()}"}),
            "413 form": client.post("/login", {"blob": "x" * 100_000}, token=None),
            "415 form": raw.post("/login", content=b"{}", headers={"Origin": ORIGIN,
                                                                   "Content-Type": "application/json"}),
            "500 page": raw.get("/crash-page"),
            "500 api": raw.get("/api/crash"),
        }
        for what, response in cases.items():
            assert response.status_code == int(what[:3]), (what, response.status_code, response.text[:300])
            check(response, what)
        assert cases["500 page"].headers["content-type"].startswith("text/html")
        assert cases["500 api"].json()["ok"] is False
        assert cases["405 page"].headers["content-type"].startswith("text/html")
        assert cases["413 api"].json()["ok"] is False
