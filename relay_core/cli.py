"""`tspro-relay`: run the processes and administer the relay from a shell.

Every command reads RELAY_* from the environment and from `.env` in the
working directory (the environment wins), and any command that touches the
store initialises a fresh data directory first (migrations, first-boot
seeds), so `config set` works before `web` has ever run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence, cast

from . import backup, crypto, health
from .config import ConfigError, Settings, load_settings
from .db import StoreInUse
from .errors import RelayError
from .options import OPTION_NAMES, SECRET_OPTIONS, parse_option, to_text
from .store import Store


def _fail(message: str, code: int = 1) -> int:
    print(f"tspro-relay: {message}", file=sys.stderr)
    return code


def _act_as_data_owner(settings: Settings) -> None:
    """As root, act as the user who owns the data directory.

    In the container the relay runs as an unprivileged user, while `docker
    compose exec web tspro-relay ...` runs as root; a root-owned relay.db-wal,
    queue.db or backup left in the data directory would lock the relay out of
    its own files. Switching to the directory's owner first prevents that.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    try:
        owner = settings.data_dir.stat()
    except OSError:
        return
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


def _open_store(settings: Settings) -> Store:
    store = Store.open(settings, crypto.derive_keys(settings))
    report = store.bootstrap(settings)
    if report.admin_password_generated:
        print(f"Created the admin account {settings.admin_user!r} with the password "
              f"{report.admin_password_generated} (change it after signing in).", file=sys.stderr)
    return store


