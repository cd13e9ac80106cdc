"""One web process or two on the same PostgreSQL store: what the second one adds.

    python bench/bench_web_processes.py [--seconds 10] [--rounds 2]

Starts a throwaway PostgreSQL cluster and redis-server on loopback, then two
`tspro-relay web` processes (no worker) on
one database. Each round drives the first alone with 16 connections, then
both at once with 8 each, the same 2 KB portal message throughout, and
prints the accepted requests/s (the sum, for two), p50 and p99 of each.
Needs wrk. Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import sys
import threading
from contextlib import ExitStack

from common import HERE, Relay, free_port, portal_message, wrk

sys.path.insert(0, str(HERE.parent / "tests"))
from services import PostgresCluster, RedisServer  # noqa: E402  (the tests' throwaway servers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    message = portal_message()
    with ExitStack() as stack:
        cluster = PostgresCluster().start()
        stack.callback(cluster.stop)
        redis = RedisServer()
        stack.callback(redis.stop)
        _, url = cluster.create_database()
        env = {"RELAY_DATABASE_URL": url, "RELAY_QUEUE_URL": redis.fresh_url()}
        webs = [Relay(**env), Relay(**env)]
        for relay in webs:
            stack.callback(relay.cleanup)
        # Configured (so sends are accepted) but nothing listens there: no worker runs anyway.
        webs[0].cli("config", "set", "smtp_host=127.0.0.1", f"smtp_port={free_port()}", "smtp_security=none")
        for relay in webs:
            relay.start_web()
        key = webs[0].key
        for number in range(1, args.rounds + 1):
            one = wrk(webs[0].url + "/api/send", message, key, seconds=args.seconds, connections=16, threads=1)
            print(f"round {number}, one web process:  {one['rate']:7.0f} req/s  p50 {one['p50']:6.2f} ms"
                  f"  p99 {one['p99']:6.2f} ms  non-2xx {one['non2xx']:.0f}", flush=True)
            both: list[dict[str, float]] = [{}, {}]

            def drive(index: int) -> None:
                both[index] = wrk(webs[index].url + "/api/send", message, key, seconds=args.seconds,
                                  connections=8, threads=1)

            threads = [threading.Thread(target=drive, args=(index,)) for index in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(f"round {number}, two web processes: {both[0]['rate'] + both[1]['rate']:7.0f} req/s"
                  f"  p50 {both[0]['p50']:.2f} / {both[1]['p50']:.2f} ms"
                  f"  p99 {both[0]['p99']:.2f} / {both[1]['p99']:.2f} ms"
                  f"  non-2xx {both[0]['non2xx'] + both[1]['non2xx']:.0f}", flush=True)


if __name__ == "__main__":
    main()
