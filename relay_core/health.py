"""Health checks for containers and supervisors: `tspro-relay healthcheck`.

A worker marks itself in a file in the temporary directory, so the check judges
the workers running *here* by their heartbeat, with no web process. ``--auto``
reads PID 1's role: one image serves every role, so its HEALTHCHECK cannot name it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .config import Settings

HEARTBEAT_STALE_SECONDS = 60.0
MARKER_PREFIX = "tspro-relay-worker."


class Unhealthy(Exception):
    """The one sentence a failed check prints."""


def marker_dir() -> Path:
    """The temporary directory; /dev/shm when there is none, as in a container with a read-only root
    filesystem (Docker mounts a tmpfs on /dev/shm whatever ``read_only`` says)."""
    try:
        return Path(tempfile.gettempdir())
    except FileNotFoundError:  # "No usable temporary directory found"
        return Path("/dev/shm")


def _store_identity(settings: Settings) -> str:
    if settings.database_url:  # a digest: the URL may hold a password, and the marker is world-readable
        return "postgresql:" + hashlib.sha256(str(settings.database_url).encode()).hexdigest()[:32]
    return str(settings.db_path.resolve())


def mark_worker(settings: Settings, name: str, pid: int | None = None) -> Path:
    """Record that the worker ``name`` of this store runs here as ``pid`` (readable by any user)."""
    path = marker_dir() / f"{MARKER_PREFIX}{pid or os.getpid()}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{name}\n{_store_identity(settings)}\n", encoding="utf-8")
    tmp.chmod(0o644)  # the container's health check may run as another user
    tmp.replace(path)
    return path


def unmark_worker(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def local_workers(settings: Settings) -> list[str]:
    """Names of this store's workers whose processes run here now."""
    names = []
    for path in marker_dir().glob(MARKER_PREFIX + "*"):
        suffix = path.name[len(MARKER_PREFIX):]
        if not suffix.isdigit() or not _alive(int(suffix)):
            continue
        try:
            name, _, store = path.read_text(encoding="utf-8").partition("\n")
        except OSError:
            continue
        if store.strip() == _store_identity(settings):
            names.append(name.strip())
    return names


def check_web(url: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unhealthy(f"{url} did not answer: {exc}") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise Unhealthy(f"{url} answered {answer}")


def check_worker(settings: Settings, now: float | None = None) -> None:
    """The workers running here have a recent heartbeat (or, with none here, some worker has)."""
    # Imported here: the web check must stay cheap and work without a secret.
    from . import crypto
    from .store import Store, open_database

    if not settings.database_url and not settings.db_path.exists():
        raise Unhealthy(f"there is no store at {settings.db_path} yet.")
    now = time.time() if now is None else now
    store = Store(open_database(settings), crypto.derive_keys(settings))
    try:
        local = local_workers(settings)
        if local:
            beats = store.workers.heartbeats(local)
            for name in local:
                beat = beats.get(name)
                if beat is None or now - beat > HEARTBEAT_STALE_SECONDS:
                    raise Unhealthy(f"the worker {name} has not reported in the last "
                                    f"{HEARTBEAT_STALE_SECONDS:.0f} seconds.")
            return
        beat = store.workers.last_heartbeat()
        if beat is None or now - beat > HEARTBEAT_STALE_SECONDS:
            raise Unhealthy(f"no worker has reported in the last {HEARTBEAT_STALE_SECONDS:.0f} seconds.")
    finally:
        store.shutdown()


def main_process_role(cmdline: list[str]) -> tuple[str, int]:
    """(role, port) of a tspro-relay command line: ``run``, ``web`` or ``worker``."""
    for index, arg in enumerate(cmdline):
        if arg in ("run", "web", "worker"):
            role, rest = arg, cmdline[index + 1:]
            break
    else:
        raise Unhealthy(f"the main process is not a relay process ({' '.join(cmdline)!r}).")
    port = 8000
    for index, arg in enumerate(rest):
        value = None
        if arg == "--port" and index + 1 < len(rest):
            value = rest[index + 1]
        elif arg.startswith("--port="):
            value = arg.split("=", 1)[1]
        if value is not None and value.isdigit():
            port = int(value)
    return role, port


def read_cmdline(pid: int = 1) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def check_auto(load: Callable[[], Settings], pid: int = 1) -> None:
    try:
        role, port = main_process_role(read_cmdline(pid))
    except OSError as exc:
        raise Unhealthy(f"cannot read the command of process {pid}: {exc.strerror}.") from None
    if role in ("web", "run"):
        check_web(f"http://127.0.0.1:{port}/healthz")
    if role in ("worker", "run"):
        check_worker(load())

