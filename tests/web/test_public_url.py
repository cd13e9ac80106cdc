"""RELAY_PUBLIC_URL and RELAY_ALLOWED_HOSTS on the real app: the Host names the relay answers to, the
Origin check (its scheme included), the cookies, and Strict-Transport-Security; unset, any Host is served
as before. (The links the relay builds are in test_admin_oauth.py; the settings' parsing in
tests/core/test_config.py.)"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from relay_core.config import Settings
from relay_core.options import parse_option
from relay_web import site
from relay_web.app import create_app
from relay_web.http_limits import LogBudget
from admin_helpers import AdminClient, admin_client, admin_settings
from support import RelayProcess, cli, free_port, relay_env
from api_helpers import check_headers, payload

PUBLIC = "https://relay.example.org"
HSTS = "strict-transport-security"
SMTP_FORM = {"smtp_host": "mail.example.org", "smtp_port": "587", "smtp_security": "starttls", "smtp_username": "",
             "default_from": "noreply@example.org", "default_from_name": "", "allowed_from": "",
             "max_attach_mb": "25"}


def configured(client: AdminClient) -> str:
    """SMTP set (so a send is accepted); the portal's key."""
    store = client.state.store
    store.set_options({k: parse_option(k, v) for k, v in {
        "smtp_host": "127.0.0.1", "smtp_port": "2525", "smtp_security": "none"}.items()})
    return str(store.api_keys.reveal())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(autouse=True)
def fresh_log_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site, "refusal_log", LogBudget())  # each test sees its own lines


def host_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "web.host_refused"]


def test_a_host_the_relay_does_not_answer_to_gets_a_clear_400(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with admin_client(admin_settings(tmp_path, RELAY_PUBLIC_URL=PUBLIC), base_url=PUBLIC) as client:
        raw, key = client.client, configured(client)
        evil = {"Host": "evil.example"}
        answers = {
            "GET /healthz": raw.get("/healthz", headers=evil),
            "GET /api/health": raw.get("/api/health", headers={**evil, **bearer(key)}),
            "POST /api/send": raw.post("/api/send", json=payload(), headers={**evil, **bearer(key)}),
            "GET /api/nothing": raw.get("/api/nothing", headers=evil),
        }
        for what, response in answers.items():
            assert response.status_code == 400, what
            error = response.json()["error"]
            assert response.json()["ok"] is False and "'evil.example'" in error, what
            assert "https://relay.example.org" in error and "RELAY_ALLOWED_HOSTS" in error, what
            check_headers(response, what)
        for path in ("/login", "/settings", "/"):  # signed in, too: the page is not served under that name
            page = raw.get(path, headers=evil, follow_redirects=False)
            assert page.status_code == 400 and page.headers["content-type"].startswith("text/html"), path
            assert "RELAY_ALLOWED_HOSTS" in page.text and "SMTP delivery" not in page.text
            check_headers(page, path)
        lines = host_lines(caplog)
        assert len(lines) == 7 and all(r.exc_info is None and r.levelno == logging.WARNING for r in lines)

        # Its own name is served, and the loopback names always are: the container's health check asks
        # http://127.0.0.1:8000/healthz, and no page of another site can make a browser send them.
        assert raw.get("/healthz").status_code == 200
        assert raw.post("/api/send", json=payload(), headers=bearer(key)).status_code == 202
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "RELAY.example.org:443"):
            assert raw.get("/healthz", headers={"Host": host}).status_code == 200, host
            health = raw.get("/api/health", headers={"Host": host, **bearer(key)})
            assert health.status_code == 200 and "configured" in health.json(), host
        for host in ("", "relay.example.org.evil.example", "relay.example.org@evil.example"):
            assert raw.get("/healthz", headers={"Host": host}).status_code == 400, host


