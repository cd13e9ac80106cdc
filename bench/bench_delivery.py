"""Benchmark delivery: connection reuse, slow sinks, STARTTLS, several workers, /healthz under load.

    python bench/bench_delivery.py [--quick]

Each figure queues N messages with the worker stopped, then times the drain
from the worker's start to the last `sent` in the store (end to end: claim,
render, SMTP, record). Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import trustme

from bench_send import delivery_rate
from common import Relay, free_port, post_many, start_sink, stop


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 1000 if args.quick else 3000
    n_slow = 300 if args.quick else 800

    reuse = delivery_rate(n, 0.0, threads=8, reuse=True)
    fresh = delivery_rate(n, 0.0, threads=8, reuse=False)
    print(f"instant sink, 8 threads : reuse {reuse:7.0f} msg/s   new connection each {fresh:7.0f} msg/s")
    cert, key, ca = tls_files()
    tls_reuse = delivery_rate(n, 0.0, threads=8, reuse=True, starttls=(cert, key, ca))
    tls_fresh = delivery_rate(n // 2, 0.0, threads=8, reuse=False, starttls=(cert, key, ca))
    print(f"STARTTLS,     8 threads : reuse {tls_reuse:7.0f} msg/s   new connection each {tls_fresh:7.0f} msg/s")
    slow32 = delivery_rate(n_slow, 0.2, threads=32)
    print(f"200 ms sink, 32 threads : {slow32:7.1f} msg/s  ({slow32 / 160:.0%} of the 160 msg/s bound)")
    one = delivery_rate(n_slow // 2, 0.2, threads=8, workers=1)
    three = delivery_rate(n_slow, 0.2, threads=8, workers=3)
    print(f"200 ms sink, 8 threads  : 1 worker {one:6.1f} msg/s   3 workers {three:6.1f} msg/s"
          f"   ({three / one:.2f}x)")
    p50, p99, progress = healthz_while_draining(n)
    print(f"/healthz while draining : p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  ({progress:.0%} drained by the end)")


if __name__ == "__main__":
    main()
