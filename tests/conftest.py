"""Shared fixtures: settings from a dict, a store in tmp_path, test certificates,
and the real servers the PostgreSQL backend runs against.

``backend`` is "sqlite" unless a module overrides it with a parametrised
fixture of the same name (see tests/core/test_store.py): then ``settings``
and ``store`` point at a fresh PostgreSQL database in the session's
throwaway cluster, and ``backend_env`` gives relay processes the
RELAY_DATABASE_URL and RELAY_QUEUE_URL (Redis) they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from relay_core import crypto
from relay_core.config import Settings, load_settings
from relay_core.store import Store
from services import PostgresCluster, RedisServer
from support import SECRET, Certificates

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test."""
    name, url = pg_cluster.create_database()
    yield url
    pg_cluster.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """An empty database of the session's redis-server, for this test."""
    return redis_server.fresh_url()


@pytest.fixture(scope="session")
def backend() -> str:
    return "sqlite"


@pytest.fixture
def backend_env(backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """What a relay process needs in its environment to use ``backend``."""
    if backend == "sqlite":
        return {}
    return {"RELAY_DATABASE_URL": request.getfixturevalue("pg_url"),
            "RELAY_QUEUE_URL": request.getfixturevalue("redis_url")}


@pytest.fixture(scope="module")
def module_backend_env(backend: str, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """``backend_env`` for a module's shared relay: one database and queue for the whole module."""
    if backend == "sqlite":
        yield {}
        return
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    redis: RedisServer = request.getfixturevalue("redis_server")
    name, url = cluster.create_database()
    yield {"RELAY_DATABASE_URL": url, "RELAY_QUEUE_URL": redis.fresh_url()}
    cluster.drop_database(name)


@pytest.fixture
def settings(tmp_path: Path, backend_env: dict[str, str]) -> Settings:
    return load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "data"),
                          "RELAY_ADMIN_PASSWORD": "admin-pass-123", **backend_env})


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = Store.open(settings, crypto.derive_keys(settings))
    store.bootstrap(settings)
    yield store
    store.shutdown()
