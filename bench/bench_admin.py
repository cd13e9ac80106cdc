"""Benchmark the admin pages at scale: a million log rows and 100,000 waiting messages.

    python bench/bench_admin.py [--log-rows 1000000] [--waiting 100000] [--runs 5]
                                [--database-url postgresql://... --queue-url redis://...]

Fills a fresh store (SQLite in a temp directory, or the empty PostgreSQL
database given) with synthetic but realistic rows — a month of portal mail:
accepts, deliveries, deferrals, failures, rejected and unauthorized calls,
finished messages and a backlog of waiting ones — in a few large
transactions, then starts a real `tspro-relay web`, signs in over HTTP as an
admin would, and times each page from the client: the dashboard, the log's
first and 500th page, a search, a status filter, a message page and the CSV
export of a filter. Target: every page under 200 ms on the 2-core machine.

The fill writes its rows with SQL of its own (a benchmark's fixture, not the
product's path); every page it then times is served by the product.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import SECRET, free_port, wait_http  # noqa: E402

from relay_core import crypto  # noqa: E402
from relay_core.config import load_settings  # noqa: E402
from relay_core.store.logbook import hour_of, log_kind, search_terms  # noqa: E402
from relay_core.store import Store, transaction  # noqa: E402

PASSWORD = "bench-admin-password-1"
DAY = 86400.0
SUBJECTS = ["Reset your password", "Welcome to the service committee", "Your access request was approved",
            "New message from the contact form", "Meeting minutes for {month}", "Agenda: district assembly",
            "Recovery contact confirmation", "Your account details changed", "Reminder: group inventory",
            "Treasurer report {month}"]
MONTHS = ["January", "February", "March", "April", "May", "June"]
KIND_WEIGHTS = [("accepted", 40), ("sent", 38), ("deferred", 6), ("failed", 2), ("partial", 1),
                ("unauthorized", 6), ("rejected", 4), ("rate_limited", 3)]
CHUNK = 20_000
EVENTS: dict[str, tuple[str, str, int | None]] = {
    "accepted": ("accepted", "queued", None), "unauthorized": ("unauthorized", "rejected", 401),
    "rejected": ("rejected", "rejected", 400), "rate_limited": ("rejected", "rejected", 429),
    "sent": ("attempt", "sent", 250), "deferred": ("attempt", "deferred", 451), "failed": ("attempt", "failed", 550),
    "partial": ("attempt", "partial", 550)}


def address(rng: random.Random) -> str:
    return f"member{rng.randrange(60_000)}@{rng.choice(['example.com', 'mail.example.org', 'groups.example.net'])}"


def subject(rng: random.Random) -> str:
    return rng.choice(SUBJECTS).format(month=rng.choice(MONTHS))


# -- the fill -------------------------------------------------------------------------------------------
def fill_messages(store: Store, waiting: int, finished: int, now: float, rng: random.Random) -> list[str]:
    """``waiting`` queued/deferred messages with encrypted bodies, ``finished`` sent or failed ones (pruned)."""
    conn = store.conn()
    ids: list[str] = []
    total = waiting + finished
    for start in range(0, total, CHUNK):
        rows, recipients = [], []
        for i in range(start, min(start + CHUNK, total)):
            message_id = f"{int((now - DAY * 30 + i * 30 * DAY / total) * 1000):012x}{i:010x}"
            created = now - DAY * 30 + i * 30 * DAY / total if i >= waiting else now - rng.uniform(0, 2 * DAY)
            to = [address(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            title = subject(rng)
            if i < waiting:
                status = "deferred" if rng.random() < 0.3 else "queued"
                document = json.dumps({"from_email": "noreply@portal.example.org", "to": to, "subject": title,
                                       "text": "Hello, " * 40}).encode() + b"\n" + json.dumps(
                    {"v": 1, "from_email": "noreply@portal.example.org", "from_name": "Portal", "to": to},
                    separators=(",", ":")).encode()
                body: bytes | None = store.keys.encrypt_body(bytearray(document), message_id)
                ids.append(message_id)
                next_at = created if status == "queued" else now + rng.uniform(60, 3600)
                finished_at = None
            else:
                status = "failed" if rng.random() < 0.03 else "sent"
                body, next_at, finished_at = None, created, created + 2
            rows.append((message_id, status, "api", created, created, next_at, created, 0 if status == "queued" else 1,
                         finished_at, "noreply@portal.example.org", "Portal", "noreply@portal.example.org", title,
                         f"<{message_id}@portal.example.org>", 900, 0, body,
                         "5.1.1 no such user" if status == "failed" else None))
            for position, rcpt in enumerate(to):
                state = {"queued": "pending", "deferred": "deferred"}.get(status, status)
                recipients.append((message_id, position, rcpt, state))
        with transaction(conn):
            conn.executemany(
                "INSERT INTO messages (id, status, source, created_at, updated_at, next_attempt_at, enqueued_at,"
                " attempts, finished_at, from_addr, from_name, envelope_from, subject, message_id_header, size,"
                " attachments, body, last_error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            conn.executemany("INSERT INTO recipients (message_id, position, address, status) VALUES (?,?,?,?)",
                             recipients)
    return ids


def fill_log(store: Store, count: int, now: float, rng: random.Random) -> None:
    """``count`` log rows over the last 30 days, oldest first, with their hourly counts and search words."""
    conn = store.conn()
    kinds, weights = zip(*KIND_WEIGHTS)
    counts: Counter[tuple[int, str]] = Counter()
    dialect = store.database.dialect
    if dialect == "postgresql":
        with transaction(conn):
            conn.execute("DROP INDEX log_terms")  # built once at the end: far faster than row by row
    for start in range(0, count, CHUNK):
        rows = []
        for i in range(start, min(start + CHUNK, count)):
            ts = now - 30 * DAY + i * 30 * DAY / count
            kind = rng.choices(kinds, weights)[0]
            event, status, code = EVENTS[kind]
            assert log_kind(event, status, code) == kind
            if event in ("unauthorized", "rejected"):
                sender = recipients = title = ""
                detail = {401: "Missing or invalid API key.", 400: "'to' holds no recipient address.",
                          429: "This API key has reached the relay's limit."}[code or 400]
            else:
                sender, title = "noreply@portal.example.org", subject(rng)
                recipients = ", ".join(address(rng) for _ in range(rng.choice([1, 1, 1, 2])))
                detail = {"accepted": "1 recipient(s), 0 attachment(s)", "sent": "250 2.0.0 Ok: queued",
                          "deferred": "451 4.3.0 Try again later", "failed": "550 5.1.1 No such user",
                          "partial": "1 of 2 recipients accepted"}[kind]
            terms = search_terms(sender, recipients, title)
            rows.append((ts, event, None, status, "DATA" if event == "attempt" else None, code, detail,
                         rng.randrange(50, 900) if event == "attempt" else None,
                         f"203.0.113.{rng.randrange(1, 255)}" if event != "attempt" else None, sender, recipients,
                         title, rng.choice([0, 0, 0, 1, 2]) if sender else None, kind, terms))
            counts[(hour_of(ts), kind)] += 1
        with transaction(conn):
            conn.executemany(
                "INSERT INTO log (ts, event, message_id, status, stage, code, detail, duration_ms, source_ip, sender,"
                " recipients, subject, attachments, kind, terms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    with transaction(conn):
        conn.executemany("INSERT INTO log_counts (hour, kind, n) VALUES (?, ?, ?)",
                         [(hour, kind, n) for (hour, kind), n in counts.items()])
        if dialect == "sqlite":
            conn.execute("INSERT INTO log_fts (log_fts) VALUES ('rebuild')")
        else:
            conn.execute("CREATE INDEX log_terms ON log USING GIN (to_tsvector('simple', terms))")
    if dialect == "postgresql":
        with transaction(conn):
            conn.execute("ANALYZE")


# -- the timings ----------------------------------------------------------------------------------------
def sign_in(client: httpx.Client) -> None:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, "no sign-in form"
    answer = client.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token.group(1),
                                         "next": "/"}, headers={"Origin": str(client.base_url).rstrip("/")})
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text[:300]


def timed(client: httpx.Client, path: str, runs: int) -> tuple[float, float, int, int]:
    """(median ms, worst ms, status, bytes) over ``runs`` requests after one warm-up."""
    client.get(path)
    times, last = [], None
    for _ in range(runs):
        started = time.perf_counter()
        last = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
    assert last is not None
    return statistics.median(times), max(times), last.status_code, len(last.content)


def timed_export(client: httpx.Client, path: str) -> tuple[float, float, int]:
    """(ms to the first bytes, ms to the end, data rows) of a streamed CSV export."""
    started = time.perf_counter()
    first = None
    data = bytearray()
    with client.stream("GET", path) as response:
        assert response.status_code == 200, response.status_code
        for chunk in response.iter_bytes():
            if first is None:
                first = (time.perf_counter() - started) * 1000
            data += chunk
    return first or 0.0, (time.perf_counter() - started) * 1000, data.count(b"\r\n") - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-rows", type=int, default=1_000_000)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--finished", type=int, default=200_000, help="sent and failed messages kept")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", default="", help="an empty PostgreSQL database (default: SQLite)")
    parser.add_argument("--queue-url", default="", help="redis://... (a PostgreSQL store needs a shared queue)")
    parser.add_argument("--full-export", action="store_true", help="also export the whole log as CSV")
    parser.add_argument("--keep", action="store_true", help="keep the filled data directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-admin-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(workdir / "data"), "RELAY_ADMIN_USER": "admin",
                "RELAY_ADMIN_PASSWORD": "first-boot-seed-9", "RELAY_INSECURE_COOKIES": "1", "RELAY_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(HERE.parent)})
    if args.database_url:
        env["RELAY_DATABASE_URL"] = args.database_url
    if args.queue_url:
        env["RELAY_QUEUE_URL"] = args.queue_url
    settings = load_settings(env)
    store = Store.open(settings, crypto.derive_keys(settings))
    store.bootstrap(settings)
    store.admin.set_password("admin", PASSWORD)
    rng = random.Random(7)
    now = time.time()
    started = time.perf_counter()
    waiting_ids = fill_messages(store, args.waiting, args.finished, now, rng)
    fill_log(store, args.log_rows, now, rng)
    fill_seconds = time.perf_counter() - started
    page_500 = store.conn().execute("SELECT id FROM log ORDER BY id DESC LIMIT 1 OFFSET ?",
                                    (499 * 50 - 1,)).fetchone()[0]
    someone = store.conn().execute("SELECT recipients FROM log WHERE kind = 'sent' ORDER BY id DESC LIMIT 1"
                                   " OFFSET 5000").fetchone()[0].split(",")[0]
    store.shutdown()
    backend = "PostgreSQL" if args.database_url else "SQLite"
    print(f"store: {backend}; {args.log_rows:,} log rows, {args.waiting:,} waiting and {args.finished:,} finished "
          f"messages; filled in {fill_seconds:.0f} s")

    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "relay_cli", "web", "--host", "127.0.0.1", "--port", str(port)],
                           env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            sign_in(client)
            pages = [
                ("dashboard  /", "/"),
                ("log, first page", "/logs"),
                ("log, page 500 (keyset)", f"/logs?before={page_500}"),
                (f"search: {someone}", f"/logs?q={someone}"),
                ("search: a common word (password)", "/logs?q=password"),
                ("search: the start of a word (passw)", "/logs?q=passw"),
                ("search: a domain (example.org)", "/logs?q=example.org"),
                ("search: a prefix of 60,000 addresses (memb)", "/logs?q=memb&status=failed"),
                ("search: a prefix nothing starts with (zzzz)", "/logs?q=zzzz"),
                ("time range: last 24 hours", "/logs?range=day"),
                ("status filter: failed", "/logs?status=failed"),
                ("status + last 7 days: deferred", "/logs?status=deferred&range=week"),
                ("message page", f"/messages/{waiting_ids[len(waiting_ids) // 2]}"),
            ]
            print(f"\n{'page':<48} {'median':>9} {'worst':>9}  status  bytes   (runs: {args.runs}, target < 200 ms)")
            for label, path in pages:
                median, worst, code, size = timed(client, path, args.runs)
                mark = "ok" if median < 200 else "SLOW"
                print(f"{label:<48} {median:7.1f}ms {worst:7.1f}ms  {code}     {size:<7} {mark}")
            exports = [("CSV export: status failed", "/logs.csv?status=failed"),
                       ("CSV export: search", f"/logs.csv?q={someone}")]
            if args.full_export:
                exports.append(("CSV export: the whole log", "/logs.csv"))
            for label, path in exports:
                first, total, count = timed_export(client, path)
                print(f"{label:<48} first bytes {first:6.1f} ms, all {count:,} rows in {total:7.0f} ms "
                      f"({count / max(total / 1000, 1e-9):,.0f} rows/s)")
    finally:
        web.terminate()
        web.wait(30)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\nthe store is kept in {workdir}")


if __name__ == "__main__":
    main()
