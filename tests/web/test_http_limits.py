"""The limits of relay_web.http_limits at their boundaries, on a real uvicorn server.

Starlette's TestClient calls the app without any HTTP protocol, so these run
uvicorn (uvloop, the relay's httptools protocol) in a thread on a loopback
port, with the real app and store, and speak HTTP over raw sockets: a test
can then send exactly N bytes of a head, or stop half-way through a body.
The deadlines are shortened (a subclass) so a test waits a second, not ten.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import uvicorn

from relay_core.config import Settings
from relay_core.options import parse_option
from relay_web.app import create_app
from relay_web import http_limits
from relay_web.http_limits import BUDGET_BODIES, HEAD_LIMIT, SMALL_BODY, LimitedHttpToolsProtocol, LogBudget
from support import RelayProcess, free_port, relay_env


class QuickDeadlines(LimitedHttpToolsProtocol):
    head_seconds = 1.0
    body_idle_seconds = 1.5


@dataclass
class Served:
    port: int
    key: str
    state: Any

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


@pytest.fixture(autouse=True)
def fresh_log_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_limits, "refusal_log", LogBudget())  # each test sees its own lines


@contextmanager
def serving(settings: Settings, protocol: type = QuickDeadlines, **options: str) -> Iterator[Served]:
    """The app served by uvicorn with ``protocol`` in this process, SMTP set (plus ``options``)."""
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), loop="uvloop", http=protocol,
                            log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # up to 30 s
            if server.started or not thread.is_alive():
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        state = app.state.relay
        values = {"smtp_host": "127.0.0.1", "smtp_port": "2525", "smtp_security": "none", **options}
        state.store.set_options({k: parse_option(k, v) for k, v in values.items()})
        yield Served(config.port, state.store.api_keys.reveal(), state)
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server hung up after it

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, then_closed: bool = True) -> Answer:
    """One HTTP response; with ``then_closed``, also whether the server closes the connection after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer (got {data!r})"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    closed = False
    if then_closed:
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
    return Answer(int(lines[0].split()[1]), headers, body, closed)


def head_of(size: int, path: str = "/healthz") -> bytes:
    """A GET whose head (request line, headers and the blank line) is exactly ``size`` bytes."""
    start = f"GET {path} HTTP/1.1\r\nHost: relay\r\nX-Pad: ".encode()
    end = b"\r\nConnection: close\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def send_request(key: str, body: bytes, length: int | None = None, extra: str = "") -> bytes:
    """The head of POST /api/send declaring ``length`` (the body's own by default), then ``body``."""
    declared = len(body) if length is None else length
    return (f"POST /api/send HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n{extra}\r\n").encode() + body


def message(size: int | None = None) -> bytes:
    """A valid send, padded with trailing spaces (still JSON) to ``size`` bytes."""
    text = json.dumps({"from_email": "noreply@example.org", "to": ["a@example.com"], "subject": "Hi",
                       "text": "Body"}).encode()
    return text if size is None else text + b" " * (size - len(text))


def relay_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("relay", "uvicorn")) and r.levelno >= logging.WARNING]


def only_line(caplog: pytest.LogCaptureFixture, event: str) -> logging.LogRecord:
    """The one warning the refusal logged: its event, no traceback, nothing else at WARNING or above."""
    records = relay_records(caplog)
    assert [getattr(r, "event", None) for r in records] == [event], [r.getMessage() for r in records]
    assert records[0].exc_info is None
    return records[0]


class FewConnections(QuickDeadlines):
    max_connections = 3


def test_connections_up_to_the_cap_are_served_and_one_more_is_503_at_once(settings: Settings,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings, protocol=FewConnections) as relay:
        idle = [relay.connect(), relay.connect()]  # held open, nothing sent
        try:
            time.sleep(0.2)  # accepted by the server before the next arrives
            with relay.connect() as third:  # the third of three: served
                third.sendall(head_of(200))
                assert read_answer(third).status == 200
            assert relay_records(caplog) == []
            time.sleep(0.2)
            third = relay.connect()
            time.sleep(0.2)
            fourth = relay.connect()  # while three are open: refused before a byte is read
            try:
                answer = read_answer(fourth)
            finally:
                third.close()
                fourth.close()
            assert answer.status == 503 and answer.closed and answer.headers["retry-after"] == "2"
            assert "as many connections open as it serves at once (3)" in answer.json()["error"]
            assert only_line(caplog, "web.head_refused").status == 503  # type: ignore[attr-defined]
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        with relay.connect() as sock:  # room again once they closed
            sock.sendall(head_of(200))
            assert read_answer(sock).status == 200


