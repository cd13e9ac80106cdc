"""The two store backends side by side: SQLite (relay.db, queue.db) and PostgreSQL (with Redis).

    python bench/bench_backends.py [--seconds 10] [--quick]

Prints, in one run, for each backend:
  1. the web process alone: accepted requests/s, p50 and p99 (wrk, 16
     connections, 2 KB portal messages, no worker running);
  2. end-to-end delivery to a sink that takes 200 ms per message, with 1 and
     with 3 worker processes of 8 threads each (bound: threads / 0.2 s, so 40
     and 120 msg/s), timed as bench_send.py does: from the first delivery's
     start to the last recorded `sent`.
PostgreSQL is a throwaway cluster started here from Debian's postgresql
package (fsync on, as the tests start it; tests/services.py), with a fresh
database per figure; Redis is Debian's redis-server. Needs wrk. Talks to
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from bench_send import accept_rate, delivery_rate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import PostgresCluster, RedisServer  # noqa: E402  (the tests' throwaway servers)

SLOW = 0.2
THREADS = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--quick", action="store_true", help="smaller delivery runs (to check the script)")
    args = parser.parse_args()
    per_worker = 120 if args.quick else 400  # messages per worker process: about 3 s (10 s) at the bound

    with ExitStack() as stack:
        cluster = PostgresCluster().start()
        stack.callback(cluster.stop)
        redis = RedisServer()
        stack.callback(redis.stop)

        def postgres() -> dict[str, str]:
            name, url = cluster.create_database()
            stack.callback(cluster.drop_database, name)
            return {"RELAY_DATABASE_URL": url, "RELAY_QUEUE_URL": redis.fresh_url()}

        backends: list[tuple[str, Callable[[], dict[str, str]]]] = [("SQLite", dict), ("PostgreSQL", postgres)]
        rows = []
        for label, env in backends:
            web = accept_rate(args.seconds, with_worker=False, env=env())
            print(f"{label:<10} web alone : {web['rate']:8.0f} req/s  p50 {web['p50']:6.2f} ms"
                  f"  p99 {web['p99']:6.2f} ms  non-2xx {web['non2xx']:.0f}", flush=True)
            rates = {}
            for workers in (1, 3):
                rates[workers] = delivery_rate(per_worker * workers, SLOW, threads=THREADS, workers=workers,
                                               env=env())
                bound = workers * THREADS / SLOW
                print(f"{label:<10} 200 ms sink, {workers} worker(s) x {THREADS} threads: {rates[workers]:6.1f} msg/s"
                      f"  ({rates[workers] / bound:.0%} of the {bound:.0f} msg/s bound)", flush=True)
            rows.append((label, web, rates))

    print()
    print("| backend | web alone: req/s | p50 ms | p99 ms | 200 ms sink, 1 worker (bound 40) "
          "| 3 workers (bound 120) | 3 vs 1 |")
    print("|---|---|---|---|---|---|---|")
    for label, web, rates in rows:
        print(f"| {label} | {web['rate']:.0f} | {web['p50']:.2f} | {web['p99']:.2f} | {rates[1]:.1f} msg/s "
              f"| {rates[3]:.1f} msg/s | {rates[3] / rates[1]:.2f}x |")


if __name__ == "__main__":
    main()
