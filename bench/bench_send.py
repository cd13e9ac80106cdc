"""Benchmark the send pipeline: accept rate, the bare-Starlette ceiling, delivery, memory.

    python bench/bench_send.py [--seconds 10] [--quick]

Prints, in one run:
  1. accepted requests/s with p50/p99 (2 KB portal messages, 16 connections, wrk);
  2. the same load against a bare Starlette endpoint that only parses the JSON;
  3. end-to-end delivered messages/s to an instant sink and to one adding 200 ms;
  4. the web process's peak RSS while accepting one 20 MiB attachment.
Needs Debian's wrk (apt-get install -y wrk). Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from common import (HERE, Relay, cpu_seconds, free_port, peak_rss_mib, portal_message, post_many, rss_mib,
                    start_sink, stop, wait_http, wrk)


def accept_rate(seconds: int, with_worker: bool = True, env: dict[str, str] | None = None) -> dict[str, float]:
    """wrk against POST /api/send; with the worker delivering to a sink meanwhile, or alone."""
    sink_port = free_port()
    sink = start_sink(sink_port)
    relay = Relay(**(env or {}))
    try:
        relay.cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={sink_port}", "smtp_security=none")
        relay.start_web()
        if with_worker:
            relay.start_worker()
        wrk(relay.url + "/api/send", portal_message(), relay.key, seconds=2)  # warm-up
        return wrk(relay.url + "/api/send", portal_message(), relay.key, seconds=seconds)
    finally:
        relay.cleanup()
        stop(sink)


def bare_rate(seconds: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "bare_app.py"), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        wrk(f"http://127.0.0.1:{port}/api/send", portal_message(), "x", seconds=2)
        return wrk(f"http://127.0.0.1:{port}/api/send", portal_message(), "x", seconds=seconds)
    finally:
        stop(proc)


@dataclass
class Drain:
    rate: float  # delivered messages/s
    cpu_ms: float  # the worker processes' CPU per message delivered, start-up left out


def delivery_rate(count: int, delay: float, threads: int, workers: int = 1, reuse: bool = True,
                  starttls: tuple[str, str, str] | None = None, env: dict[str, str] | None = None,
                  bare: bool = False, code: Path | None = None) -> float:
    """Queue ``count`` messages with the worker stopped, then time the drain (messages/s)."""
    return drain(count, delay, threads, workers, reuse, starttls, env, bare, code).rate


def drain(count: int, delay: float, threads: int, workers: int = 1, reuse: bool = True,
          starttls: tuple[str, str, str] | None = None, env: dict[str, str] | None = None,
          bare: bool = False, code: Path | None = None) -> Drain:
    """Queue ``count`` messages with the worker stopped, then time the drain.

    The clock starts when the first delivery began (its finish time less the
    sink's delay) and stops at the last recorded delivery (``finished_at`` in
    the store), so the worker process's start-up is not counted; nor is it in
    the CPU figure, read from the first delivery on. ``code``: another
    checkout of the relay to run.
    """
    sink_port = free_port()
    extra = ("--starttls", starttls[0], starttls[1]) if starttls else ()
    sink = start_sink(sink_port, delay, *extra)
    relay = Relay(threads=threads, code=code or HERE.parent, **({"SSL_CERT_FILE": starttls[2]} if starttls else {}),
                  **(env or {}))
    try:
        relay.cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={sink_port}",
                  f"smtp_security={'starttls' if starttls else 'none'}",
                  f"connection_idle_seconds={30 if reuse else 0}")
        relay.start_web()
        accepted = asyncio.run(post_many(relay.url, relay.key, count))
        assert accepted == count, f"only {accepted} of {count} accepted"
        for _ in range(workers):
            relay.start_worker()
        deadline = time.monotonic() + 600
        cpu_from: tuple[int, float] | None = None  # (sent, CPU seconds) at the first delivery seen
        while time.monotonic() < deadline:
            sent = relay.counts().get("sent", 0)
            if sent and cpu_from is None:
                cpu_from = (sent, sum(cpu_seconds(w.pid) for w in relay.workers))
            if sent >= count:
                break
            time.sleep(0.05)
        sent = relay.counts().get("sent", 0)
        if sent < count:
            raise RuntimeError(f"only {sent} of {count} delivered in 600 s")
        cpu = sum(cpu_seconds(w.pid) for w in relay.workers)
        assert cpu_from is not None
        first, last = relay.finish_span()
        return Drain(count / (last - first + delay), (cpu - cpu_from[1]) * 1000 / max(1, count - cpu_from[0]))
    finally:
        relay.cleanup()
        stop(sink)


def big_attachment_rss(mib: int = 20) -> tuple[float, float, int]:
    relay = Relay()
    try:
        relay.cli("config", "set", "smtp_host=127.0.0.1", "smtp_port=2", "smtp_security=none")
        pid = relay.start_web()
        key = relay.key
        # Warm the process with one small message so its baseline includes the send path.
        httpx.post(relay.url + "/api/send", json=portal_message(), headers={"Authorization": f"Bearer {key}"})
        baseline = rss_mib(pid)
        payload = portal_message()
        payload["attachments"] = [{"filename": "big.bin", "mime_type": "application/octet-stream",
                                   "content_b64": base64.b64encode(bytes(range(256)) * (mib * 4096)).decode()}]
        response = httpx.post(relay.url + "/api/send", json=payload, headers={"Authorization": f"Bearer {key}"},
                              timeout=120)
        return baseline, peak_rss_mib(pid), response.status_code
    finally:
        relay.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smaller delivery runs")
    args = parser.parse_args()
    n_instant, n_slow = (1000, 300) if args.quick else (3000, 600)

    relay = accept_rate(args.seconds)
    alone = accept_rate(args.seconds, with_worker=False)
    bare = bare_rate(args.seconds)
    print(f"accept  relay  : {relay['rate']:8.0f} req/s  p50 {relay['p50']:6.2f} ms  p99 {relay['p99']:6.2f} ms"
          f"  non-2xx {relay['non2xx']:.0f}   (16 connections, 2 KB JSON, worker delivering meanwhile)")
    print(f"accept  web    : {alone['rate']:8.0f} req/s  p50 {alone['p50']:6.2f} ms  p99 {alone['p99']:6.2f} ms"
          f"  non-2xx {alone['non2xx']:.0f}   (the same with no worker running)")
    print(f"accept  bare   : {bare['rate']:8.0f} req/s  p50 {bare['p50']:6.2f} ms  p99 {bare['p99']:6.2f} ms"
          f"   (Starlette, parse JSON only)")
    print(f"accept  ratio  : {relay['rate'] / bare['rate']:8.2f} of the bare endpoint")
    instant = delivery_rate(n_instant, 0.0, threads=8)
    print(f"deliver instant: {instant:8.0f} msg/s  ({n_instant} messages, 1 worker x 8 threads)")
    slow8 = delivery_rate(n_slow // 3, 0.2, threads=8)
    print(f"deliver 200 ms : {slow8:8.1f} msg/s  ({n_slow // 3} messages, 1 worker x 8 threads; bound 40)")
    slow32 = delivery_rate(n_slow, 0.2, threads=32)
    print(f"deliver 200 ms : {slow32:8.1f} msg/s  ({n_slow} messages, 1 worker x 32 threads; bound 160)")
    baseline, peak, status = big_attachment_rss()
    print(f"web RSS 20 MiB : peak {peak:6.1f} MiB (idle after warm-up {baseline:.1f} MiB), answer {status}")


if __name__ == "__main__":
    main()