# -- processes -------------------------------------------------------------------
def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    from relay_web.server import serve
    return serve(settings, args.host, args.port)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from relay_worker.consumer import main as worker_main
    return worker_main(settings)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Web and worker as two child processes; Ctrl-C or SIGTERM stops both cleanly."""
    from .tasks import check_queue
    check_queue(settings)
    _open_store(settings).shutdown()  # migrate and seed once, before two processes race to
    base = [sys.executable, "-m", "relay_core.cli"]
    # Own sessions: Ctrl-C in a terminal signals the whole foreground group, and a
    # second SIGINT can turn the worker's graceful stop into an immediate one.
    children = [
        subprocess.Popen([*base, "web", "--host", args.host, "--port", str(args.port)], start_new_session=True),
        subprocess.Popen([*base, "worker"], start_new_session=True),
    ]
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(signum, forward)
    print(f"TS Pro Relay is running on http://{args.host}:{args.port} (Ctrl-C stops it).", file=sys.stderr)
    code = 0
    while any(child.poll() is None for child in children):
        for child in children:
            if child.poll() is not None and not stopping:
                print("tspro-relay: one process stopped; stopping the other.", file=sys.stderr)
                code = child.returncode or 1
                forward(signal.SIGINT, None)
        time.sleep(0.2)
    return code


# -- setup -------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists():
        if args.if_missing:
            print(f"{path} already exists; keeping it.", file=sys.stderr)
            return 0
        return _fail(f"{path} already exists; not overwriting it.")
    password = crypto.new_password()
    text = (
        "# TS Pro Relay settings, written by `tspro-relay init`. Keep this file private.\n"
        "# Signs login sessions and encrypts the stored SMTP password, API keys and queued mail.\n"
        "# Changing it makes those unreadable: keep it stable and back it up.\n"
        f"RELAY_SECRET_KEY={crypto.new_password() + crypto.new_password() + crypto.new_password()}\n"
        "\n"
        "# First-boot admin login, used only to create the admin account.\n"
        "RELAY_ADMIN_USER=admin\n"
        f"RELAY_ADMIN_PASSWORD={password}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    print(f"Wrote {path} (mode 600). Admin login: admin / {password}")
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    store = _open_store(settings)
    if args.action == "set":
        if not args.pairs:
            return _fail("config set needs at least one key=value.")
        values = {}
        for pair in args.pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                return _fail(f"{pair!r} is not key=value.")
            try:
                values[name.strip()] = parse_option(name.strip(), value)
            except RelayError as exc:
                return _fail(exc.message)
        try:
            store.set_options(values)
        except RelayError as exc:
            return _fail(exc.message)
        print(f"Saved {', '.join(values)}.")
        return 0
    options = store.options()
    shown = {}
    for name in OPTION_NAMES:
        value = getattr(options, name)
        shown[name] = ("********" if value else "") if name in SECRET_OPTIONS else value
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        for name, value in shown.items():
            print(f"{name} = {to_text(value)}")
    return 0


def cmd_api_key(args: argparse.Namespace, settings: Settings) -> int:
    store = _open_store(settings)
    if args.action == "show":
        print(store.reveal_api_key())
    elif args.action == "new":
        print(store.new_primary_api_key())
    elif args.action == "add":
        key_id, secret = store.add_api_key(args.label)
        print(secret)
        print(f"Added key {key_id} ({args.label}).", file=sys.stderr)
    elif args.action == "list":
        for key in store.api_keys():
            state = "revoked" if key.revoked_at else "active"
            kind = "portal" if key.is_primary else "extra"
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.created_at))
            print(f"{key.id}\t{key.label}\t{kind}\t{state}\t{created}")
    elif args.action == "revoke":
        if not store.revoke_api_key(args.id):
            return _fail(f"No active API key with id {args.id}.")
        print(f"Revoked key {args.id}.")
    return 0


def cmd_send_test(args: argparse.Namespace, settings: Settings) -> int:
    from .sending import enqueue_test_message
    store = _open_store(settings)
    try:
        message_id = enqueue_test_message(store, settings, args.to)
    except RelayError as exc:
        return _fail(exc.message)
    print(message_id)
    print(f"Queued a test email to {args.to}; the worker delivers it and the transaction log shows the "
          "outcome.", file=sys.stderr)
    return 0


def cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    store = _open_store(settings)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    if password is None:
        import getpass
        password = getpass.getpass("New admin password: ")
        if password != getpass.getpass("Again: "):
            return _fail("The passwords do not match; nothing changed.")
    if len(password) < 8:
        return _fail("Use a password of at least 8 characters; nothing changed.")
    store.set_admin_password(args.username or settings.admin_user, password)
    print("Admin password changed.")
    return 0


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url:
        return _fail("the store is in PostgreSQL (RELAY_DATABASE_URL): back it up with pg_dump; "
                     "backup copies relay.db only.")
    store = _open_store(settings)
    target = Path(args.file)
    if target.exists():
        return _fail(f"{target} already exists; not overwriting it.")
    try:
        backup.backup(cast(sqlite3.Connection, store.conn()), target)
    except backup.BackupError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {target} ({exc.strerror}); nothing was backed up.")
    print(f"Backed up {settings.db_path} to {target}. Keep RELAY_SECRET_KEY with it: the backup is "
          "unreadable without it.")
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url:
        return _fail("the store is in PostgreSQL (RELAY_DATABASE_URL): restore it with pg_restore; "
                     "restore replaces relay.db only.")
    try:
        restored = backup.restore(settings, Path(args.file))
    except backup.RestoreRefused as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"the restore failed ({exc}); the data directory was left as it was.")
    print(f"Restored {settings.db_path} from {args.file} (schema {restored.schema_version}, "
          f"{restored.messages} messages, {restored.waiting} waiting to be delivered).")
    if restored.kept is not None:
        print(f"The database it replaced is kept as {restored.kept}.")
    print("Start the relay: its workers deliver the waiting messages.")
    return 0


def cmd_migrate_store(args: argparse.Namespace, settings: Settings) -> int:
    from .config import parse_database_url
    from .transfer import TransferRefused, copy_store
    target = parse_database_url(args.to, "--to")
    assert target is not None
    try:
        report = copy_store(settings, str(target))
    except TransferRefused as exc:
        return _fail(f"migrate-store: {exc}")
    print(f"Copied {settings.db_path} into {report.target}:")
    width = max(map(len, report.tables), default=0)
    for table, count in report.tables.items():
        print(f"  {table:<{width}}  {count} row(s)")
    waiting = sum(n for status, n in report.messages.items() if status in ("queued", "deferred", "sending"))
    shown = ", ".join(f"{n} {status}" for status, n in report.messages.items()) or "none"
    print(f"Messages: {shown} ({waiting} waiting for delivery).")
    print(f"{settings.db_path} is unchanged apart from a mark that stops relay processes from using it again. "
          "Next: set RELAY_DATABASE_URL and RELAY_QUEUE_URL=redis://... for every process, then start them.")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Web: /healthz answers. --worker: the heartbeat in the store, no web needed. --auto: PID 1's role."""
    def settings() -> Settings:
        loaded = load_settings()
        _act_as_data_owner(loaded)
        return loaded

    try:
        if args.auto:
            health.check_auto(settings)
        elif args.worker:
            health.check_worker(settings())
        else:
            health.check_web(args.url)
    except health.Unhealthy as exc:
        return _fail(str(exc))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tspro-relay", description="TS Pro Relay: HTTP-to-SMTP email relay.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_text in (("run", "web and worker together (the quick start)"),
                            ("web", "the web process: API and admin UI")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--host", default="0.0.0.0")
        p.add_argument("--port", type=int, default=8000)
    sub.add_parser("worker", help="the delivery worker (Huey consumer)")

    p = sub.add_parser("init", help="write a .env with a fresh secret and admin password")
    p.add_argument("--path", default=".env")
    p.add_argument("--if-missing", action="store_true", help="succeed quietly when the file exists")

    p = sub.add_parser("config", help="show or change the relay's settings")
    config_sub = p.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="one `key = value` line per setting, secrets masked")
    show.add_argument("--json", action="store_true")
    setter = config_sub.add_parser("set", help="key=value ... (all or nothing)")
    setter.add_argument("pairs", nargs="*", metavar="key=value")

    p = sub.add_parser("api-key", help="the portal's API key and extra named keys")
    key_sub = p.add_subparsers(dest="action", required=True)
    key_sub.add_parser("show", help="print the portal's key")
    key_sub.add_parser("new", help="replace the portal's key (the old one stops working at once)")
    add = key_sub.add_parser("add", help="add an extra named key")
    add.add_argument("--label", required=True)
    key_sub.add_parser("list", help="list keys (never their values)")
    revoke = key_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", type=int)

    p = sub.add_parser("send-test", help="queue a test email")
    p.add_argument("--to", required=True)

    p = sub.add_parser("admin", help="administer the admin login")
    admin_sub = p.add_subparsers(dest="action", required=True)
    setpw = admin_sub.add_parser("set-password", help="reset the admin password")
    setpw.add_argument("--username", default="")
    setpw.add_argument("--password-stdin", action="store_true", help="read the new password from stdin")

    p = sub.add_parser("backup", help="a consistent copy of relay.db, safe while running")
    p.add_argument("file")

    p = sub.add_parser("migrate-store", help="copy the SQLite store into an empty PostgreSQL database")
    p.add_argument("--to", required=True, metavar="postgresql://user:password@host:5432/dbname")

    p = sub.add_parser("restore", help="replace relay.db with a backup (every relay process stopped)")
    p.add_argument("file", help="a file made by `tspro-relay backup`")

    p = sub.add_parser("healthcheck", help="exit 0 when the web process answers, or a worker is alive")
    p.add_argument("--url", default="http://127.0.0.1:8000/healthz", help="the web process's /healthz")
    role = p.add_mutually_exclusive_group()
    role.add_argument("--worker", action="store_true",
                      help="check the worker's heartbeat in the store instead (no web process needed)")
    role.add_argument("--auto", action="store_true",
                      help="check whatever this container's main process runs (web, worker or both)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return cmd_init(args)
    try:
        if args.command == "healthcheck":
            return cmd_healthcheck(args)
        settings = load_settings()
        _act_as_data_owner(settings)
        return _dispatch(args, settings)
    except (ConfigError, StoreInUse) as exc:
        return _fail(str(exc), 2)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    handlers = {
        "run": cmd_run, "web": cmd_web, "worker": cmd_worker, "config": cmd_config,
        "api-key": cmd_api_key, "send-test": cmd_send_test, "admin": cmd_admin,
        "backup": cmd_backup, "restore": cmd_restore, "migrate-store": cmd_migrate_store,
    }
    return handlers[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
