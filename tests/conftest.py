"""Shared fixtures: settings from a dict, a store in tmp_path, test certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from relay_core import crypto
from relay_core.config import Settings, load_settings
from relay_core.store import Store
from support import SECRET, Certificates


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "data"),
                          "RELAY_ADMIN_PASSWORD": "admin-pass-123"})


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = Store.open(settings, crypto.derive_keys(settings))
    store.bootstrap(settings)
    yield store
    store.close()