def test_allowed_hosts_add_names_and_work_without_a_public_url(tmp_path: Path) -> None:
    # The portal on the same compose network reaches the relay as http://relay:8000.
    env = {"RELAY_PUBLIC_URL": PUBLIC, "RELAY_ALLOWED_HOSTS": "relay, relay.lan"}
    with admin_client(admin_settings(tmp_path, **env), base_url=PUBLIC) as client:
        key = configured(client)
        sent = client.client.post("/api/send", json=payload(), headers={"Host": "relay:8000", **bearer(key)})
        assert sent.status_code == 202
        assert client.client.get("/healthz", headers={"Host": "Relay.LAN"}).status_code == 200
        refused = client.client.get("/healthz", headers={"Host": "relay.other"})
        assert refused.status_code == 400 and "relay.lan" not in refused.text  # the other names stay private
    with TestClient(create_app(admin_settings(tmp_path / "2", RELAY_ALLOWED_HOSTS="relay.lan"))) as raw:
        assert raw.get("/healthz", headers={"Host": "relay.lan:8026"}).status_code == 200
        assert raw.get("/healthz", headers={"Host": "evil.example"}).status_code == 400


def test_unset_any_host_is_served_as_before(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        key = configured(client)
        assert client.client.get("/healthz", headers={"Host": "evil.example"}).status_code == 200
        sent = client.client.post("/api/send", json=payload(), headers={"Host": "anything", **bearer(key)})
        assert sent.status_code == 202
        assert client.post("/settings/smtp", SMTP_FORM).status_code == 303


def test_with_a_public_url_a_post_must_come_from_it_scheme_included(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path, RELAY_PUBLIC_URL=PUBLIC), base_url=PUBLIC) as client:
        for origin in ("http://relay.example.org", "https://relay.example.org:8443", "https://evil.example"):
            response = client.post("/settings/smtp", SMTP_FORM, origin=origin)
            assert response.status_code == 403, origin
            assert "did not come from the relay's own pages" in html.unescape(response.text)
        assert client.post("/settings/smtp", SMTP_FORM, origin=None,
                           Referer="http://relay.example.org/settings").status_code == 403
        assert client.post("/settings/smtp", SMTP_FORM).status_code == 303  # from https://relay.example.org
        assert client.post("/settings/smtp", SMTP_FORM, origin="https://relay.example.org:443").status_code == 303


def proxied(tmp_path: Path, trusted: str, **env: str) -> Any:
    """The admin pages reached through a proxy at 198.51.100.20 (the test client's address)."""
    return admin_client(admin_settings(tmp_path, RELAY_TRUSTED_PROXIES=trusted, **env))


def test_an_http_origin_is_refused_when_a_trusted_proxy_says_https(tmp_path: Path) -> None:
    with proxied(tmp_path, "198.51.100.0/24") as client:
        tls = {"X-Forwarded-Proto": "https"}
        assert client.post("/settings/smtp", SMTP_FORM, origin="http://testserver", **tls).status_code == 403
        assert client.post("/settings/smtp", SMTP_FORM, origin="https://testserver", **tls).status_code == 303
        # A proxy that does not say, or says http: the Origin's own scheme is believed, as before.
        assert client.post("/settings/smtp", SMTP_FORM, origin="https://testserver").status_code == 303
        assert client.post("/settings/smtp", SMTP_FORM, origin="http://testserver",
                           **{"X-Forwarded-Proto": "http"}).status_code == 303
    with proxied(tmp_path / "untrusted", "10.0.0.0/8") as client:  # not our proxy: its header means nothing
        assert client.post("/settings/smtp", SMTP_FORM, origin="http://testserver",
                           **{"X-Forwarded-Proto": "https"}).status_code == 303


def session_cookie_header(client: AdminClient) -> str:
    response = client.sign_in()
    assert response.status_code == 303, response.text
    return next(v for k, v in response.headers.multi_items() if k == "set-cookie" and "relay_session=" in v)