def test_a_head_at_the_limit_passes_and_one_byte_more_is_431(settings: Settings,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings) as relay:
        with relay.connect() as sock:
            sock.sendall(head_of(HEAD_LIMIT))
            assert read_answer(sock).status == 200
        assert relay_records(caplog) == []
        with relay.connect() as sock:
            sock.sendall(head_of(HEAD_LIMIT + 1))
            answer = read_answer(sock)
        assert answer.status == 431 and answer.closed
        assert answer.json() == {"ok": False, "error": f"The request's headers are larger than the relay accepts "
                                                       f"({HEAD_LIMIT} bytes)."}
        assert answer.headers["x-content-type-options"] == "nosniff"  # the security headers, as on every answer
        assert answer.headers["cache-control"] == "no-store"
        assert only_line(caplog, "web.head_refused").status == 431  # type: ignore[attr-defined]


def test_tspro_relay_web_serves_with_these_limits(tmp_path: Any) -> None:
    """The real `tspro-relay web` process (server.serve), not only the protocol class."""
    web = RelayProcess("web", relay_env(tmp_path / "data"), tmp_path, port=free_port()).start()
    try:
        with socket.create_connection(("127.0.0.1", web.port), timeout=30) as sock:
            sock.sendall(head_of(HEAD_LIMIT + 1))
            answer = read_answer(sock)
        assert answer.status == 431 and answer.closed
    finally:
        web.stop()
    assert web.output().count("with 431") == 1 and "Traceback" not in web.output()


def test_an_endless_header_line_is_cut_at_the_limit(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings) as relay, relay.connect() as sock:
        start = b"POST /api/send HTTP/1.1\r\nHost: relay\r\nX-Endless: "
        sock.sendall(start)
        left = HEAD_LIMIT + 1 - len(start)  # one byte over: the server reads all of it, then hangs up
        while left:
            sock.sendall(b"x" * min(1024, left))
            left -= min(1024, left)
        answer = read_answer(sock)
        assert answer.status == 431 and answer.closed
        assert answer.headers["content-type"] == "application/json; charset=utf-8"
        only_line(caplog, "web.head_refused")


def test_a_head_that_does_not_end_in_time_gets_408(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings) as relay, relay.connect() as sock:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: relay\r\n")
        answer = read_answer(sock)
        assert answer.status == 408 and answer.closed
        assert answer.body == b"The request's headers did not arrive within 1 seconds."
        assert only_line(caplog, "web.head_refused").status == 408  # type: ignore[attr-defined]


def test_a_connection_that_sends_nothing_is_closed_quietly(settings: Settings,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings) as relay, relay.connect() as sock:
        assert sock.recv(1) == b""  # closed at the head deadline: nothing was asked, nothing answered
    assert relay_records(caplog) == []


