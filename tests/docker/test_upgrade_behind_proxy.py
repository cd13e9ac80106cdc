"""An upgrade of the guide's container that the portal never notices, behind either proxy of Part 2.

The portal sends one message at a time with no retries; while it does, a new image is built and the
container recreated (`docker compose up -d --build`). Behind Debian's caddy, `reverse_proxy` holds
each request and retries the connection while no container listens (lb_try_duration). Behind
Debian's nginx, which cannot hold a request, two copies of the relay run side by side and are
recreated one at a time; `proxy_next_upstream` sends a request the first cannot take to the second.
Zero failed sends in both, and every 202 delivered once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from engine import GUIDE_FILE, Engine, Project, copy_repository, guide_override
from portal import PortalSender
from support import SECRET, SmtpServer, free_port, wait_until

pytestmark = pytest.mark.slow
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def guide_clone(directory: Path) -> Path:
    clone = copy_repository(directory)
    (clone / "docker-compose.yml").write_text(GUIDE_FILE.read_text().replace(
        "    image: viibeware/tspro-relay:latest\n", "    build: .\n"))
    return clone


def set_version(clone: Path, version: str) -> None:
    init = clone / "relay_core" / "__init__.py"
    init.write_text(re.sub(r'(?m)^__version__ = .*$', f'__version__ = "{version}"', init.read_text()))


def second_relay(port: int) -> str:
    """relay-b: the guide's service again, on its own port and the same ./data."""
    check = ("import urllib.request,sys; sys.exit(0 if urllib.request.urlopen("
             f"'http://127.0.0.1:{port}/healthz',timeout=5).status==200 else 1)")
    return (
        "  relay-b:\n"
        "    build: {network: host}\n"
        "    image: tspro-relay-guide:local\n"
        "    network_mode: host\n"
        "    environment:\n"
        "      - RELAY_SECRET_KEY=${RELAY_SECRET_KEY}\n"
        "    volumes: [./data:/data]\n"
        "    stop_grace_period: 30s\n"
        f'    command: ["tspro-relay", "run", "--host", "127.0.0.1", "--port", "{port}"]\n'
        "    healthcheck:\n"
        f'      test: ["CMD", "python", "-c", "{check}"]\n'
        "      interval: 2s\n"
    )


