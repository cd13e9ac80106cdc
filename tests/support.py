"""Real parts for the tests: an aiosmtpd server, test certificates, relay processes."""

from __future__ import annotations

import asyncio
import email
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Callable

import httpx
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

import captured_logs
from relay_core.config import load_settings
from relay_core.crypto import derive_keys
from relay_core.message import new_message_id, pack_stored, parse_payload
from relay_core.options import Options
from relay_core.store import NewMessage, Store, insert_message, transaction
from services import free_port

REPO = Path(__file__).resolve().parent.parent
SECRET = "test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"
SMTP_USER, SMTP_PASSWORD = "relayuser", "smtp-pass-Zq8!unique"
captured_logs.remember(SMTP_PASSWORD)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    auth: str | None
    helo: str | None = None  # the EHLO/HELO argument of the session

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.content, policy=policy.default)  # type: ignore[return-value]


@dataclass
class Behaviour:
    """What the server answers; tests change it between attempts."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)  # consumed in order, then 250
    mail_replies: list[str] = field(default_factory=list)
    delay: float = 0.0


class Handler:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.behaviour = Behaviour()
        self.lock = threading.Lock()
        self.attempt_times: list[float] = []
        self.sasl_tried: list[str] = []  # one per AUTH answered (auth_* names are mechanisms to aiosmtpd)
        self.resets = 0  # RSET commands received

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        with self.lock:
            if self.behaviour.mail_replies:
                return self.behaviour.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RSET(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.resets += 1
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        reply = self.behaviour.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.attempt_times.append(time.monotonic())
        if self.behaviour.delay:
            await asyncio.sleep(self.behaviour.delay)
        with self.lock:
            if self.behaviour.data_replies:
                return self.behaviour.data_replies.pop(0)
            login = session.auth_data.login.decode() if session.authenticated and session.auth_data else None
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content or envelope.content, login,
                                          session.host_name))
        return "250 2.0.0 Message accepted"


def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
    server.event_handler.sasl_tried.append(mechanism)
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == SMTP_USER.encode()
          and auth_data.password == SMTP_PASSWORD.encode())
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


class Certificates:
    """A test CA that the relay trusts (via SSL_CERT_FILE) and one it does not."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.ca_file = directory / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self, trusted: bool = True, names: tuple[str, ...] = ("127.0.0.1", "localhost")
                       ) -> ssl.SSLContext:
        ca = self.ca if trusted else self.other_ca
        cert = ca.issue_cert(*names)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        return context


class TrackingController(Controller):
    """Closes the connections it served on stop: the relay keeps its connection open
    for reuse, and aiosmtpd would otherwise leave that transport to the garbage collector."""

    def factory(self):  # type: ignore[no-untyped-def]
        protocol = super().factory()
        self.protocols = [*getattr(self, "protocols", []), protocol]
        return protocol

    def stop(self, no_assert: bool = False) -> None:
        done = threading.Event()

        def close_all() -> None:
            for protocol in getattr(self, "protocols", []):
                for transport in (protocol.transport, getattr(protocol, "_original_transport", None)):
                    if transport is not None:
                        transport.abort()
            self.loop.call_later(0.05, done.set)

        if self.loop.is_running():
            self.loop.call_soon_threadsafe(close_all)
            done.wait(2)
        super().stop(no_assert=no_assert)


