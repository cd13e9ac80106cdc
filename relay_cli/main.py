"""`tspro-relay`: the parser and the commands that administer the relay (starting it: processes.py).

Any command that touches the store initialises a fresh data directory first
(migrations, first-boot seeds), so `config set` works before `web` has ever
run. Adding a command: docs/contributing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Sequence, cast

from relay_core import __version__, crypto, health
from relay_core.maintenance import backup
from relay_core.config import ConfigError, Settings, load_settings
from relay_core.db import StoreInUse
from relay_core.errors import RelayError
from relay_core.store.limits import effective_limit
from relay_core.store.audit import COMMAND_LINE
from relay_core.logs import ControlEscaping
from relay_core.passwords import password_problem
from relay_core.options import (HELP, OPTION_NAMES, SECRET_OPTIONS, Options, describe_changes, parse_allowlist,
                                parse_option, parse_per_hour, to_text)
from relay_core.store import ApiKey, Store

from . import inspect_commands, processes, smtp_commands
from .shared import fail, open_store


def _act_as_data_owner(settings: Settings) -> None:
    """As root, act as the user who owns the data directory: `docker compose exec` runs as root,
    and a root-owned relay.db-wal or backup left there would lock the relay out of its files."""
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


# -- setup -------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists():
        if args.if_missing:
            print(f"{path} already exists; keeping it.", file=sys.stderr)
            return 0
        return fail(f"{path} already exists; not overwriting it.")
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
    store = open_store(settings)
    if args.action == "set":
        if not args.pairs:
            return fail("config set needs at least one key=value.")
        values = {}
        for pair in args.pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                return fail(f"{pair!r} is not key=value.")
            try:
                values[name.strip()] = parse_option(name.strip(), value)
            except RelayError as exc:
                return fail(exc.message)
        detail = describe_changes(store.options(), values)
        try:
            store.set_options(values, (*COMMAND_LINE, "settings.cli", detail) if detail else None)
        except RelayError as exc:
            return fail(exc.message)
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
    store = open_store(settings)
    if args.action == "show":
        print(store.api_keys.reveal())
    elif args.action == "new":
        print(store.api_keys.new_primary())
        store.log.record_audit(*COMMAND_LINE, "api_key.new", "generated a new portal key (the old one stopped working)")
    elif args.action == "add":
        try:
            per_hour, allowed = _key_limits(args)
        except RelayError as exc:
            return fail(exc.message)
        key_id, secret = store.api_keys.add(args.label, per_hour if isinstance(per_hour, int) else None, allowed or "")
        print(secret)
        print(f"Added key {key_id} ({args.label}).", file=sys.stderr)
        store.log.record_audit(*COMMAND_LINE, "api_key.add", f"added the API key “{args.label}”")
    elif args.action == "set":
        try:
            per_hour, allowed = _key_limits(args)
        except RelayError as exc:
            return fail(exc.message)
        if per_hour == "keep" and allowed is None:
            return fail("api-key set needs --per-hour and/or --allowed-from; nothing changed.")
        if not store.api_keys.set_limits(args.id, per_hour=per_hour, allowed_from=allowed):
            return fail(f"No active API key with id {args.id}; nothing changed.")
        key = next(k for k in store.api_keys.all() if k.id == args.id)
        print(f"Key {key.id} ({key.label}): {_describe_limits(key, store.options(), settings)}.")
    elif args.action == "list":
        options = store.options()
        for key in store.api_keys.all():
            state = "revoked" if key.revoked_at else "active"
            kind = "portal" if key.is_primary else "extra"
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.created_at))
            print(f"{key.id}\t{key.label}\t{kind}\t{state}\t{created}\t{_describe_limits(key, options, settings)}")
    elif args.action == "revoke":
        label = next((k.label for k in store.api_keys.all() if k.id == args.id), "")
        if not store.api_keys.revoke(args.id):
            return fail(f"No active API key with id {args.id}.")
        store.log.record_audit(*COMMAND_LINE, "api_key.revoke", f"revoked the API key “{label}”")
        print(f"Revoked key {args.id}.")
    return 0


def _key_limits(args: argparse.Namespace) -> tuple[int | None | str, str | None]:
    """--per-hour and --allowed-from, validated ("keep" / None where not given)."""
    per_hour: int | None | str = "keep"
    if args.per_hour is not None:
        per_hour = parse_per_hour("--per-hour", args.per_hour)
    allowed = parse_allowlist("--allowed-from", args.allowed_from) if args.allowed_from is not None else None
    return per_hour, allowed


def _describe_limits(key: ApiKey, options: Options, settings: Settings) -> str:
    limit = effective_limit(key, options, settings.send_per_hour)
    text = f"{limit} sends per hour" if limit else "no send limit"
    if key.per_hour is None:
        text += " (the relay's default)"
    return text + (f"; From limited to {key.allowed_from}" if key.allowed_from else "")


def cmd_send_test(args: argparse.Namespace, settings: Settings) -> int:
    from relay_core.intake.sending import enqueue_test_message
    store = open_store(settings)
    options = store.options()
    if not options.smtp_configured:
        return fail("SMTP delivery is not configured yet (no smtp_host): set it first, for example "
                     "`tspro-relay config set smtp_host=smtp.example.org smtp_port=587 smtp_security=starttls "
                     "smtp_username=... smtp_password=...`.")
    if not options.default_from:
        return fail("The test needs a sender: set one with `tspro-relay config set "
                     "default_from=noreply@example.org`.")
    try:
        message_id = enqueue_test_message(store, settings, args.to)
    except RelayError as exc:
        return fail(exc.message)
    print(message_id)
    sys.stdout.flush()
    return _await_test(store, message_id, args.to, args.wait)


def _await_test(store: Store, message_id: str, to: str, wait: float) -> int:
    """Wait for the test email's first attempt and say how it went, with the server's words."""
    heartbeat = store.workers.last_heartbeat()
    if wait <= 0 or heartbeat is None or time.time() - heartbeat > health.HEARTBEAT_STALE_SECONDS:
        print(f"Queued a test email to {to}; no worker is running, so it waits in the queue until one "
              "starts (`tspro-relay log` shows the outcome).", file=sys.stderr)
        return 0
    print(f"Queued a test email to {to}; waiting for the worker (up to {wait:g} s)...", file=sys.stderr)
    deadline = time.monotonic() + wait
    while True:
        view = store.messages.status(message_id) or {}
        status = view.get("status")
        if status in ("sent", "partial", "deferred", "failed"):
            break
        if time.monotonic() > deadline:
            print(f"No outcome after {wait:g} s (the message is {status}); `tspro-relay status {message_id}` "
                  "shows it later.", file=sys.stderr)
            return 1
        time.sleep(0.2)
    if status == "sent":
        reply = next((f"{r['code']} {r['reply'] or ''}".strip() for r in view["recipients"] if r["code"]), "")
        print(f"Sent: the mail server answered {reply}.", file=sys.stderr)
        return 0
    print(f"{status.capitalize()}: {view.get('last_error') or 'no reason recorded'}", file=sys.stderr)
    return 1


def cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    if password is None:
        import getpass
        password = getpass.getpass("New admin password: ")
        if password != getpass.getpass("Again: "):
            return fail("The passwords do not match; nothing changed.")
    seed = settings.admin_password
    problem = password_problem(password, None if seed is None else str(seed))
    if problem:
        return fail(f"{problem} Nothing changed.")
    store.admin.set_password(args.username or settings.admin_user, password)
    print("Admin password changed.")
    return 0


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url:
        return fail("the store is in PostgreSQL (RELAY_DATABASE_URL): back it up with pg_dump; "
                     "backup copies relay.db only.")
    store = open_store(settings)
    target = Path(args.file)
    if target.exists():
        return fail(f"{target} already exists; not overwriting it.")
    try:
        backup.backup(cast(sqlite3.Connection, store.conn()), target)
    except backup.BackupError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {target} ({exc.strerror}); nothing was backed up.")
    print(f"Backed up {settings.db_path} to {target}. Keep RELAY_SECRET_KEY with it: the backup is "
          "unreadable without it.")
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url:
        return fail("the store is in PostgreSQL (RELAY_DATABASE_URL): restore it with pg_restore; "
                     "restore replaces relay.db only.")
    try:
        restored = backup.restore(settings, Path(args.file))
    except backup.RestoreRefused as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"the restore failed ({exc}); the data directory was left as it was.")
    print(f"Restored {settings.db_path} from {args.file} (schema {restored.schema_version}, "
          f"{restored.messages} messages, {restored.waiting} waiting to be delivered).")
    if restored.kept is not None:
        print(f"The database it replaced is kept as {restored.kept}.")
    print("Start the relay: its workers deliver the waiting messages.")
    return 0


def cmd_rotate_secret(args: argparse.Namespace, settings: Settings) -> int:
    from relay_core.maintenance.rotation import RotationError, rotate_secret
    store = open_store(settings)
    try:
        report = rotate_secret(settings, store)
    except RotationError as exc:
        return fail(str(exc))
    finally:
        store.shutdown()
    print(report.sentence())
    print("RELAY_SECRET_KEY_OLD can now be removed: restart every relay process with RELAY_SECRET_KEY alone. "
          "Admins sign in again (sessions were signed with the old secret).")
    return 0


def cmd_migrate_store(args: argparse.Namespace, settings: Settings) -> int:
    from relay_core.config import parse_database_url
    from relay_core.maintenance.transfer import TransferRefused, copy_store
    target = parse_database_url(args.to, "--to")
    assert target is not None
    try:
        report = copy_store(settings, str(target))
    except TransferRefused as exc:
        return fail(f"migrate-store: {exc}")
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
        return fail(str(exc))
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every real default shown after its option's help; descriptions and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help  # a flag that is off, or no default: nothing worth saying
        return super()._get_help_string(action)


def dotenv_note() -> str:
    return (f"Settings: RELAY_* variables from the environment and from .env in the working directory "
            f"(now {Path.cwd() / '.env'}); the environment wins.")


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, description: str = "",
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A sub-command with its one-line summary, a description and the .env note in --help."""
    return sub.add_parser(name, help=summary, description=description or summary[0].upper() + summary[1:] + ".",
                          epilog=epilog or dotenv_note(), formatter_class=HelpFormatter)


