"""Shared fixtures: settings from a dict, a store in tmp_path, test certificates,
and the real servers the PostgreSQL backend runs against.

``backend`` is "sqlite"; a module marked ``pytestmark = pytest.mark.backends``
runs each of its tests that uses it (through ``settings``, ``store``,
``backend_env`` or itself) on "sqlite" and on "postgresql": then
``settings`` and ``store`` point at a fresh PostgreSQL database in the
session's throwaway cluster, and ``backend_env`` gives relay processes the
RELAY_DATABASE_URL and RELAY_QUEUE_URL (Redis) they need. The module's
tests run on SQLite first, then on PostgreSQL, so a module-scoped relay
starts once per backend.

Inside the test process, each admin password is hashed once per session and
each (password, hash) pair verified once (``hash_once``): one Argon2id costs
~30 ms of a CPU here, and hundreds of stores and sign-ins would pay it for
the same password over and over. The hashes are real ones at full strength;
only their salt repeats between tests. Relay processes the tests start are
untouched.

At the end of every run, every log the session captured (relay processes,
CLI stderr, records logged in this process: see ``captured_logs.py``) is
searched for the API keys and SMTP passwords the suite used; one found fails
the run. Under pytest-xdist (``-n 4 --dist loadfile``, as .ci/run runs it)
the controller does that scan once, over every worker's logs and secrets.

Each xdist worker starts its own PostgreSQL cluster and redis-server (fresh
directories, ports from its own block: ``services.free_port``). A test file
runs on one worker, so its module-scoped relay or browser starts once; the
Docker tests share one engine and run on one worker together.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import captured_logs

from relay_core import crypto
from relay_core.config import Settings, load_settings
from relay_core.store import Store
from services import PostgresCluster, RedisServer
from support import SECRET, Certificates

BACKENDS = ["sqlite", "postgresql"]


# -- no secret in any log -----------------------------------------------------------------------
_HANDLER = pytest.StashKey[logging.Handler]()


def pytest_configure(config: pytest.Config) -> None:
    """Records logged inside the test process go to a file the final scan reads too."""
    workerinput = getattr(config, "workerinput", None)  # set in a pytest-xdist worker
    if workerinput is not None:
        captured_logs.use_directory(Path(workerinput["captured_logs"]))
    handler = logging.FileHandler(captured_logs.directory() / f"in-process-{captured_logs.WORKER}.log",
                                  encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    config.stash[_HANDLER] = handler


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """The controller's side of an xdist worker: the worker keeps its output in our directory."""
    node.workerinput["captured_logs"] = str(captured_logs.directory())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """A worker finished: its logs and secrets join the final scan."""
    captured_logs.merge(node.workerinput["workerid"], getattr(node, "workeroutput", {}).get("captured_logs"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when any captured log holds an API key or SMTP password the suite used
    (in an xdist worker: hand what it captured to the controller, which scans)."""
    handler = session.config.stash.get(_HANDLER, None)
    if handler is not None:
        handler.flush()
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["captured_logs"] = captured_logs.export()  # type: ignore[attr-defined]
        return
    read, leaks = captured_logs.scan()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")  # after the progress dots
    if leaks:
        if reporter is not None:
            reporter.write_line(f"SECRETS IN LOGS: {len(leaks)} leak(s) in the {read} captured logs:", red=True)
            for line in leaks:
                reporter.write_line("  " + line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line(f"captured logs: {read} read, no API key or SMTP password in any "
                            f"({len(captured_logs.secrets())} secrets looked for)")


# -- which tests share a worker --------------------------------------------------------------------
IN_PROCESS = {"core", "web"}  # test directories whose tests seldom start a process: many and quick


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with tests/docker as one file, and the slow files handed out first.

    A file's tests stay on one worker, so its module-scoped relay or browser starts once; the Docker
    tests share one engine (a second one would build its images from scratch). The Docker tests go
    first (the longest unit), then the files that start relay processes, and the many quick
    in-process files last, where they even out the workers' ends. (xdist_group marks cannot say
    this: xdist 3.8 sets them through a node attribute that pytest 9.2 no longer reads.)
    """
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "tests/docker" if Path(path).parent.name == "docker" else path

        def _assign_work_unit(self, node: Any) -> None:
            def rank(scope: str) -> int:
                folder = Path(scope).parent.name if scope != "tests/docker" else "docker"
                return 0 if folder == "docker" else 2 if folder in IN_PROCESS else 1

            first = min(self.workqueue, key=rank)  # the first of its rank: larger files before smaller
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return ByFile(config, log)


@pytest.fixture(scope="session", autouse=True)
def hash_once() -> Iterator[None]:
    """``crypto.hash_password`` and ``verify_password``, as the relay's modules call them,
    computed once per password (and pair) for the session.

    A module that imported the functions by name before the session began (test_config's
    own hashing test) keeps the real ones, so a fresh salt per hash is still shown there.
    """
    real_hash, real_verify = crypto.hash_password, crypto.verify_password
    hashes: dict[str, str] = {}
    verdicts: dict[tuple[str, str], bool] = {}
    lock = threading.Lock()

    def hash_password(password: str) -> str:
        with lock:
            known = hashes.get(password)
        if known is None:
            known = real_hash(password)
            with lock:
                known = hashes.setdefault(password, known)
        return known

    def verify_password(password: str, encoded: str) -> bool:
        with lock:
            known = verdicts.get((password, encoded))
        if known is None:
            known = real_verify(password, encoded)
            with lock:
                verdicts[(password, encoded)] = known
        return known

    crypto.hash_password, crypto.verify_password = hash_password, verify_password  # type: ignore[assignment]
    try:
        yield
    finally:
        crypto.hash_password, crypto.verify_password = real_hash, real_verify  # type: ignore[assignment]


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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``pytest.mark.backends``: ``backend`` takes each of BACKENDS, module by module (a test that
    parametrises ``backend`` itself, to run on one of them only, keeps its own)."""
    if ("backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("backends")
            and not _parametrizes(metafunc, "backend")):
        metafunc.parametrize("backend", BACKENDS, scope="module")


def _parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if name in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return True
    return False


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
