"""Start-up to the first answer: from starting `tspro-relay run` or `web` to the first 200 of /healthz.

    python bench/bench_startup.py [--rounds 5]

Each round starts the command on a data directory that already exists (a restart, not a first boot:
that one also creates the store and hashes the admin password), polls /healthz every 10 ms, and stops
it again. Prints each round and the median. Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx

from common import Relay


def first_answer(relay: Relay, command: str, timeout: float = 30.0) -> float:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "relay_cli", command, "--host", "127.0.0.1", "--port",
                             str(relay.port)], env=relay.env, cwd=relay.dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.monotonic() - started < timeout:
            try:
                if httpx.get(relay.url + "/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{command} did not answer within {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    relay = Relay()
    try:
        relay.cli("config", "show")  # the first boot: the store exists from here on
        for command in ("run", "web"):
            times = [first_answer(relay, command) for _ in range(args.rounds)]
            rounds = ", ".join(f"{t:.2f}" for t in times)
            print(f"tspro-relay {command:<4} first /healthz answer: median {statistics.median(times):.2f} s "
                  f"(rounds: {rounds})")
    finally:
        relay.cleanup()


if __name__ == "__main__":
    main()