def _config_keys_help() -> str:
    width = max(len(name) for name in OPTION_NAMES)
    lines = [f"  {name:<{width}}  {HELP[name]} (default: {to_text(getattr(Options(), name)) or 'empty'})"
             for name in OPTION_NAMES]
    return "settings:\n" + "\n".join(lines) + "\n\n" + dotenv_note()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tspro-relay", formatter_class=HelpFormatter, epilog=dotenv_note(),
        description="TS Pro Relay: takes the portal's email as JSON over HTTPS and delivers it over SMTP.")
    parser.add_argument("--version", action="version", version=f"tspro-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    processes.register(sub, add_command)

    p = add_command(sub, "init", "write a .env with a fresh secret and admin password",
                    "Write a .env (mode 600) with a fresh RELAY_SECRET_KEY and admin password. Never "
                    "overwrites an existing file.")
    p.add_argument("--path", default=".env", help="where to write it")
    p.add_argument("--if-missing", action="store_true", help="succeed quietly when the file exists")
    p.set_defaults(handler=cmd_init, needs_settings=False)

    p = add_command(sub, "config", "show or change the relay's settings",
                    "Show or change the settings kept in the database; running processes pick changes up "
                    "without a restart.")
    config_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = add_command(config_sub, "show", "one `key = value` line per setting, secrets masked")
    show.add_argument("--json", action="store_true", help="print one JSON object instead")
    setter = add_command(config_sub, "set", "change settings: key=value ... (all or nothing)",
                         "Change one or more settings. Every value is checked first; if any is refused, "
                         "nothing is saved.", epilog=_config_keys_help())
    setter.add_argument("pairs", nargs="*", metavar="key=value", help="settings to change (see below)")
    p.set_defaults(handler=cmd_config)

    p = add_command(sub, "api-key", "the portal's API key and extra named keys",
                    "Show or replace the portal's API key, or manage extra named keys for rotation.")
    key_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_command(key_sub, "show", "print the portal's key alone on one line")
    add_command(key_sub, "new", "replace the portal's key (the old one stops working at once)")
    add = add_command(key_sub, "add", "add an extra named key")
    add.add_argument("--label", required=True, help="a name to recognise the key by")
    key_set = add_command(key_sub, "set", "change a key's own send limit or Allowed From list",
                         "Give a key its own send limit (it replaces the relay's default for this key) and/or "
                         "its own Allowed From list (the relay's list still applies too).")
    key_set.add_argument("id", type=int, help="the key's id, from `api-key list`")
    for parser_ in (add, key_set):
        parser_.add_argument("--per-hour", metavar="N",
                             help="sends per hour for this key (0: unlimited; 'default': the relay's send_per_hour)")
        parser_.add_argument("--allowed-from", metavar="LIST",
                             help="comma-separated addresses or domains this key may send From (empty: no own list)")
    add_command(key_sub, "list", "list keys (never their values) with their limits")
    revoke = add_command(key_sub, "revoke", "revoke a key by id")
    revoke.add_argument("id", type=int, help="the key's id, from `api-key list`")
    p.set_defaults(handler=cmd_api_key)

    p = add_command(sub, "send-test", "queue a test email",
                    "Queue a test email from the Default From and, when a worker is running, wait for its "
                    "outcome (sent, or deferred or failed with the mail server's words).")
    p.add_argument("--to", required=True, help="recipient address")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the outcome when a worker is running (0: do not wait)")
    p.set_defaults(handler=cmd_send_test)

    p = add_command(sub, "admin", "administer the admin login")
    admin_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    setpw = add_command(admin_sub, "set-password", "reset the admin password")
    setpw.add_argument("--username", default="", help="the admin's user name (empty: RELAY_ADMIN_USER)")
    setpw.add_argument("--password-stdin", action="store_true", help="read the new password from stdin")
    p.set_defaults(handler=cmd_admin)

    p = add_command(sub, "backup", "a consistent copy of relay.db, safe while running",
                    "Write a consistent copy of relay.db (mode 600) while the relay runs.")
    p.add_argument("file", help="the copy to write (must not exist)")
    p.set_defaults(handler=cmd_backup)

    p = add_command(sub, "migrate-store", "copy the SQLite store into an empty PostgreSQL database",
                    "Copy relay.db (settings, keys, queued mail, the log) into an empty PostgreSQL database, "
                    "then mark relay.db so no relay process uses it again.")
    p.add_argument("--to", required=True, metavar="postgresql://user:password@host:5432/dbname",
                   help="the empty PostgreSQL database to copy into")
    p.set_defaults(handler=cmd_migrate_store)

    add_command(sub, "rotate-secret", "re-encrypt every stored secret and message with the new RELAY_SECRET_KEY",
                "Re-encrypt the SMTP password, the Turnstile secret, the OAuth client secret, refresh token and "
                "service account key, every API key (Reveal copy and lookup hash), "
                "the key check and every stored message body from RELAY_SECRET_KEY_OLD to RELAY_SECRET_KEY, in one "
                "transaction, while the relay runs (its processes restarted with both variables first). Prints "
                "how many items it rotated; afterwards RELAY_SECRET_KEY_OLD can be dropped.",
                ).set_defaults(handler=cmd_rotate_secret)

    p = add_command(sub, "restore", "replace relay.db with a backup (every relay process stopped)",
                    "Replace relay.db with a file made by `tspro-relay backup`, after checking it. Refuses "
                    "while any relay process holds the data directory.")
    p.add_argument("file", help="a file made by `tspro-relay backup`")
    p.set_defaults(handler=cmd_restore)

    p = add_command(sub, "healthcheck", "exit 0 when the web process answers, or a worker is alive",
                    "For container health checks: exit 0 when the web process answers /healthz, or with "
                    "--worker when this host's worker reported in the last minute (read from the store, no "
                    "web process needed), or with --auto whatever the container's main process runs.")
    p.add_argument("--url", default="http://127.0.0.1:8000/healthz", help="the web process's /healthz")
    role = p.add_mutually_exclusive_group()
    role.add_argument("--worker", action="store_true",
                      help="check the worker's heartbeat in the store instead (no web process needed)")
    role.add_argument("--auto", action="store_true",
                      help="check whatever this container's main process runs (web, worker or both)")
    p.set_defaults(handler=cmd_healthcheck, needs_settings=False)

    inspect_commands.register(sub, add_command)
    smtp_commands.register(sub, add_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Text a client sent (a field name, a subject) is printed as it came: never its control characters.
    if not isinstance(sys.stdout, ControlEscaping):
        sys.stdout, sys.stderr = ControlEscaping(sys.stdout), ControlEscaping(sys.stderr)
    try:
        args = build_parser().parse_args(argv)  # inside: --help into a closed pipe too
        if not getattr(args, "needs_settings", True):
            code = args.handler(args)
        else:
            settings = load_settings()
            _act_as_data_owner(settings)
            code = args.handler(args, settings)
        sys.stdout.flush()  # inside the try: a closed pipe must fail here, not at exit
        return code
    except (ConfigError, StoreInUse) as exc:
        return fail(str(exc), 2)
    except BrokenPipeError:
        # `tspro-relay log | head`: the reader left. No traceback; the rest goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