def test_cookies_follow_the_public_urls_scheme(tmp_path: Path) -> None:
    # https: Secure, even where RELAY_INSECURE_COOKIES=1 was left from a test on the LAN.
    with admin_client(admin_settings(tmp_path, RELAY_PUBLIC_URL=PUBLIC), sign_in=False, base_url=PUBLIC) as client:
        client.state.store.admin.set_password("admin", "correct-horse-42")
        assert "secure" in session_cookie_header(client).lower()
    # http (a relay on a LAN, by name): not Secure, or the browser would never send it back.
    lan = "http://relay.lan:8000"
    settings = admin_settings(tmp_path / "lan", RELAY_PUBLIC_URL=lan, RELAY_INSECURE_COOKIES="")
    with admin_client(settings, sign_in=False, base_url=lan) as client:
        client.state.store.admin.set_password("admin", "correct-horse-42")
        assert "secure" not in session_cookie_header(client).lower()
        assert client.get("/settings").status_code == 200


def hsts(settings: Settings, path: str = "/login", peer: str = "198.51.100.20", **headers: str) -> str | None:
    with TestClient(create_app(settings), base_url="http://relay.example.org", client=(peer, 40000)) as raw:
        response = raw.get(path, headers=headers)
        assert response.status_code < 400, response.text
        return response.headers.get(HSTS)


def test_hsts_only_when_the_relay_knows_it_is_behind_tls(tmp_path: Path) -> None:
    public = admin_settings(tmp_path, RELAY_PUBLIC_URL=PUBLIC)
    assert hsts(public) == "max-age=31536000"
    assert hsts(public, "/healthz") == "max-age=31536000"
    assert hsts(public, "/healthz", Host="127.0.0.1:8000") is None  # the health check, over plain HTTP
    assert hsts(admin_settings(tmp_path / "lan", RELAY_PUBLIC_URL="http://relay.example.org")) is None
    assert hsts(admin_settings(tmp_path / "none")) is None
    assert hsts(admin_settings(tmp_path / "none"), **{"X-Forwarded-Proto": "https"}) is None
    proxy = admin_settings(tmp_path / "proxy", RELAY_TRUSTED_PROXIES="198.51.100.0/24")
    assert hsts(proxy, **{"X-Forwarded-Proto": "https"}) == "max-age=31536000"
    assert hsts(proxy, **{"X-Forwarded-Proto": "http"}) is None
    assert hsts(proxy, peer="203.0.113.9", **{"X-Forwarded-Proto": "https"}) is None  # not the proxy
    assert hsts(proxy) is None
    # With both: a request that did not come through a known proxy came straight, over plain HTTP.
    both = admin_settings(tmp_path / "both", RELAY_PUBLIC_URL=PUBLIC, RELAY_TRUSTED_PROXIES="198.51.100.0/24")
    assert hsts(both) == "max-age=31536000"
    assert hsts(both, peer="203.0.113.9") is None
    # The portal's sends are answered before the middleware: they carry it too.
    with admin_client(public, base_url=PUBLIC) as client:
        sent = client.client.post("/api/send", json=payload(), headers=bearer(configured(client)))
        assert sent.status_code == 202 and sent.headers[HSTS] == "max-age=31536000"
        check_headers(sent, "202 send")


def test_the_containers_health_check_passes_with_a_public_url(tmp_path: Path) -> None:
    """The image's HEALTHCHECK (`tspro-relay healthcheck --auto`) asks the real web process on 127.0.0.1:
    a public URL must not turn it unhealthy; a stranger's Host gets the 400 and one log line."""
    port = free_port()
    env = relay_env(tmp_path / "data", RELAY_PUBLIC_URL=PUBLIC)
    web = RelayProcess("web", env, tmp_path, port=port).start()
    try:
        checked = cli(env, "healthcheck", "--url", f"http://127.0.0.1:{port}/healthz", cwd=tmp_path, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        refused = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"Host": "evil.example"}, timeout=30)
        assert refused.status_code == 400 and "RELAY_ALLOWED_HOSTS" in refused.json()["error"]
        assert refused.headers["x-frame-options"] == "DENY"
    finally:
        web.stop()
    output = web.output()
    assert output.count("refused a request from 127.0.0.1 for host 'evil.example'") == 1 and "Traceback" not in output
