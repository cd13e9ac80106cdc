"""Fixtures shared by the store tests in tests/core."""

from __future__ import annotations

from typing import Iterator

import pytest

from relay_core.config import Settings
from relay_core.store import Store, open_database


@pytest.fixture
def other(store: Store, settings: Settings) -> Iterator[Store]:
    """Another process's store on the same database (connections, and on PostgreSQL a pool, of its own)."""
    other = Store(open_database(settings), store.keys)
    yield other
    other.shutdown()
