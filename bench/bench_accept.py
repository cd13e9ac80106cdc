"""The accept path beside its limit: the relay's web process and the minimal durable endpoint.

    python bench/bench_accept.py [--seconds 10] [--rounds 3] [--backend sqlite|postgresql|both]

For SQLite and for PostgreSQL, starts side by side (no worker running):
  - bench/minimal_durable.py: parse the JSON, commit the body in a group
    commit (WAL + synchronous=FULL; synchronous_commit=on), answer 202;
  - `tspro-relay web` on a fresh store (PostgreSQL with the Redis queue),
    as it runs by default.
Each round drives one, then the other, with the same wrk load (16
connections, 2 KB portal messages), so both see the same machine. Prints
each run (accepted req/s, p50, p99, non-2xx), the ratio relay/minimal of
each round and its spread, and a table of the medians. PostgreSQL is a
throwaway cluster from Debian's postgresql package (fsync on) with a
database for each server; Redis is Debian's redis-server. Needs wrk.
Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from common import HERE, Relay, free_port, portal_message, stop, wait_http, wrk

sys.path.insert(0, str(HERE.parent / "tests"))
from services import PostgresCluster, RedisServer  # noqa: E402  (the tests' throwaway servers)

CONNECTIONS = 16
WRK_THREADS = 1  # one wrk thread leaves the second core to the server under test


def start_minimal(stack: ExitStack, target: str) -> str:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "minimal_durable.py"), str(port), target])
    stack.callback(stop, proc)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    return url + "/api/send"


def start_relay(stack: ExitStack, env: dict[str, str]) -> tuple[str, str]:
    relay = Relay(**env)
    stack.callback(relay.cleanup)
    # Configured (so sends are accepted) but nothing listens there: no worker runs anyway.
    relay.cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={free_port()}", "smtp_security=none")
    relay.start_web()
    return relay.url + "/api/send", relay.key


def measure(url: str, key: str, seconds: int) -> dict[str, float]:
    return wrk(url, portal_message(), key, seconds=seconds, connections=CONNECTIONS, threads=WRK_THREADS)


def line(label: str, result: dict[str, float]) -> str:
    return (f"{label:<26} {result['rate']:8.0f} req/s  p50 {result['p50']:6.2f} ms  p99 {result['p99']:7.2f} ms"
            f"  non-2xx {result['non2xx']:.0f}")


def run_backend(label: str, minimal_target: str, relay_env: dict[str, str], seconds: int,
                rounds: int) -> dict[str, object]:
    with ExitStack() as stack:
        minimal = start_minimal(stack, minimal_target)
        relay, key = start_relay(stack, relay_env)
        for url in (minimal, relay):  # warm-up: imports, caches, the first WAL pages
            measure(url, key, 2)
        minimals, relays, ratios = [], [], []
        for number in range(1, rounds + 1):
            low = measure(minimal, key, seconds)
            print(line(f"{label} minimal, round {number}", low), flush=True)
            high = measure(relay, key, seconds)
            print(line(f"{label} relay web, round {number}", high), flush=True)
            ratio = high["rate"] / low["rate"]
            print(f"{label} ratio relay/minimal, round {number}: {ratio:.2f}", flush=True)
            minimals.append(low)
            relays.append(high)
            ratios.append(ratio)
    return {"label": label, "minimal": minimals, "relay": relays, "ratios": ratios}


def median(results: list[dict[str, float]], field: str) -> float:
    return statistics.median(r[field] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="minimal-then-relay pairs per backend")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()

    rows = []
    with ExitStack() as stack:
        backends: list[tuple[str, Callable[[], tuple[str, dict[str, str]]]]] = []
        if args.backend in ("sqlite", "both"):
            scratch = Path(tempfile.mkdtemp(prefix="relay-minimal-"))
            stack.callback(shutil.rmtree, scratch, True)
            backends.append(("SQLite", lambda: (f"sqlite:{scratch / 'minimal.db'}", {})))
        if args.backend in ("postgresql", "both"):
            cluster = PostgresCluster().start()
            stack.callback(cluster.stop)
            redis = RedisServer()
            stack.callback(redis.stop)

            def postgres() -> tuple[str, dict[str, str]]:
                minimal_name, minimal_url = cluster.create_database()
                relay_name, relay_url = cluster.create_database()
                stack.callback(cluster.drop_database, minimal_name)
                stack.callback(cluster.drop_database, relay_name)
                return minimal_url, {"RELAY_DATABASE_URL": relay_url, "RELAY_QUEUE_URL": redis.fresh_url()}

            backends.append(("PostgreSQL", postgres))
        for label, make in backends:
            target, env = make()
            rows.append(run_backend(label, target, env, args.seconds, args.rounds))

    print()
    print(f"wrk -t{WRK_THREADS} -c{CONNECTIONS}, {args.seconds} s per run, 2 KB portal JSON; medians of "
          f"{args.rounds} round(s); ratio = relay / minimal within each round")
    print("| backend | minimal durable endpoint: req/s | p50 ms | p99 ms | relay web alone: req/s | p50 ms "
          "| p99 ms | ratio (spread) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        minimals, relays, ratios = row["minimal"], row["relay"], row["ratios"]
        assert isinstance(minimals, list) and isinstance(relays, list) and isinstance(ratios, list)
        print(f"| {row['label']} | {median(minimals, 'rate'):.0f} | {median(minimals, 'p50'):.2f} "
              f"| {median(minimals, 'p99'):.2f} | {median(relays, 'rate'):.0f} | {median(relays, 'p50'):.2f} "
              f"| {median(relays, 'p99'):.2f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}–{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
