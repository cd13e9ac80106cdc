"""Benchmark: the portal key's accept latency while a wrong key floods the relay from one address.

    python bench/bench_flood.py [--seconds 10] [--flood-connections 32]

Runs `tspro-relay web` and a worker delivering to an instant aiosmtpd sink,
then measures POST /api/send with the good key (wrk, 4 connections, 2 KB
portal messages) twice: alone, and while a second wrk sends POST /api/send
with a wrong key as fast as it can on 32 connections from the same address
(127.0.0.1). Prints p50/p99 of both, the flood's rate and answers (401 up
to the budget, then 429), how many log rows the flood added, whether the
good sends were all delivered, and whether any key reached the relay's logs.
Needs Debian's wrk. Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from typing import Any

from common import Relay, free_port, portal_message, start_sink, stop, wrk

WRONG_KEY = "tsr_" + "w" * 43


def start_flood(url: str, seconds: int, connections: int) -> tuple[subprocess.Popen[str], str]:
    """wrk POSTing a wrong key for ``seconds`` (in the background); its Lua script's path."""
    payload = json.dumps(portal_message()).replace("]]", "] ]")
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write('wrk.method = "POST"\n'
                 f"wrk.body = [[{payload}]]\n"
                 'wrk.headers["Content-Type"] = "application/json"\n'
                 f'wrk.headers["Authorization"] = "Bearer {WRONG_KEY}"\n')
    script.close()
    proc = subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", script.name, url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, script.name


def parse_flood(out: str) -> dict[str, float]:
    requests = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"requests": float(requests.group(1)) if requests else 0.0,
            "rate": float(rate.group(1)) if rate else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each measurement")
    parser.add_argument("--flood-connections", type=int, default=32)
    args = parser.parse_args()

    sink_port = free_port()
    sink = start_sink(sink_port)
    relay = Relay()
    try:
        relay.cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={sink_port}", "smtp_security=none")
        key = relay.key
        relay.start_web()
        relay.start_worker()
        url = relay.url + "/api/send"
        wrk(url, portal_message(), key, seconds=2, connections=4)  # warm-up

        alone = wrk(url, portal_message(), key, seconds=args.seconds, connections=4, threads=1)
        rows_before = relay.query("SELECT COUNT(*) FROM log WHERE event = 'unauthorized'")[0][0]
        flood, script = start_flood(url, args.seconds + 3, args.flood_connections)
        time.sleep(1.5)  # the flood is at full speed before the measurement starts
        during = wrk(url, portal_message(), key, seconds=args.seconds, connections=4, threads=1)
        flood_out, _ = flood.communicate(timeout=args.seconds + 60)
        os.unlink(script)
        flooded = parse_flood(flood_out)

        time.sleep(2)  # the refusals' last flush (about once a second)
        unauthorized = relay.query("SELECT detail FROM log WHERE event = 'unauthorized'")
        counted = sum(int(re.match(r"(\d+) request", d).group(1)) for (d,) in unauthorized)  # type: ignore[union-attr]
        accepted = relay.query("SELECT COUNT(*) FROM messages")[0][0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and relay.counts().get("sent", 0) < accepted:
            time.sleep(0.5)
        sent = relay.counts().get("sent", 0)

        def show(name: str, result: dict[str, Any]) -> None:
            print(f"  {name:<22} {result['rate']:8.0f} req/s   p50 {result['p50']:6.2f} ms   "
                  f"p99 {result['p99']:6.2f} ms   non-2xx {result['non2xx']:.0f}")

        print(f"good key (4 connections, {args.seconds} s each):")
        show("alone", alone)
        show("during the flood", during)
        print(f"p99 during the flood / alone: {during['p99'] / alone['p99']:.2f}x")
        print(f"flood: {flooded['requests']:.0f} wrong-key requests at {flooded['rate']:.0f} req/s "
              f"({args.flood_connections} connections); log rows added: "
              f"{len(unauthorized) - rows_before} (accounting for {counted} refusals)")
        print(f"good sends accepted {accepted}, delivered {sent}")
        leaks = relay.leaks(key, WRONG_KEY)
        print("keys in the relay's logs: " + (", ".join(leaks) if leaks else "none"))
    finally:
        relay.cleanup()
        stop(sink)


if __name__ == "__main__":
    main()
