"""Fixtures for the container tests: one Docker engine per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from engine import Engine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    engine = Engine.start()
    try:
        yield engine
    finally:
        engine.stop()