class Proxy:
    def __init__(self, command: list[str], url: str, log: Path) -> None:
        self.url = url
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def answers(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def start_caddy(directory: Path, listen: int, upstream: int) -> Proxy:
    (directory / "Caddyfile").write_text(f"""{{
    admin off
    auto_https off
    storage file_system {directory}/caddy-data
}}
http://127.0.0.1:{listen} {{
    reverse_proxy 127.0.0.1:{upstream} {{
        lb_try_duration 30s
        lb_try_interval 250ms
        # The body kept, so a request that reached a relay as it stopped (and was never read)
        # can be sent again; and a fresh connection per request, so none kept open to a relay
        # that is stopping is closed under a request.
        buffer_requests
        transport http {{
            keepalive off
        }}
    }}
}}
""")
    return Proxy([CADDY, "run", "--config", str(directory / "Caddyfile"), "--adapter", "caddyfile"],
                 f"http://127.0.0.1:{listen}", directory / "caddy.log")


def start_nginx(directory: Path, listen: int, upstreams: list[int]) -> Proxy:
    user = "user root;\n" if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0" \
        else ""
    servers = "".join(f"        server 127.0.0.1:{port} max_fails=0;\n" for port in upstreams)
    (directory / "nginx.conf").write_text(f"""{user}daemon off;
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
    upstream relay {{
{servers}    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://relay;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 2;
        }}
    }}
}}
""")
    return Proxy([NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf")],
                 f"http://127.0.0.1:{listen}", directory / "nginx.log")


def delivered_once(smtp: SmtpServer, accepted: list[str]) -> None:
    wait_until(lambda: len(smtp.received) >= len(accepted), timeout=120,
               what=f"{len(accepted)} deliveries (have {len(smtp.received)})")
    seen = Counter(r.message["Message-ID"].strip("<>").partition("@")[0] for r in smtp.received)
    assert set(seen) == set(accepted)
    assert [m for m, n in seen.items() if n != 1] == []


def version(url: str, key: str) -> str:
    return str(httpx.get(f"{url}/api/health", headers={"Authorization": f"Bearer {key}"}, timeout=10)
               .json()["version"])


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer("none") as server:
        yield server


def setup_relay(project: Project, service: str, smtp: SmtpServer) -> str:
    project.exec(service, "tspro-relay", "config", "set", "smtp_host=127.0.0.1", f"smtp_port={smtp.port}",
                 "smtp_security=none", "allowed_from=example.org")
    return project.exec(service, "tspro-relay", "api-key", "show").stdout.strip()


def test_an_upgrade_behind_caddy_fails_no_send(engine: Engine, tmp_path: Path, smtp: SmtpServer) -> None:
    clone = guide_clone(tmp_path / "relay")
    set_version(clone, "1.0.0-before")
    port, listen = free_port(), free_port()
    project = Project(engine, clone, "docker-compose.yml", guide_override(port),
                      env_file={"RELAY_SECRET_KEY": SECRET, "RELAY_ADMIN_PASSWORD": "admin-pass-123"})
    caddy = None
    try:
        project.compose("up", "-d", "--build")
        project.wait_healthy(1, timeout=120)
        key = setup_relay(project, "relay", smtp)
        caddy = start_caddy(tmp_path, listen, port)
        wait_until(caddy.answers, timeout=30, what="caddy in front of the relay")
        with PortalSender(caddy.url, key) as portal:
            portal.wait_for(30)
            set_version(clone, "1.0.1-after")
            project.compose("up", "-d", "--build")  # a new image; the container is recreated
            project.wait_healthy(1, timeout=120)
            portal.wait_for(30)
        assert version(caddy.url, key) == "1.0.1-after"
        assert portal.failures == [], caddy.log.read_text()[-3000:]
        delivered_once(smtp, portal.accepted)
    finally:
        if caddy is not None:
            caddy.stop()
        project.down()


def test_an_upgrade_one_copy_at_a_time_behind_nginx_fails_no_send(engine: Engine, tmp_path: Path,
                                                                   smtp: SmtpServer) -> None:
    clone = guide_clone(tmp_path / "relay")
    set_version(clone, "1.0.0-before")
    port_a, port_b, listen = free_port(), free_port(), free_port()
    override = guide_override(port_a).replace("  relay:\n", "  relay:\n    image: tspro-relay-guide:local\n",
                                              1) + "    stop_grace_period: 30s\n" + second_relay(port_b)
    project = Project(engine, clone, "docker-compose.yml", override,
                      env_file={"RELAY_SECRET_KEY": SECRET, "RELAY_ADMIN_PASSWORD": "admin-pass-123"})
    nginx = None
    try:
        project.compose("up", "-d", "--build")
        project.wait_healthy(2, timeout=120)
        key = setup_relay(project, "relay", smtp)  # both copies share ./data: one store, one key
        nginx = start_nginx(tmp_path, listen, [port_a, port_b])
        wait_until(nginx.answers, timeout=30, what="nginx in front of the relays")
        with PortalSender(nginx.url, key) as portal:
            portal.wait_for(30)
            set_version(clone, "1.0.1-after")
            project.compose("build")
            for service in ("relay", "relay-b"):  # one at a time: the other serves meanwhile
                project.compose("up", "-d", "--no-deps", service)
                project.wait_healthy(2, timeout=120)
                portal.wait_for(20)
        assert version(f"http://127.0.0.1:{port_a}", key) == version(f"http://127.0.0.1:{port_b}", key) \
            == "1.0.1-after"
        assert portal.failures == [], (tmp_path / "error.log").read_text()[-3000:]
        delivered_once(smtp, portal.accepted)
    finally:
        if nginx is not None:
            nginx.stop()
        project.down()