def test_a_body_that_keeps_moving_is_read_and_one_that_stops_is_closed(settings: Settings,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    body = message()
    with serving(settings) as relay:
        with relay.connect() as sock:
            sock.sendall(send_request(relay.key, b"", length=len(body)))
            for i in range(0, len(body), 10):  # ten bytes at a time, well within the idle limit
                time.sleep(0.2)
                sock.sendall(body[i:i + 10])
            assert read_answer(sock, then_closed=False).status == 202
        assert relay_records(caplog) == []
        with relay.connect() as sock:
            sock.sendall(send_request(relay.key, body[:10], length=len(body)))
            assert sock.recv(1) == b""  # closed, no answer: the client stopped sending
        only_line(caplog, "web.body_stalled")


def test_a_declared_length_over_the_cap_is_413_before_the_body(settings: Settings,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings, LimitedHttpToolsProtocol, max_attach_mb="0.01") as relay:
        cap = relay.state.store.options().max_body_bytes
        with relay.connect() as sock:
            sock.sendall(send_request(relay.key, message(cap)))
            assert read_answer(sock, then_closed=False).status == 202
            sock.sendall(send_request(relay.key, b"", length=cap + 1))  # and not a byte of the body
            answer = read_answer(sock, then_closed=False)
        assert answer.status == 413 and "larger than the relay accepts" in answer.json()["error"]
        assert [r.code for r in relay.state.store.log.entries(status="rejected")] == [413]
        assert relay_records(caplog) == []


def test_a_key_over_its_limit_is_429_before_the_body(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings, LimitedHttpToolsProtocol) as relay:
        _, limited = relay.state.store.api_keys.add("limited", 2, "")
        with relay.connect() as sock:
            for _ in range(2):
                sock.sendall(send_request(limited, message()))
                assert read_answer(sock, then_closed=False).status == 202
            sock.sendall(send_request(limited, b""))  # the portal's key check is still a 400
            assert read_answer(sock, then_closed=False).status == 400
            sock.sendall(send_request(limited, b"", length=30_000_000))  # declared, never sent
            answer = read_answer(sock, then_closed=False)
        assert answer.status == 429 and "reached its limit of 2 messages per hour" in answer.json()["error"]
        assert int(answer.headers["retry-after"]) > 0 and answer.headers["ratelimit-remaining"] == "0"
        assert [r.code for r in relay.state.store.log.entries(status="rejected")] == [400, 429]
        assert relay_records(caplog) == []


def test_the_body_budget_refuses_while_full_and_accepts_once_it_frees(settings: Settings,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings, LimitedHttpToolsProtocol, max_attach_mb="0.01") as relay:
        cap = relay.state.store.options().max_body_bytes
        room = SMALL_BODY + 100  # the smallest body that claims from the budget is SMALL_BODY + 1
        holders = [relay.connect() for _ in range(BUDGET_BODIES)]
        try:
            # Bodies declared but not yet sent hold all of the budget but ``room`` bytes.
            sizes = [cap] * (BUDGET_BODIES - 1) + [cap - room]
            for sock, size in zip(holders, sizes):
                sock.sendall(send_request(relay.key, b"{", length=size))
            with relay.connect() as sock:
                for _ in range(200):  # wait (bounded) until the server holds their claims
                    if relay.state.bodies.held == sum(sizes):
                        break
                    time.sleep(0.05)
                sock.sendall(send_request(relay.key, message(room + 1)))
                refused = read_answer(sock, then_closed=False)
                assert refused.status == 503 and refused.headers["retry-after"] == "2"
                assert "as many message bodies as it holds at once" in refused.json()["error"]
                sock.sendall(send_request(relay.key, message(room)))  # exactly what is left: accepted
                assert read_answer(sock, then_closed=False).status == 202
                sock.sendall(send_request(relay.key, message(SMALL_BODY)))  # a small body claims nothing
                assert read_answer(sock, then_closed=False).status == 202
                holders[0].sendall(message(cap)[1:])  # one holder finishes: its claim is freed
                assert read_answer(holders[0], then_closed=False).status == 202
                sock.sendall(send_request(relay.key, message(room + 1)))
                assert read_answer(sock, then_closed=False).status == 202
            assert [r.code for r in relay.state.store.log.entries(status="rejected")] == [503]
        finally:
            for sock in holders:
                sock.close()
        assert relay_records(caplog) == []


def test_a_body_still_arriving_after_the_answer_has_one_idle_period_in_all(settings: Settings,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    with serving(settings) as relay, relay.connect() as sock:
        sock.sendall(send_request("tsr_" + "w" * 43, b"{", length=1000))  # a wrong key: 401 before the body
        assert read_answer(sock, then_closed=False).status == 401
        for _ in range(100):  # a byte every 0.2 s keeps a body moving, but not past the answer's deadline
            time.sleep(0.2)
            try:
                sock.sendall(b" ")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    break
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the connection was still open after 20 s of a body nobody reads")
        assert "the rest of its body did not arrive" in only_line(caplog, "web.body_stalled").getMessage()


def test_refusal_lines_are_capped_per_minute_and_the_rest_counted(caplog: pytest.LogCaptureFixture) -> None:
    budget = LogBudget()
    for n in range(LogBudget.per_minute + 3):
        budget.warn("refused %d", n, event="web.head_refused")
    assert [r.getMessage() for r in caplog.records] == [f"refused {n}" for n in range(LogBudget.per_minute)]
    budget.minute -= 1  # as if a minute passed
    budget.warn("refused %d", 99, event="web.head_refused")
    assert caplog.records[-1].getMessage() == "refused 99 (and 3 more refused since the last such line)"


@pytest.mark.parametrize("path", ["/api/health", "/login"])
def test_a_request_the_parser_cannot_read_gets_400_with_the_security_headers(
        settings: Settings, path: str, caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn answers what httptools cannot parse itself ("Invalid HTTP request received."): that answer
    carries the security headers too, and the contract's JSON under /api/; its line is a budgeted one."""
    with serving(settings) as relay:
        with relay.connect() as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\nA header without its colon\r\n\r\n".encode())
            answer = read_answer(sock)
    assert answer.status == 400 and answer.closed
    assert only_line(caplog, "web.head_refused").status == 400  # type: ignore[attr-defined]
    for name, value in (("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"),
                        ("cache-control", "no-store"), ("referrer-policy", "same-origin")):
        assert answer.headers.get(name) == value, (name, answer.headers)
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    if path.startswith("/api/"):
        assert answer.headers["content-type"] == "application/json; charset=utf-8"
        assert answer.json() == {"ok": False, "error": "The relay could not read this HTTP request."}
    else:
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        assert answer.body == b"The relay could not read this HTTP request."
