"""Memory footprint of the relay on the guide's machine: PSS per process, idle and after 1,000 deliveries.

    python bench/bench_footprint.py [--deliveries N] [--modules]

Runs `tspro-relay run` (the quick start and the guide's one container), then `web` + `worker` as two
processes (the two-service compose file), each on a fresh SQLite data directory with an instant SMTP
sink on loopback. PSS (proportional set size) counts shared pages once across the processes, so the
sum is what the box pays. `--modules` also prints how many modules each process imported.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import Relay, free_port, portal_message, start_sink, stop, wait_http


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    tree = [root]
    for pid in tree:
        tree.extend(child for child, parent in parents.items() if parent == pid and child not in tree)
    return tree


def role(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode() for a in args if a]
    if "relay_web.supervisor" in words:
        return "supervisor"
    for name in ("run", "web", "worker"):
        if name in words:
            return name
    return " ".join(words[-2:])


def report(label: str, roots: list[int]) -> float:
    pids = [pid for root in roots for pid in process_tree(root)]
    figures = [(role(pid), pss_mib(pid)) for pid in pids]
    total = sum(f for _, f in figures)
    detail = ", ".join(f"{name} {mib:.1f}" for name, mib in figures)
    print(f"  {label:<28} {total:6.1f} MiB PSS in {len(pids)} processes ({detail})")
    return total


def deliver(relay: Relay, count: int) -> None:
    key = relay.key
    with httpx.Client(base_url=relay.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for i in range(count):
            assert client.post("/api/send", json=portal_message(i)).status_code == 202
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if relay.counts().get("sent", 0) >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {relay.counts()} after two minutes")


def configure(relay: Relay, sink_port: int) -> None:
    relay.cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={sink_port}", "smtp_security=none",
              "default_from=noreply@example.org", "allowed_from=example.org")


def measure_run(sink_port: int, deliveries: int) -> None:
    relay = Relay()
    configure(relay, sink_port)
    proc = subprocess.Popen([sys.executable, "-m", "relay_cli", "run", "--host", "127.0.0.1",
                             "--port", str(relay.port)], env=relay.env, cwd=relay.dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(relay.url + "/healthz")
        time.sleep(4)
        print("`tspro-relay run` (one command, as the guide's container runs it)")
        report("idle", [proc.pid])
        deliver(relay, deliveries)
        time.sleep(2)
        report(f"after {deliveries} deliveries", [proc.pid])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        relay.cleanup()


def measure_split(sink_port: int, deliveries: int) -> None:
    relay = Relay()
    configure(relay, sink_port)
    try:
        relay.start_web()
        relay.start_worker()
        time.sleep(4)
        assert relay.web is not None
        print("`tspro-relay web` + `tspro-relay worker` (the two-service compose file)")
        roots = [relay.web.pid, relay.workers[0].pid]
        report("idle", roots)
        deliver(relay, deliveries)
        time.sleep(2)
        report(f"after {deliveries} deliveries", roots)
    finally:
        relay.cleanup()


def count_modules() -> None:
    """What each role imports, as its process does (web and worker leave out unused drivers first)."""
    here = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(here), "RELAY_SECRET_KEY": "x" * 40}
    prologue = ("import sys; from relay_core.config import load_settings; import relay_cli.processes as cli; "
                "cli.leave_out_unused_drivers(load_settings()); ")
    for what, code in [
        ("the supervisor (python -m relay_web.supervisor)", "import relay_web.supervisor"),
        ("the command line (import relay_cli.main)", "import relay_cli.main"),
        ("the web process", prologue + "import relay_web.server"),
        ("the worker", prologue + "import relay_worker.consumer"),
    ]:
        out = subprocess.run([sys.executable, "-c", f"{code}; import sys; print(len(sys.modules), "
                              "sorted(m for m in ('starlette', 'uvicorn', 'jinja2', 'huey', 'psycopg', 'redis', "
                              "'prometheus_client') if sys.modules.get(m)))"],
                             env=env, capture_output=True, text=True, check=True)
        count, _, libraries = out.stdout.strip().partition(" ")
        print(f"  {what:<48} {count:>4} modules; of the big libraries: {libraries}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--modules", action="store_true")
    args = parser.parse_args()
    sink_port = free_port()
    sink = start_sink(sink_port)
    try:
        measure_run(sink_port, args.deliveries)
        measure_split(sink_port, args.deliveries)
        if args.modules:
            print("Modules imported")
            count_modules()
    finally:
        stop(sink)


if __name__ == "__main__":
    main()
