"""Reloads and upgrades the portal never notices: `tspro-relay run` replaced under a portal's steady
sends (SIGHUP, `tspro-relay reload`, a new version installed, a broken new version) refuses none of
them, and delivers every 202 exactly once, through a real SMTP server."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx

from portal import PortalSender
from support import REPO, RelayProcess, SmtpServer, cli, free_port, relay_env, wait_until


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def delivered_once(server: SmtpServer, accepted: list[str]) -> None:
    wait_until(lambda: len(server.received) >= len(accepted), timeout=90,
               what=f"{len(accepted)} deliveries (have {len(server.received)})")
    seen = Counter(r.message["Message-ID"].strip("<>").partition("@")[0] for r in server.received)
    assert set(seen) == set(accepted)
    assert [m for m, n in seen.items() if n != 1] == []


def start_run(tmp_path: Path, server: SmtpServer, **env: str) -> tuple[RelayProcess, str, dict[str, str]]:
    relay_env_ = relay_env(tmp_path / "data", RELAY_WORKER_THREADS="4", **env)
    cli(relay_env_, "config", "set", *server.settings(), "allowed_from=example.org", cwd=tmp_path)
    key = cli(relay_env_, "api-key", "show", cwd=tmp_path).stdout.strip()
    return RelayProcess("run", relay_env_, tmp_path, port=free_port()).start(), key, relay_env_


def reloads_in(relay: RelayProcess) -> int:
    return relay.output().count("tspro-relay: reloaded.")


def test_a_reload_of_run_refuses_no_send_and_delivers_each_once(tmp_path: Path) -> None:
    with SmtpServer("none") as server:
        relay, key, env = start_run(tmp_path, server)
        try:
            assert relay.proc is not None
            before = children(relay.proc.pid)
            with PortalSender(relay.url, key) as portal:
                portal.wait_for(40)
                relay.signal(signal.SIGHUP)  # as `kill -HUP` or a process manager would
                wait_until(lambda: reloads_in(relay) == 1, timeout=60, what="the first reload")
                portal.wait_for(40)
                result = cli(env, "reload", "--port", str(relay.port), cwd=tmp_path)
                assert f"port {relay.port}" in result.stdout
                wait_until(lambda: reloads_in(relay) == 2, timeout=60, what="the second reload")
                portal.wait_for(40)
            assert portal.failures == []
            after = children(relay.proc.pid)
            assert len(after) == 2 and not after & before  # a new web and a new worker
            delivered_once(server, portal.accepted)
        finally:
            assert relay.stop() == 0


def _install(source: Path, target: Path, tmp_path: Path, version: str) -> None:
    """Build a wheel of ``source`` at ``version`` and install it into ``target`` (replacing what is there)."""
    init = source / "relay_core" / "__init__.py"
    init.write_text(re.sub(r'(?m)^__version__ = .*$', f'__version__ = "{version}"', init.read_text()))
    dist = tmp_path / f"dist-{version}"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(dist), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = dist.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "-q",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)


def test_an_upgrade_installed_under_a_running_relay_then_reloaded_refuses_no_send(tmp_path: Path) -> None:
    """The relay runs from an installed copy; a changed version is installed over it, then reloaded."""
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "data", "__pycache__", "artifacts",
                                                                ".pytest_cache", ".mypy_cache", "tests", "bench"))
    _install(source, target, tmp_path, "0.0.1-old")
    with SmtpServer("none") as server:
        relay, key, env = start_run(tmp_path, server, PYTHONPATH=str(target))
        try:
            def version() -> str:
                return str(httpx.get(f"{relay.url}/api/health", headers={"Authorization": f"Bearer {key}"},
                                     timeout=10).json()["version"])

            assert version() == "0.0.1-old"
            with PortalSender(relay.url, key) as portal:
                portal.wait_for(30)
                _install(source, target, tmp_path, "0.0.2-new")
                portal.wait_for(20)
                cli(env, "reload", "--port", str(relay.port), cwd=tmp_path)
                wait_until(lambda: reloads_in(relay) == 1, timeout=60, what="the reload")
                portal.wait_for(40)
                assert version() == "0.0.2-new"
            assert portal.failures == []
            delivered_once(server, portal.accepted)
        finally:
            assert relay.stop() == 0


def test_a_broken_new_version_leaves_the_old_one_serving_and_says_why(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO / "relay_web", source / "relay_web", ignore=shutil.ignore_patterns("__pycache__"))
    with SmtpServer("none") as server:
        relay, key, env = start_run(tmp_path, server, PYTHONPATH=f"{source}{os.pathsep}{REPO}")
        try:
            app = source / "relay_web" / "app.py"
            app.write_text(app.read_text() + "\nimport a_module_this_release_forgot  # planted by the test\n")
            with PortalSender(relay.url, key) as portal:
                portal.wait_for(20)
                relay.signal(signal.SIGHUP)
                wait_until(lambda: "reload failed" in relay.output(), timeout=60, what="the failed reload")
                portal.wait_for(30)
            output = relay.output()
            assert "No module named 'a_module_this_release_forgot'" in output
            assert "the running processes keep serving" in output
            assert portal.failures == []
            delivered_once(server, portal.accepted)
        finally:
            assert relay.stop() == 0
