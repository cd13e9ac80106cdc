"""`tspro-relay run`, `web`, `worker` and `reload`: starting the relay's processes.

`run` and `web` bind the port here, migrate once, then exec into the
supervisor (relay_web/supervisor.py), which holds the socket and starts the
web process (`web --fd`) and the worker as children.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from typing import Callable

from relay_core.config import Settings, is_shared_queue
from relay_core.logs import setup_logging

from .shared import fail, open_store

LISTEN_BACKLOG = 1024  # connections that wait for a web process while one is (re)starting


def listen(host: str, port: int) -> socket.socket | str:
    """The listening socket for host:port, or why there can be none (SO_REUSEADDR as uvicorn sets it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host!r}: {exc.strerror}."
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return f"port {port} is in use; pass --port to choose another."
        return f"cannot listen on {host}:{port}: {exc.strerror}."
    return sock


def leave_out_unused_drivers(settings: Settings) -> None:
    """Keep huey from loading the Redis and PostgreSQL clients a relay does not use.

    huey.storage imports them whenever they are installed: about 25 MiB and 250
    modules per process for nothing on a relay with queue.db and relay.db.
    """
    if not is_shared_queue(settings.queue_url):
        sys.modules.setdefault("redis", None)  # type: ignore[arg-type]
    if settings.database_url is None:
        sys.modules.setdefault("psycopg", None)  # type: ignore[arg-type]


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    leave_out_unused_drivers(settings)
    if args.fd is not None:  # started by the supervisor: serve on the socket it holds
        from relay_web.server import serve
        return serve(settings, socket.socket(fileno=args.fd), args.ready_fd)
    return _supervise(args, settings, with_worker=False)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    leave_out_unused_drivers(settings)
    from relay_worker.consumer import main as worker_main
    return worker_main(settings)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    return _supervise(args, settings, with_worker=True)


def _supervise(args: argparse.Namespace, settings: Settings, with_worker: bool) -> int:
    """Bind the socket, check the queue and migrate once, then become the supervisor (relay_web/supervisor.py)."""
    sock = listen(args.host, args.port)
    if isinstance(sock, str):  # before anything starts: no worker without its web process
        return fail(sock)
    from relay_core.tasks import check_queue
    check_queue(settings)
    setup_logging(settings)  # for the line saying which migrations ran, on an upgrade
    open_store(settings).shutdown()  # migrate and seed once, before two processes race to
    stops = "Ctrl-C stops it" if sys.stderr.isatty() else "SIGTERM stops it"
    from relay_web import supervisor
    supervisor.JSON_LOGS = settings.log_format == "json"
    supervisor.say(f"TS Pro Relay is {'running' if with_worker else 'serving'} on http://{args.host}:{args.port} "
                   f"({stops}; `tspro-relay reload` reloads it).", "supervisor.started")
    sock.set_inheritable(True)
    # exec, not a child: the parent that stays for the relay's lifetime then holds none of this
    # process's imports (the store, the queue), only the socket.
    # Its command line keeps the role and port (`healthcheck --auto` and `reload` read them).
    os.execv(sys.executable, [sys.executable, "-m", "relay_web.supervisor", "run" if with_worker else "web",
                              "--port", str(args.port), "--fd", str(sock.fileno()),
                              *(["--json-logs"] if settings.log_format == "json" else [])])


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to every `run` and `web` of this user (on --port only, when given)."""
    from relay_web.supervisor import find_supervisors
    found = find_supervisors(args.port)
    if not found:
        where = f" on port {args.port}" if args.port else ""
        return fail(f"no running `tspro-relay run` or `web`{where} was found to reload.")
    code = 0
    for pid, port in found:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            code = fail(f"cannot signal the relay on port {port} (process {pid}): {exc.strerror}.")
            continue
        print(f"Asked the relay on port {port} (process {pid}) to reload; its log says when it has.")
    return code


def register(sub: argparse._SubParsersAction, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    for name, summary, description in (
            ("run", "web and worker together (the quick start)",
             "Run the web process (API and admin UI) and a delivery worker as two child processes. "
             "Ctrl-C or SIGTERM stops both, letting deliveries in flight finish."),
            ("web", "the web process: API and admin UI",
             "Serve the portal's JSON API and the admin UI. Containers pass --host 0.0.0.0.")):
        p = add_command(sub, name, summary, description)
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
        p.add_argument("--port", type=int, default=8000, help="port to listen on")
        p.set_defaults(handler=cmd_run if name == "run" else cmd_web)
        if name == "web":  # how `run` hands its socket to the web process it starts
            p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
            p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    add_command(sub, "worker", "the delivery worker (Huey consumer)",
                "Deliver queued mail: claim, send over SMTP, record every attempt. Run as many as you "
                "like; SIGINT and SIGTERM finish deliveries in flight.").set_defaults(handler=cmd_worker)

    p = add_command(sub, "reload", "start new web and worker processes without closing the port",
                    "Send SIGHUP to the running `tspro-relay run` or `web` of this user (or this container): "
                    "it starts a new web process with the code and settings now on disk on the same "
                    "socket, stops the old one once the new one serves, and replaces the worker after its "
                    "deliveries in flight. No connection is refused meanwhile. A new process that fails to "
                    "start leaves the old one serving; the relay's log says why.")
    p.add_argument("--port", type=int, help="only the relay serving this port")
    p.set_defaults(handler=cmd_reload, needs_settings=False)
