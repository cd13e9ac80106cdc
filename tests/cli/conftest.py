"""Fixtures of the command-line tests: a data directory's environment, and its store opened in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from relay_core import crypto
from relay_core.config import load_settings
from relay_core.store import Store
from support import relay_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return relay_env(tmp_path / "data")


@pytest.fixture
def store_of(tmp_path: Path) -> Iterator[Any]:
    """Open the store the CLI wrote, in-process, after the commands ran."""
    opened: list[Store] = []

    def open_store(env: dict[str, str]) -> Store:
        settings = load_settings({k: v for k, v in env.items() if k.startswith("RELAY_")})
        store = Store(settings.db_path, crypto.derive_keys(settings))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()
