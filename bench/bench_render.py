"""Benchmark the worker's memory while it renders and sends one large message.

    python bench/bench_render.py [--code DIR] [--cases NAME,...]

Each case stores one message as the web does (or eight, delivered at once
on eight threads, as a worker's default eight threads would), then runs the
delivery attempt (claim, decrypt, render, SMTP to the bench sink on
127.0.0.1, record) in a fresh interpreter, twice: once under tracemalloc
(the peak of Python's allocations during the attempt) and once without it
(the growth of the process's peak RSS, VmHWM, over its RSS just before).
Both are printed beside one rendered message's size, with settings at their
defaults (max_attach_mb 25). ``--code`` measures another checkout of the
relay (say the main branch) for a before-and-after comparison.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
# name -> (attachment count, bytes each, bytes of HTML body, messages delivered at once on as many threads)
CASES = {
    "portal-2KB": (0, 0, 0, 1),
    "one-20MiB": (1, 20 * MIB, 0, 1),
    "50x400KiB": (50, 400 * 1024, 0, 1),
    "html-8MiB": (0, 0, 8 * MIB, 1),
    "8x20MiB-8thr": (1, 20 * MIB, 0, 8),
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _payload(count: int, size: int, html: int, n: int) -> dict:
    attachments = [{"filename": f"file-{i}.bin", "mime_type": "application/octet-stream",
                    "content_b64": base64.b64encode(os.urandom(size)).decode()} for i in range(count)]
    return {"from_email": "noreply@example.org", "from_name": "Portal", "to": [f"member{n}@example.com"],
            "subject": "Minutes and attachments", "text": "Hello,\n\n.the minutes are attached.\n" * 40,
            "html": ("<p>Caf\u00e9 minutes, \u00e0 lire.</p>\n" * (html // 32 + 1))[:html] or None,
            "attachments": attachments}


def one(case: str, mode: str, port: int) -> dict:
    """In a fresh interpreter: store the case's message, deliver it once, measure that attempt."""
    from relay_core.config import load_settings
    from relay_core.crypto import derive_keys
    from relay_core.delivery.attempt import Deliverer
    from relay_core.message import new_message_id, pack_stored, parse_payload
    from relay_core.delivery.mime import build_mime
    from relay_core.store import NewMessage, Store, insert_message, transaction

    directory = Path(tempfile.mkdtemp(prefix="relay-bench-render-"))
    settings = load_settings({"RELAY_SECRET_KEY": "bench-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
                              "RELAY_DATA_DIR": str(directory / "data"), "RELAY_ADMIN_PASSWORD": "bench-admin"})
    store = Store.open(settings, derive_keys(settings))
    store.bootstrap(settings)
    options = store.set_options({"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_security": "none",
                                 "smtp_helo_name": "bench.example.org"})  # max_attach_mb: 25, the default

    def queue(count: int, size: int, html: int, n: int) -> tuple[str, int]:
        payload = _payload(count, size, html, n)
        message = parse_payload(payload, options)
        message_id, created = new_message_id(), time.time()
        sealed = store.keys.encrypt_body(pack_stored(bytearray(json.dumps(payload).encode()), message), message_id)
        conn = store.conn()
        with transaction(conn):
            insert_message(conn, NewMessage.accepted(message, message_id, sealed, created, options, "api", None))
        return message_id, len(build_mime(message, message_id, created))

    deliverer = Deliverer(store)
    warm_id, _ = queue(0, 0, 0, 0)  # imports, the SMTP connection, the store's statements: not this figure
    assert deliverer.attempt(warm_id).status == "sent"  # type: ignore[union-attr]
    count, size, html, messages = CASES[case]
    queued = [queue(count, size, html, n) for n in range(1, messages + 1)]
    rendered = queued[0][1]
    outcomes: list = []
    threads = [threading.Thread(target=lambda m=m: outcomes.append(deliverer.attempt(m))) for m, _ in queued]
    gc.collect()
    if mode == "tracemalloc":
        import tracemalloc
        tracemalloc.start()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if mode == "tracemalloc":
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        peak = (_status_kib("VmHWM") - before) * 1024
    assert [o.status for o in outcomes] == ["sent"] * messages, outcomes
    deliverer.close()
    store.shutdown()
    return {"case": case, "mode": mode, "rendered": rendered, "peak": peak}


def _size(count: int) -> str:
    return f"{count / MIB:.2f} MiB" if count >= MIB else f"{count / 1024:.1f} KiB"


def run_case(case: str, mode: str, port: int, code: str | None) -> dict:
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, __file__, "--one", case, "--mode", mode, "--port", str(port)],
                         env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{case} ({mode}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", help="a checkout of the relay to measure instead of this one")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.mode, args.port)))
        return

    sys.path.insert(0, str(HERE))
    from common import free_port, start_sink, stop

    port = free_port()
    sink = start_sink(port)
    try:
        print(f"code: {args.code or HERE.parent}")
        print(f"{'case':<12} {'rendered':>10} {'tracemalloc peak':>17} {'ratio':>6} {'RSS growth':>11} {'ratio':>6}")
        for case in args.cases.split(","):
            traced = run_case(case, "tracemalloc", port, args.code)
            rss = run_case(case, "rss", port, args.code)
            size = traced["rendered"]
            print(f"{case:<12} {_size(size):>10} {_size(traced['peak']):>17} {traced['peak'] / size:6.2f}"
                  f" {_size(rss['peak']):>11} {rss['peak'] / size:6.2f}")
    finally:
        stop(sink)


if __name__ == "__main__":
    main()
