"""`tspro-relay log`, `status`, `pause` and `resume`: the queue from a shell.

They read and change the store directly, so they work without the web
process (on the host of a stopped relay, or in a worker-only container).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any, Callable

from relay_core import crypto
from relay_core.store.audit import COMMAND_LINE
from relay_core.config import Settings
from relay_core.delivery.mailflow import assess
from relay_core.delivery.pausing import pause, resume
from relay_core.store import LoggedRow, Store

LOG_STATUSES = ("queued", "sent", "partial", "deferred", "failed", "cancelled", "rejected")


def _store(settings: Settings) -> Store:
    store = Store.open(settings, crypto.derive_keys(settings))
    store.bootstrap(settings)
    return store


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def format_row(row: LoggedRow) -> str:
    """One log row on one line: when, status, what, message, stage and code, who, subject, detail."""
    where = " ".join(str(part) for part in (row.stage, row.code) if part) or "-"
    people = f"{row.sender or '-'} -> {row.recipients or '-'}"
    text = f"{_when(row.ts)}  {row.status:<9} {row.event:<12} {row.message_id or '-':<22} {where:<12} {people}"
    if row.subject:
        text += f"  \"{row.subject}\""
    if row.detail:
        text += f"  {row.detail}"
    return " ".join(text.split("\n"))


def cmd_log(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    for row in store.log.entries(status=args.status, limit=args.limit):
        print(format_row(row))
    if not args.follow:
        return 0
    newest = store.log.entries(limit=1)
    last = newest[0].id if newest else 0
    # Ctrl-C and SIGTERM only ask the loop to stop; it stops between two reads. (A KeyboardInterrupt
    # raised wherever the main thread happened to be, inside a store read, once left it hanging.)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    sys.stdout.flush()
    while not stop.wait(args.interval):  # until a signal or the reader going away
        for row in store.log.entries(limit=1000, after_id=last):
            last = row.id  # every row moves the mark, printed or not
            if not args.status or row.status == args.status:
                print(format_row(row))
        sys.stdout.flush()
    return 0


def _status_lines(view: dict[str, Any]) -> list[str]:
    lines = [
        f"id            {view['id']}",
        f"status        {view['status']}",
        f"from          {view['from']}",
        f"subject       {view['subject']}",
        f"created       {_when(view['created_at'])} UTC",
        f"finished      {_when(view['finished_at'])}",
        f"next attempt  {_when(view['next_attempt_at'])}",
        f"attempts      {view['attempt_count']}",
        f"last error    {view['last_error'] or '-'}",
        "recipients:",
    ]
    for r in view["recipients"]:
        lines.append(f"  {r['address']} ({r['kind']})  {r['status']}  {r['code'] or '-'}  {r['reply'] or ''}".rstrip())
    if view["attempts"]:
        lines.append("attempt log:")
    for a in view["attempts"]:
        lines.append(f"  {_when(a['at'])}  {a['status']:<9} {a['stage'] or '-'} {a['code'] or '-'}  {a['detail']}")
    return lines


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    view = _store(settings).messages.status(args.id)
    if view is None:
        print(f"tspro-relay: no message with id {args.id!r} is known to this relay.", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print("\n".join(_status_lines(view)))
    return 0


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    pause(_store(settings), COMMAND_LINE)
    print("Delivery paused: the relay still accepts and queues mail but sends nothing until "
          "`tspro-relay resume`.")
    return 0


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    from relay_core.tasks import build_queue  # the queue's libraries only for the command that uses them
    woken = resume(store, build_queue(settings), COMMAND_LINE)
    print(f"Delivery resumed; woke {woken} waiting message(s).")
    health = assess(store)
    if not health.ok:
        print(f"Note: {health.error}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_command(sub, "log", "print the transaction log (no web process needed)",
                    "Print the transaction log, oldest first: every accept, rejection and delivery attempt. "
                    "Reads the store directly.")
    p.add_argument("--status", choices=LOG_STATUSES, help="only rows with this status")
    p.add_argument("--limit", type=int, default=50, help="how many of the latest rows to print")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new rows until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_log)

    p = add_command(sub, "status", "show one message: state, attempts, recipients",
                    "Show one message as GET /api/messages/ID would, read from the store directly.")
    p.add_argument("id", help="the message id (the 202 answer's \"id\")")
    p.add_argument("--json", action="store_true", help="print the JSON the API would answer")
    p.set_defaults(handler=cmd_status)

    add_command(sub, "pause", "stop delivering; keep accepting and queueing",
                "Pause delivery: the API still accepts and queues, workers send nothing, /api/health "
                "answers ok:false. Nothing is lost.").set_defaults(handler=cmd_pause)
    add_command(sub, "resume", "deliver again, starting with everything that waited",
                "Resume delivery and wake every message that waited.").set_defaults(handler=cmd_resume)
