"""Benchmark delivery: the backlog drain, slow sinks, several workers, reuse, STARTTLS, /healthz.

    python bench/bench_delivery.py drain  [--count 10000] [--backend sqlite|postgresql|both] [--threads N]
    python bench/bench_delivery.py slow   [--count 800]      200 ms sink, 32 threads (bound 160/s)
    python bench/bench_delivery.py scale  [--count 800]      200 ms sink, 3 workers against 1 (8 threads each)
    python bench/bench_delivery.py threads [--count 4000]    instant sink, the drain for 4, 8, 16, 32 threads
    python bench/bench_delivery.py reuse  [--count 3000]     instant sink and STARTTLS, connections reused or not
    python bench/bench_delivery.py health [--count 3000]     /healthz latency while a worker drains

    --runs N: each figure N times, then its median and range; --bare: the bare instant sink
    (sink.py --bare: aiosmtpd takes most of a CPU near 700 msg/s); --code DIR: run another
    checkout of the relay; --compare DIR: this checkout and DIR in turn, run by run (before/after
    in one sitting). Drain figures also give the worker's CPU per message, which moves less
    with the machine's load than the rate does.

Each figure queues N messages with the worker stopped, then times the drain
from the first delivery to the last `sent` in the store (end to end: claim,
render, SMTP, record). PostgreSQL (with Redis as the queue) is a throwaway
cluster started here, as bench_backends.py does. Prints the machine's load
average beside each figure: the box is shared, so read them with it. Talks
to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import httpx
import trustme

from bench_send import delivery_rate, drain
from common import HERE, Relay, free_port, post_many, start_sink, stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import PostgresCluster, RedisServer  # noqa: E402  (the tests' throwaway servers)


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def tls_files() -> tuple[str, str, str]:
    """A CA the worker trusts (via SSL_CERT_FILE) and a sink certificate it issued."""
    directory = Path(tempfile.mkdtemp(prefix="relay-bench-tls-"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    return str(directory / "cert.pem"), str(directory / "key.pem"), str(directory / "ca.pem")


def healthz_while_draining(count: int, probes: int = 400) -> tuple[float, float, float]:
    """p50/p99 of /healthz (sequential probes) while one worker drains ``count`` messages."""
    sink_port = free_port()
    sink = start_sink(sink_port, 0.0)
    relay = Relay(threads=8)
    try:
        relay.cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={sink_port}", "smtp_security=none")
        relay.start_web()
        asyncio.run(post_many(relay.url, relay.key, count))
        relay.start_worker()
        latencies = []
        with httpx.Client(base_url=relay.url, timeout=10) as http:
            while relay.counts().get("sent", 0) < count // 10:
                time.sleep(0.01)  # wait until the drain is under way
            for _ in range(probes):
                started = time.perf_counter()
                http.get("/healthz").raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.005)
        sent_during = relay.counts().get("sent", 0)
        latencies.sort()
        return (statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1],
                sent_during / count)
    finally:
        relay.cleanup()
        stop(sink)


def backends(stack: ExitStack, which: str) -> list[tuple[str, Callable[[], dict[str, str]]]]:
    """(label, environment maker) for each backend asked for; PostgreSQL starts here, once."""
    chosen: list[tuple[str, Callable[[], dict[str, str]]]] = []
    if which in ("sqlite", "both"):
        chosen.append(("SQLite", dict))
    if which in ("postgresql", "both"):
        cluster = PostgresCluster().start()
        stack.callback(cluster.stop)
        redis = RedisServer()
        stack.callback(redis.stop)

        def postgres() -> dict[str, str]:
            name, url = cluster.create_database()
            stack.callback(cluster.drop_database, name)
            return {"RELAY_DATABASE_URL": url, "RELAY_QUEUE_URL": redis.fresh_url()}

        chosen.append(("PostgreSQL", postgres))
    return chosen


def figures(what: str, label: str, env: Callable[[], dict[str, str]], args: argparse.Namespace,
            code: Path | None) -> dict[str, float]:
    """One run of ``what``: prints its line and returns its numbers by name."""
    sink = "bare instant" if args.bare else "instant"
    got: dict[str, float] = {}
    if what == "drain":
        n, per = args.count or 10_000, args.threads or 8
        result = drain(n, 0.0, threads=per, env=env(), bare=args.bare, code=code)
        got = {"msg/s": result.rate, "worker CPU ms/msg": result.cpu_ms}
        print(f"{label:<10} drain, {sink} sink, {n} messages, {per} threads: {result.rate:6.0f} msg/s,"
              f" worker CPU {result.cpu_ms:.3f} ms/msg   ({load()})", flush=True)
    elif what == "slow":
        n = args.count or 800
        result = drain(n, 0.2, threads=32, env=env(), code=code)
        got = {"msg/s": result.rate, "of the bound": result.rate / 160}
        print(f"{label:<10} 200 ms sink, 32 threads, {n} messages: {result.rate:6.1f} msg/s"
              f"  ({result.rate / 160:.3f} of the 160 msg/s bound)   ({load()})", flush=True)
    elif what == "scale":
        n, per = args.count or 800, args.threads or 8
        one = delivery_rate(n // 3, 0.2, threads=per, workers=1, env=env(), code=code)
        three = delivery_rate(n, 0.2, threads=per, workers=3, env=env(), code=code)
        got = {"1 worker msg/s": one, "3 workers msg/s": three, "3 vs 1": three / one}
        print(f"{label:<10} 200 ms sink, {per} threads each: 1 worker {one:6.1f} msg/s,"
              f" 3 workers {three:6.1f} msg/s  ({three / one:.2f}x)   ({load()})", flush=True)
    elif what == "threads":
        n = args.count or 4000
        for count in (4, 8, 16, 32):
            result = drain(n, 0.0, threads=count, env=env(), bare=args.bare, code=code)
            got[f"{count} threads msg/s"] = result.rate
            print(f"{label:<10} drain, {sink} sink, {n} messages, {count:2d} threads: {result.rate:6.0f} msg/s,"
                  f" worker CPU {result.cpu_ms:.3f} ms/msg   ({load()})", flush=True)
    elif what == "reuse":
        n, per = args.count or 3000, args.threads or 8
        reuse = delivery_rate(n, 0.0, threads=per, reuse=True, env=env(), bare=args.bare, code=code)
        fresh = delivery_rate(n, 0.0, threads=per, reuse=False, env=env(), bare=args.bare, code=code)
        got = {"reuse msg/s": reuse, "new connection msg/s": fresh}
        print(f"{label:<10} {sink} sink, {per} threads: reuse {reuse:6.0f} msg/s,"
              f" new connection each {fresh:6.0f} msg/s   ({load()})", flush=True)
        if not args.bare:
            cert, key, ca = tls_files()
            reuse = delivery_rate(n, 0.0, threads=per, reuse=True, starttls=(cert, key, ca), env=env(), code=code)
            fresh = delivery_rate(n // 2, 0.0, threads=per, reuse=False, starttls=(cert, key, ca), env=env(),
                                  code=code)
            got.update({"STARTTLS reuse msg/s": reuse, "STARTTLS new connection msg/s": fresh})
            print(f"{label:<10} STARTTLS, {per} threads: reuse {reuse:6.0f} msg/s,"
                  f" new connection each {fresh:6.0f} msg/s   ({load()})", flush=True)
    else:
        n = args.count or 3000
        p50, p99, progress = healthz_while_draining(n)
        got = {"p50 ms": p50, "p99 ms": p99}
        print(f"/healthz while draining: p50 {p50:5.2f} ms  p99 {p99:5.2f} ms"
              f"  ({progress:.0%} drained by the end)   ({load()})", flush=True)
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("drain", "slow", "scale", "threads", "reuse", "health"))
    parser.add_argument("--count", type=int, help="messages per figure")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="sqlite")
    parser.add_argument("--threads", type=int, help="delivery threads per worker (default 8)")
    parser.add_argument("--runs", type=int, default=1, help="repeat each figure; medians and ranges at the end")
    parser.add_argument("--bare", action="store_true",
                        help="drain, threads, reuse: the bare instant sink (sink.py --bare), not aiosmtpd")
    parser.add_argument("--code", type=Path, help="measure another checkout of the relay instead of this one")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="also measure another checkout (say, main's), a run of each in turn")
    args = parser.parse_args()
    if args.what == "health" and (args.code or args.compare):
        parser.error("health measures this checkout only")
    checkouts: list[tuple[str, Path | None]] = [("", args.code)]
    if args.compare:
        checkouts = [("this", args.code), ("other", args.compare)]

    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with ExitStack() as stack:
        for label, env in backends(stack, args.backend):
            for _ in range(args.runs):
                for name, code in checkouts:
                    tag = f"{label} {name}".strip()
                    results.setdefault((label, name), []).append(figures(args.what, tag, env, args, code))
    print(f"\n{args.what}: medians over {args.runs} run(s) [range]; load now {load()}")
    for (label, name), runs in results.items():
        where = f"{label} {name}".strip() + (f" ({args.compare if name == 'other' else args.code or HERE.parent})"
                                            if args.compare or args.code else "")
        parts = []
        for key in runs[0]:
            values = [run[key] for run in runs]
            parts.append(f"{key} {fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]")
        print(f"  {where}: " + ", ".join(parts))


def fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


if __name__ == "__main__":
    main()
