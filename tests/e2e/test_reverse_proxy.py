"""The guide's Part 2 for real: Debian's nginx terminating TLS in front of `tspro-relay run`.

nginx runs from a config in a temp directory (its pid, logs and temp files
there; free ports on 127.0.0.1) with a throwaway certificate from a test CA,
and forwards exactly as the guide's snippet does (`Host $host`,
`X-Forwarded-For $remote_addr`).
Two relays sit behind it: one told to believe the proxy
(RELAY_TRUSTED_PROXIES=127.0.0.1), one not. The client connects from
127.0.0.2, so its address and the proxy's (127.0.0.1) can be told apart in
the transaction log. A third is told its public address (RELAY_PUBLIC_URL,
https://relay.test:<port>) and believes the proxy, which also sends
`X-Forwarded-Proto $scheme` as docs/operating.md suggests.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from support import Certificates, RelayProcess, SmtpServer, cli, free_port, relay_env, wait_until

pytestmark = pytest.mark.slow
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CLIENT_ADDRESS = "127.0.0.2"  # any 127/8 address is this machine's loopback
FORWARDED_PROTO = "\n            proxy_set_header X-Forwarded-Proto $scheme;"
PUBLIC_NAME = "relay.test"


@dataclass
class Backend:
    name: str
    env: dict[str, str]
    process: RelayProcess
    proxy_port: int

    @property
    def key(self) -> str:
        return cli(self.env, "api-key", "show").stdout.strip()

    def logged_source(self, subject: str) -> str:
        conn = sqlite3.connect(Path(self.env["RELAY_DATA_DIR"]) / "relay.db", timeout=30)
        try:
            row = conn.execute("SELECT source_ip FROM log WHERE event = 'accepted' AND subject = ?",
                               (subject,)).fetchone()
        finally:
            conn.close()
        assert row is not None, subject
        return str(row[0])


def nginx_config(directory: Path, cert: Path, key: Path, routes: dict[int, int], proto: set[int]) -> str:
    # `user` only means something when nginx starts as root: then its workers stay root,
    # so they can use this temp directory; as another user the line is ignored.
    user = "user root;\n" if os.geteuid() == 0 else ""
    servers = "".join(f"""
    server {{
        listen 127.0.0.1:{listen} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;{FORWARDED_PROTO if listen in proto else ""}
        }}
    }}""" for listen, upstream in routes.items())
    return f"""{user}daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    client_max_body_size 40m;{servers}
}}
"""


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer("none") as server:
        yield server


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, certs: Certificates,
            smtp: SmtpServer) -> Iterator[dict[str, Backend]]:
    root = tmp_path_factory.mktemp("proxy")
    backends: dict[str, Backend] = {}
    for name, trusted in (("trusting", "127.0.0.1"), ("untrusting", ""), ("public", "127.0.0.1")):
        (root / name).mkdir()
        proxy_port = free_port()
        public = {"RELAY_PUBLIC_URL": f"https://{PUBLIC_NAME}:{proxy_port}"} if name == "public" else {}
        env = relay_env(root / name / "data", RELAY_TRUSTED_PROXIES=trusted, **public)
        cli(env, "config", "set", *smtp.settings())
        backends[name] = Backend(name, env, RelayProcess("run", env, root / name, port=free_port()), proxy_port)
    issued = certs.ca.issue_cert("127.0.0.1", "localhost")
    cert, key = root / "server.pem", root / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    (root / "nginx.conf").write_text(nginx_config(root, cert, key,
                                                  {b.proxy_port: b.process.port for b in backends.values()},
                                                  {backends["public"].proxy_port}))
    output = open(root / "nginx.out", "wb")
    nginx = subprocess.Popen([NGINX, "-p", str(root), "-c", str(root / "nginx.conf")],
                             stdout=output, stderr=subprocess.STDOUT)
    try:
        for backend in backends.values():
            backend.process.start()
        context = ssl.create_default_context(cafile=str(certs.ca_file))

        def answers() -> bool:
            if nginx.poll() is not None:
                raise AssertionError(f"nginx exited: {(root / 'nginx.out').read_text()}"
                                     f"{(root / 'error.log').read_text()}")
            try:
                with httpx.Client(verify=context) as client:
                    return all(client.get(f"https://127.0.0.1:{b.proxy_port}/healthz").status_code == 200
                               for b in backends.values())
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout=30, what="nginx in front of both relays")
        yield backends
    finally:
        nginx.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        try:
            nginx.wait(15)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait(5)
        output.close()
        for backend in backends.values():
            backend.process.stop()


def client(certs: Certificates, port: int) -> httpx.Client:
    """An HTTPS client of the proxy that trusts only the test CA and connects from 127.0.0.2."""
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    transport = httpx.HTTPTransport(verify=context, local_address=CLIENT_ADDRESS)
    return httpx.Client(base_url=f"https://127.0.0.1:{port}", transport=transport, timeout=30)


def send(http: httpx.Client, key: str, subject: str, **headers: str) -> httpx.Response:
    return http.post("/api/send", headers={"Authorization": f"Bearer {key}", **headers},
                     json={"from_email": "noreply@example.org", "to": ["ann@example.com"], "subject": subject,
                           "text": "through the proxy"})


def test_sends_through_the_proxy_are_delivered(proxied: dict[str, Backend], certs: Certificates,
                                               smtp: SmtpServer) -> None:
    backend = proxied["trusting"]
    with client(certs, backend.proxy_port) as http:
        answer = send(http, backend.key, "over https")
        assert answer.status_code == 202, answer.text
        assert answer.url.scheme == "https"
        message_id = answer.json()["id"]
        wait_until(lambda: http.get(f"/api/messages/{message_id}",
                                    headers={"Authorization": f"Bearer {backend.key}"}).json()["status"] == "sent",
                   timeout=30, what="the proxied send to be delivered")
        assert send(http, "wrong-key", "refused").status_code == 401  # errors pass through unchanged
    assert "over https" in [r.message["Subject"] for r in smtp.received]


def test_the_log_takes_the_client_address_from_a_trusted_proxy_only(proxied: dict[str, Backend],
                                                                    certs: Certificates) -> None:
    for name, expected in (("trusting", CLIENT_ADDRESS), ("untrusting", "127.0.0.1")):
        backend = proxied[name]
        with client(certs, backend.proxy_port) as http:
            # A client's own X-Forwarded-For is replaced by the proxy ($remote_addr): it cannot spoof.
            answer = send(http, backend.key, f"via proxy {name}", **{"X-Forwarded-For": "203.0.113.9"})
            assert answer.status_code == 202, answer.text
        assert backend.logged_source(f"via proxy {name}") == expected, name

    # Straight to the trusting relay, not through the proxy: a forged header is not believed.
    backend = proxied["trusting"]
    transport = httpx.HTTPTransport(local_address=CLIENT_ADDRESS)
    with httpx.Client(base_url=backend.process.url, transport=transport, timeout=30) as direct:
        answer = send(direct, backend.key, "direct", **{"X-Forwarded-For": "203.0.113.9"})
        assert answer.status_code == 202
    assert backend.logged_source("direct") == CLIENT_ADDRESS


def test_the_admin_session_cookie_is_secure_behind_the_proxy(proxied: dict[str, Backend],
                                                             certs: Certificates) -> None:
    backend = proxied["trusting"]
    origin = f"https://127.0.0.1:{backend.proxy_port}"
    with client(certs, backend.proxy_port) as http:
        page = http.get("/login")
        assert page.status_code == 200
        token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        signed_in = http.post("/login", headers={"Origin": origin},
                              data={"username": "admin", "password": "admin-pass-123", "csrf_token": token,
                                    "next": "/"})
        assert signed_in.status_code == 303, signed_in.text
        cookies = signed_in.headers.get_list("set-cookie")
        session = [c for c in cookies if c.startswith("relay_session=")]
        assert session, cookies
        attributes = [part.strip().lower() for part in session[0].split(";")]
        assert "secure" in attributes and "httponly" in attributes and "samesite=lax" in attributes
        # The cookie works for the next request over HTTPS: the session is real.
        follow = http.get(signed_in.headers["location"])
        assert follow.status_code == 200 and "Change password" in follow.text
    assert all("secure" in [p.strip().lower() for p in c.split(";")] for c in cookies)


def test_a_public_url_behind_the_proxy(proxied: dict[str, Backend], certs: Certificates) -> None:
    """The browser asks for https://relay.test:<port> (nginx passes the name on as Host): HSTS on the
    answers, sign-in from that origin only, Secure cookies; another name gets the 400, through nginx too."""
    backend = proxied["public"]
    origin = f"https://{PUBLIC_NAME}:{backend.proxy_port}"
    named = {"Host": f"{PUBLIC_NAME}:{backend.proxy_port}"}
    with client(certs, backend.proxy_port) as http:
        page = http.get("/login", headers=named)
        assert page.status_code == 200 and page.headers["strict-transport-security"] == "max-age=31536000"
        token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        form = {"username": "admin", "password": "admin-pass-123", "csrf_token": token, "next": "/"}
        for foreign in (f"http://{PUBLIC_NAME}:{backend.proxy_port}", f"https://{PUBLIC_NAME}"):
            refused = http.post("/login", headers={**named, "Origin": foreign}, data=form)
            assert refused.status_code == 403, foreign
        signed_in = http.post("/login", headers={**named, "Origin": origin}, data=form)
        assert signed_in.status_code == 303, signed_in.text
        assert "secure" in signed_in.headers["set-cookie"].lower()
        stranger = http.get("/healthz", headers={"Host": "evil.example"})
        assert stranger.status_code == 400 and PUBLIC_NAME in stranger.json()["error"]
        assert stranger.headers["x-content-type-options"] == "nosniff"
        # Through the proxy by its address (nginx's Host is then 127.0.0.1): still over TLS, it says.
        assert http.get("/healthz").headers["strict-transport-security"] == "max-age=31536000"
    # Straight to the relay, not through the proxy: plain HTTP, so no HSTS, whatever the Host says.
    transport = httpx.HTTPTransport(local_address=CLIENT_ADDRESS)
    with httpx.Client(base_url=backend.process.url, transport=transport, timeout=30) as direct:
        answer = direct.get("/healthz", headers=named)
        assert answer.status_code == 200 and "strict-transport-security" not in answer.headers
    for name in ("trusting", "untrusting"):  # nginx sends them no X-Forwarded-Proto, and they have no public URL
        with client(certs, proxied[name].proxy_port) as http:
            assert "strict-transport-security" not in http.get("/healthz").headers, name
