"""Every log the test session captured, and the secrets that must never appear in one.

Relay processes started by the tests (``support.RelayProcess``, so the e2e,
browser and restore tests too) register their log files here; the CLI's
stderr (``support.cli``) and the output of processes a test reads itself
are kept as files in one session-wide directory; records logged inside the
test process go to a file there too (``conftest.py`` adds the handler).

The secrets are every API key and SMTP password the suite created or used,
and every OAuth 2.0 client secret, token, device code and authorization code
the stand-in authorization server (``oauth_server.py``) issued:
``remember`` is called with each (the support helpers do it for keys a CLI
printed, a relay's portal key and the test SMTP password). At the end of
the session ``conftest.py`` runs ``scan()`` and fails the run when any log
holds one of them, or anything shaped like an API key at all.

Under pytest-xdist each worker is a process of its own: the controller hands
every worker its directory (``use_directory``), each worker sends back the
files it registered and the secrets it saw (``export``, through xdist's
workeroutput), and the controller ``merge``s them before its one scan, so a
secret one worker saw is looked for in every worker's logs.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path

# The shape of every key the relay makes (crypto.new_api_key): "tsr_" and 43 URL-safe characters.
KEY_SHAPE = re.compile(r"tsr_[A-Za-z0-9_-]{40,}")

_lock = threading.Lock()
_files: list[Path] = []
_secrets: set[str] = set()
_directory: Path | None = None
_kept = 0
_missing: list[str] = []  # workers that sent nothing back (they died): their relay logs went unread
# Kept files carry the worker's name: workers number theirs independently, in one directory.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def directory() -> Path:
    """The session's directory of captured output (created on first use)."""
    global _directory
    with _lock:
        if _directory is None:
            _directory = Path(tempfile.mkdtemp(prefix="relay-test-logs-"))
        return _directory


def use_directory(path: Path) -> None:
    """The controller's directory, in a pytest-xdist worker: all kept output lands in one place."""
    global _directory
    with _lock:
        _directory = Path(path)


def register(path: Path) -> None:
    """A log file some process writes; read at the end of the session."""
    with _lock:
        _files.append(Path(path))


def keep(name: str, text: str) -> None:
    """Output the test read itself (a CLI's stderr, a process's pipe), kept for the final scan."""
    global _kept
    if not text:
        return
    with _lock:
        _kept += 1
        number = _kept
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name)[:60].strip("-") or "output"
    (directory() / f"{WORKER}-{number:05d}-{slug}.txt").write_text(text, errors="replace")


def remember(*secrets: str) -> None:
    """API keys and SMTP passwords that no log may ever show."""
    with _lock:
        _secrets.update(s for s in secrets if s and len(s) >= 8)


def remember_keys_in(text: str) -> None:
    """Every API key a command printed (`api-key show`, `new`, `add`)."""
    remember(*KEY_SHAPE.findall(text))


def secrets() -> set[str]:
    with _lock:
        return set(_secrets)


def files() -> list[Path]:
    with _lock:
        registered = list(_files)
    kept = sorted(_directory.iterdir()) if _directory is not None and _directory.exists() else []
    return registered + kept


def export() -> dict[str, list[str]]:
    """What a worker registered and remembered, for the controller's ``merge``."""
    with _lock:
        return {"files": [str(p) for p in _files], "secrets": sorted(_secrets)}


def merge(worker: str, exported: dict[str, list[str]] | None) -> None:
    """A worker's ``export``; None when the worker died without sending one."""
    if exported is None:
        with _lock:
            _missing.append(worker)
        return
    for path in exported["files"]:
        register(Path(path))
    remember(*exported["secrets"])


def find_leaks(paths: list[Path], wanted: set[str]) -> list[str]:
    """One line per (file, secret) found: the secret itself is never printed, only its start."""
    leaks = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue  # a test removed its own temporary directory
        for secret in wanted:
            if secret in text:
                leaks.append(f"{path}: holds a secret the suite used ({secret[:6]}…)")
        for match in set(KEY_SHAPE.findall(text)) - wanted:
            leaks.append(f"{path}: holds an API key ({match[:6]}…)")
    return leaks


def scan() -> tuple[int, list[str]]:
    """How many logs were read, and what leaked."""
    paths = [p for p in dict.fromkeys(files()) if p.exists()]
    with _lock:
        unread = [f"{worker} sent no list of its logs (it died): its relay logs were not read"
                  for worker in _missing]
    return len(paths), unread + find_leaks(paths, secrets())
