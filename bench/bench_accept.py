"""The accept path beside its limit: the relay's web process and the minimal durable endpoint.

    python bench/bench_accept.py [--seconds 10] [--rounds 3] [--backend sqlite|postgresql|both] [--versus DIR]

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

``--versus DIR``: a third server in every round, the relay of another
checkout (a change to the accept path measured against the code before it,
in the same sitting; one started as ``python -m relay_cli``), with its
rate and CPU per request over this checkout's per round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, NamedTuple

from common import HERE, Relay, free_port, portal_message, stop, wait_http, wrk

sys.path.insert(0, str(HERE.parent / "tests"))
from services import PostgresCluster, RedisServer  # noqa: E402  (the tests' throwaway servers)

CONNECTIONS = 16
WRK_THREADS = 1  # one wrk thread leaves the second core to the server under test


class Server(NamedTuple):
    url: str
    key: str
    pid: int  # the process serving it, whose CPU time is read


def start_minimal(stack: ExitStack, target: str, key: str) -> Server:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "minimal_durable.py"), str(port), target])
    stack.callback(stop, proc)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    return Server(url + "/api/send", key, proc.pid)


def start_relay(stack: ExitStack, env: dict[str, str], code: Path = HERE.parent) -> Server:
    relay = Relay(code=code, **env)
    stack.callback(relay.cleanup)
    # Configured (so sends are accepted) but nothing listens there: no worker runs anyway.
    relay.cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={free_port()}", "smtp_security=none")
    pid = relay.start_web()
    return Server(relay.url + "/api/send", relay.key, pid)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, seconds: int) -> dict[str, float]:
    """wrk's figures, and the server's CPU time per answered request (less moved by a loaded
    machine than the rate: other work takes turns on the cores, not this process's CPU time)."""
    before = cpu_seconds(server.pid)
    result = wrk(server.url, portal_message(), server.key, seconds=seconds, connections=CONNECTIONS,
                 threads=WRK_THREADS)
    result["cpu_us"] = (cpu_seconds(server.pid) - before) / (result["rate"] * seconds) * 1e6
    return result


def line(label: str, result: dict[str, float]) -> str:
    return (f"{label:<26} {result['rate']:8.0f} req/s  p50 {result['p50']:6.2f} ms  p99 {result['p99']:7.2f} ms"
            f"  non-2xx {result['non2xx']:.0f}  CPU {result['cpu_us']:5.0f} us/request")


def run_backend(label: str, minimal_target: str, relay_env: dict[str, str], seconds: int,
                rounds: int, versus: Path | None = None, versus_env: dict[str, str] | None = None) -> dict[str, object]:
    with ExitStack() as stack:
        relay = start_relay(stack, relay_env)
        minimal = start_minimal(stack, minimal_target, relay.key)
        other = start_relay(stack, versus_env or {}, versus) if versus else None
        for server in [minimal, relay] + ([other] if other else []):  # warm-up: imports, caches, WAL pages
            measure(server, 2)
        minimals, relays, ratios, others, against = [], [], [], [], []
        for number in range(1, rounds + 1):
            low = measure(minimal, seconds)
            print(line(f"{label} minimal, round {number}", low), flush=True)
            theirs = measure(other, seconds) if other and number % 2 == 0 else None  # (turn about)
            high = measure(relay, seconds)
            print(line(f"{label} relay web, round {number}", high), flush=True)
            ratio = high["rate"] / low["rate"]
            print(f"{label} ratio relay/minimal, round {number}: {ratio:.2f}", flush=True)
            minimals.append(low)
            relays.append(high)
            ratios.append(ratio)
            if other:
                theirs = theirs or measure(other, seconds)
                print(line(f"{label} versus, round {number}", theirs), flush=True)
                print(f"{label} versus/relay, round {number}: rate {theirs['rate'] / high['rate']:.3f}, "
                      f"CPU per request {theirs['cpu_us'] / high['cpu_us']:.3f}", flush=True)
                others.append(theirs)
                against.append(theirs["rate"] / high["rate"])
    return {"label": label, "minimal": minimals, "relay": relays, "ratios": ratios, "versus": others,
            "against": against}


def median(results: list[dict[str, float]], field: str) -> float:
    return statistics.median(r[field] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="minimal-then-relay pairs per backend")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--versus", type=Path, help="another checkout of the relay, measured in every round too")
    args = parser.parse_args()
    print(f"load average at start: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)

    rows = []
    with ExitStack() as stack:
        backends: list[tuple[str, Callable[[], tuple[str, dict[str, str], dict[str, str]]]]] = []
        if args.backend in ("sqlite", "both"):
            scratch = Path(tempfile.mkdtemp(prefix="relay-minimal-"))
            stack.callback(shutil.rmtree, scratch, True)
            backends.append(("SQLite", lambda: (f"sqlite:{scratch / 'minimal.db'}", {}, {})))
        if args.backend in ("postgresql", "both"):
            cluster = PostgresCluster().start()
            stack.callback(cluster.stop)
            redis = RedisServer()
            stack.callback(redis.stop)

            def postgres() -> tuple[str, dict[str, str], dict[str, str]]:
                urls = []
                for _ in range(3):  # the minimal endpoint's, the relay's, the --versus relay's
                    name, url = cluster.create_database()
                    stack.callback(cluster.drop_database, name)
                    urls.append(url)
                return urls[0], *({"RELAY_DATABASE_URL": url, "RELAY_QUEUE_URL": redis.fresh_url()}
                                  for url in urls[1:])

            backends.append(("PostgreSQL", postgres))
        for label, make in backends:
            target, env, versus_env = make()
            rows.append(run_backend(label, target, env, args.seconds, args.rounds, args.versus, versus_env))
    print(f"load average at end: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)

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

    for row in rows:
        versus, against = row["versus"], row["against"]
        assert isinstance(versus, list) and isinstance(against, list)
        relays = row["relay"]
        assert isinstance(relays, list)
        if versus:
            print(f"{row['label']}: this checkout {median(relays, 'rate'):.0f} req/s, "
                  f"{median(relays, 'cpu_us'):.0f} us CPU/request; --versus {args.versus} "
                  f"{median(versus, 'rate'):.0f} req/s, {median(versus, 'cpu_us'):.0f} us CPU/request; "
                  f"rate versus/this {statistics.median(against):.3f} ({min(against):.3f}–{max(against):.3f})")


if __name__ == "__main__":
    main()