class SmtpServer:
    """aiosmtpd on 127.0.0.1 in one of the three security modes, optionally with AUTH."""

    def __init__(self, mode: str = "none", certs: Certificates | None = None, auth: bool = False,
                 trusted: bool = True, cert_names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> None:
        self.mode = mode
        self.handler = Handler()
        self.port = free_port()
        kwargs: dict[str, Any] = {"hostname": "127.0.0.1", "port": self.port}
        if auth:
            kwargs.update(authenticator=authenticator, auth_required=True,
                          auth_require_tls=(mode == "starttls"))
        if mode == "starttls":
            assert certs is not None
            kwargs.update(tls_context=certs.server_context(trusted, cert_names), require_starttls=True)
        elif mode == "ssl":
            assert certs is not None
            kwargs.update(ssl_context=certs.server_context(trusted, cert_names))
        self.controller = TrackingController(self.handler, **kwargs)

    def __enter__(self) -> "SmtpServer":
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    @property
    def behaviour(self) -> Behaviour:
        return self.handler.behaviour

    def settings(self, auth: bool = False) -> list[str]:
        pairs = ["smtp_host=127.0.0.1", f"smtp_port={self.port}", f"smtp_security={self.mode}",
                 "smtp_timeout_seconds=10"]
        if auth:
            pairs += [f"smtp_username={SMTP_USER}", f"smtp_password={SMTP_PASSWORD}"]
        else:
            pairs += ["smtp_username=", "smtp_password="]
        return pairs


def relay_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({
        "RELAY_SECRET_KEY": SECRET,
        "RELAY_DATA_DIR": str(data_dir),
        "RELAY_ADMIN_USER": "admin",
        "RELAY_ADMIN_PASSWORD": "admin-pass-123",
        "RELAY_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        # Subprocesses run from tmp directories: make them import this checkout.
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, cwd: Path | None = None, input: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "relay_cli", *args], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=60, input=input)
    captured_logs.remember_keys_in(result.stdout)  # a key printed on purpose must never reach a log
    captured_logs.remember(*(a.partition("=")[2] for a in args if a.startswith("smtp_password=")))
    captured_logs.keep("cli " + " ".join(args[:2]), result.stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"tspro-relay {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


class RelayProcess:
    """`tspro-relay web`, `worker` or `run` (both) as a real subprocess, stopped on exit."""

    def __init__(self, role: str, env: dict[str, str], cwd: Path, port: int | None = None) -> None:
        self.role, self.env, self.cwd, self.port = role, env, cwd, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = cwd / f"{role}-{port or os.getpid()}-{time.monotonic_ns()}.log"
        captured_logs.register(self.log_path)

    def start(self) -> "RelayProcess":
        args = [sys.executable, "-m", "relay_cli", self.role]
        serves = self.role in ("web", "run")
        if serves:
            args += ["--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env=self.env, cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        if serves:
            wait_until(self._ready, timeout=30, what=f"{self.role} on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.role} exited early:\n{self.log_path.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def store_message(store: Store, created: float, to: list[str] | None = None) -> str:
    """Commit a queued message straight into the store, as the web does, but enqueue nothing:
    what a web process killed between its commit and its enqueue leaves behind."""
    payload = {"from_email": "noreply@example.org", "to": to or ["ann@example.com"], "subject": "s", "text": "t"}
    message = parse_payload(payload, Options())
    message_id = new_message_id()
    document = pack_stored(bytearray(json.dumps(payload).encode()), message)
    sealed = store.keys.encrypt_body(document, message_id)
    # As the portal's key sent it (the API answers a message's own key only).
    portal = next((k.id for k in store.api_keys.all() if k.is_primary and k.revoked_at is None), None)
    conn = store.conn()
    with transaction(conn):
        insert_message(conn, NewMessage.accepted(message, message_id, sealed, created, Options(), "api", portal))
    return message_id


def initialise_store(env: dict[str, str], admin_password: str | None = None) -> None:
    """What any command does first on a fresh store (migrate, seed the admin and the portal
    key), and optionally `admin set-password`, done in this process: the admin password's
    hash is then the session's cached one (conftest.py's ``hash_once``) instead of one
    (or two) per relay in a subprocess. Tests of those commands run the CLI itself."""
    settings = load_settings({k: v for k, v in env.items() if k.startswith("RELAY_")})
    store = Store.open(settings, derive_keys(settings))
    try:
        store.bootstrap(settings)
        if admin_password is not None:
            store.admin.set_password(settings.admin_user, admin_password)
    finally:
        store.shutdown()


class Relay:
    """A data directory with its web process and any number of worker processes."""

    def __init__(self, cwd: Path, **env: str) -> None:
        self.cwd = cwd
        self.env = relay_env(cwd / "data", **env)
        self.web: RelayProcess | None = None
        self.workers: list[RelayProcess] = []
        if not self.data_dir.exists():  # an existing one (an upgrade fixture) is opened by the CLI
            self._initialise()
        self.key = cli(self.env, "api-key", "show", cwd=cwd).stdout.strip()
        self.http = httpx.Client(timeout=30)
        self._pg: Any = None

    @property
    def data_dir(self) -> Path:
        return Path(self.env["RELAY_DATA_DIR"])

    def _initialise(self) -> None:
        initialise_store(self.env)

    def configure(self, *pairs: str) -> None:
        cli(self.env, "config", "set", *pairs, cwd=self.cwd)

    def start_web(self) -> RelayProcess:
        self.web = RelayProcess("web", self.env, self.cwd, port=self.web.port if self.web else free_port()).start()
        self.http.base_url = self.web.url
        return self.web

    def start_worker(self, **env: str) -> RelayProcess:
        worker = RelayProcess("worker", {**self.env, **env}, self.cwd).start()
        self.workers.append(worker)
        return worker

    @property
    def worker(self) -> RelayProcess:
        return self.workers[-1]

    def close(self) -> None:
        self.http.close()
        for proc in [*self.workers, *([self.web] if self.web else [])]:
            proc.stop()
        if self._pg is not None:
            self._pg.close()
            self._pg = None

    def send(self, payload: Any, **headers: str) -> httpx.Response:
        return self.http.post("/api/send", json=payload,
                              headers={"Authorization": f"Bearer {self.key}", **headers})

    def status(self, message_id: str, key: str | None = None) -> dict[str, Any]:
        """As the key that sent it sees it (``key``; the portal's by default): no other key is answered."""
        response = self.http.get(f"/api/messages/{message_id}",
                                 headers={"Authorization": f"Bearer {key or self.key}"})
        assert response.status_code == 200, response.text
        return response.json()

    def wait_status(self, message_id: str, *statuses: str, timeout: float = 30,
                    key: str | None = None) -> dict[str, Any]:
        return wait_until(lambda: (s := self.status(message_id, key))["status"] in statuses and s,
                          timeout=timeout, what=f"{message_id} to become {statuses}")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the relay's store directly (relay.db, or its PostgreSQL database), as an operator would."""
        url = self.env.get("RELAY_DATABASE_URL")
        if url:
            if self._pg is None:
                import psycopg
                self._pg = psycopg.connect(url, autocommit=True)
            return [tuple(r) for r in self._pg.execute(sql.replace("?", "%s"), params).fetchall()]
        conn = sqlite3.connect(str(self.data_dir / "relay.db"), timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, COUNT(*) FROM messages GROUP BY status"))  # type: ignore[arg-type]
