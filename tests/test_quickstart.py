"""The README's quick start, as a newcomer runs it: a fresh clone, its two commands, then the sign-in page.

The clone gets its own virtualenv from the README's first command (a minute
or two of pip); the second runs `init --if-missing` and `run`, with only a
free port added. Signing in with the password `init` printed must open the
forced password change, as the README says.
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

import captured_logs
from support import REPO, free_port, wait_until

pytestmark = pytest.mark.slow

PRINTED_LOGIN = re.compile(r"Admin login: admin / (\S+)")
CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


def quick_start_commands() -> list[str]:
    """The Quick start's two commands: the one that installs and runs the relay, the one that tests it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Quick start\n"):]
    section = section[:section.index("\n## ", 1)]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)][:2]


def cookies_from(response: httpx.Response, jar: dict[str, str]) -> dict[str, str]:
    """Keep what the relay sets. Its cookies are Secure, which httpx would not send to http://127.0.0.1
    (a browser does: 127.0.0.1 counts as a secure origin), so the test carries them itself."""
    for header in response.headers.get_list("set-cookie"):
        name, _, value = header.split(";", 1)[0].partition("=")
        jar[name.strip()] = value.strip()
    return jar


def cookie_header(jar: dict[str, str]) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{name}={value}" for name, value in jar.items())}


def test_the_readme_quick_start_has_two_commands() -> None:
    start, tests = quick_start_commands()
    assert "\n" not in start and start.startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
    assert "tspro-relay init --if-missing" in start and start.endswith(".venv/bin/tspro-relay run")
    assert tests == "bash .ci/run"


def test_the_quick_start_from_a_clean_clone_signs_in_with_the_printed_password(tmp_path: Path) -> None:
    start, _ = quick_start_commands()
    clone = tmp_path / "tspro-relay"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    env = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}

    port = free_port()
    log_path = tmp_path / "quickstart.log"
    captured_logs.register(log_path)
    with open(log_path, "wb") as log:
        relay = subprocess.Popen(["bash", "-c", f"{start} --port {port}"], cwd=clone, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        if relay.poll() is not None:
            raise AssertionError(f"the quick start exited early:\n{log_path.read_text()}")
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(serving, timeout=900, what="the quick start to install the relay and answer")
        printed = PRINTED_LOGIN.search(log_path.read_text())
        assert printed, log_path.read_text()
        assert (clone / ".env").stat().st_mode & 0o777 == 0o600

        with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as client:
            page = client.get("/login")
            jar = cookies_from(page, {})
            token = html.unescape(CSRF.search(page.text).group(1))  # type: ignore[union-attr]
            signed_in = client.post("/login", data={"username": "admin", "password": printed.group(1),
                                                    "next": "/", "csrf_token": token},
                                    headers={"Origin": base, **cookie_header(jar)})
            assert signed_in.status_code == 303, signed_in.text
            assert signed_in.headers["location"].startswith("/account/password")
            cookies_from(signed_in, jar)

            change = client.get(signed_in.headers["location"], headers=cookie_header(jar))
            assert change.status_code == 200 and "Choose your own password" in change.text
            queue = client.get("/", headers=cookie_header(jar))  # nothing else opens before the change
            assert queue.status_code == 303 and queue.headers["location"].startswith("/account/password")
    finally:
        os.killpg(relay.pid, signal.SIGINT)  # Ctrl-C, as the README says
        try:
            relay.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(relay.pid, signal.SIGKILL)
            relay.wait(10)
    assert relay.returncode == 0, log_path.read_text()
