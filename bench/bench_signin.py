"""Benchmark the sign-in page under a burst of wrong passwords: the web's memory and an admin's wait.

    python bench/bench_signin.py [--attempts 50] [--rounds 1] [--database-url postgresql://...]

Starts a real `tspro-relay web` on a fresh store, signs an admin in, then
sends ``--attempts`` wrong sign-ins at once (one sign-in form's cookie and
token, each with its own wrong password, as a script would) while the
signed-in admin loads the queue page over and over. Prints the web
process's RSS before the burst and its peak during it (VmHWM, reset first),
how the attempts were answered, and the admin page's p50 and p99 during the
burst (and at rest before it). Each round uses a fresh relay (the lockout
from one burst would answer the next).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import Relay, peak_rss_mib, rss_mib  # noqa: E402

PASSWORD = "bench-admin-password-1"
_TOKEN = re.compile(r'name="csrf_token" value="([^"]*)"')


def set_password(relay: Relay) -> None:
    subprocess.run([sys.executable, "-m", "relay_cli", "admin", "set-password", "--password-stdin"],
                   input=PASSWORD + "\n", env=relay.env, cwd=relay.dir, capture_output=True, text=True, check=True)


async def login_form(client: httpx.AsyncClient) -> str:
    """Fetch the sign-in page: the client keeps its cookie, the token is returned."""
    page = await client.get("/login")
    match = _TOKEN.search(page.text)
    assert match, "no token on the sign-in page"
    return match.group(1)


async def sign_in(client: httpx.AsyncClient, token: str, password: str) -> httpx.Response:
    fields = {"username": "admin", "password": password, "next": "/", "csrf_token": token}
    return await client.post("/login", data=fields, headers={"Origin": str(client.base_url).rstrip("/")})


def outcome(response: httpx.Response) -> str:
    if response.status_code == 200 and "Wrong username or password" in response.text:
        return "checked, wrong"
    if "Too many failed sign-ins" in response.text:
        return "locked out"
    return str(response.status_code)


async def one_round(relay: Relay, attempts: int) -> dict[str, object]:
    assert relay.web is not None
    limits = httpx.Limits(max_connections=attempts + 10)
    async with httpx.AsyncClient(base_url=relay.url, timeout=600, limits=limits) as admin, \
            httpx.AsyncClient(base_url=relay.url, timeout=600, limits=limits) as attacker:
        answer = await sign_in(admin, await login_form(admin), PASSWORD)
        assert answer.status_code == 303, answer.text
        at_rest = []
        for _ in range(30):
            started = time.perf_counter()
            assert (await admin.get("/")).status_code == 200
            at_rest.append((time.perf_counter() - started) * 1000)
        token = await login_form(attacker)
        rss_before, peak_before = rss_mib(relay.web.pid), peak_rss_mib(relay.web.pid)
        Path(f"/proc/{relay.web.pid}/clear_refs").write_text("5")  # VmHWM restarts: the burst's peak alone

        page_times: list[float] = []
        done = asyncio.Event()

        async def browse() -> None:
            while not done.is_set():
                started = time.perf_counter()
                assert (await admin.get("/")).status_code == 200
                page_times.append((time.perf_counter() - started) * 1000)

        browsing = asyncio.create_task(browse())
        started = time.perf_counter()
        try:
            answers = await asyncio.gather(*(sign_in(attacker, token, f"wrong-guess-{i}") for i in range(attempts)))
        finally:
            done.set()
            burst = time.perf_counter() - started
            await browsing
        failures = relay.query("SELECT COUNT(*) FROM login_failures")[0][0]
        right = await sign_in(attacker, token, PASSWORD)
    times, at_rest = sorted(page_times), sorted(at_rest[5:])
    return {
        "rest_p50": statistics.median(at_rest), "rest_max": at_rest[-1],
        "rss_before": rss_before, "peak_before": peak_before, "peak_after": peak_rss_mib(relay.web.pid),
        "burst_s": burst, "answers": Counter(outcome(a) for a in answers),
        "failures_recorded": failures,
        "right_password_after": outcome(right),
        "pages": len(times), "page_p50": statistics.median(times) if times else 0.0,
        "page_p99": times[min(len(times) - 1, int(len(times) * 0.99))] if times else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--queue-url", default="")
    args = parser.parse_args()
    env = {"RELAY_INSECURE_COOKIES": "1"}
    if args.database_url:
        env.update(RELAY_DATABASE_URL=args.database_url, RELAY_QUEUE_URL=args.queue_url)
    for number in range(1, args.rounds + 1):
        relay = Relay(**env)
        try:
            set_password(relay)  # (migrates a fresh store first)
            if args.database_url:
                relay.query("DELETE FROM login_failures RETURNING id")  # the same database every round
            relay.start_web()
            figures = asyncio.run(one_round(relay, args.attempts))
        finally:
            relay.cleanup()
        print(f"round {number}: {args.attempts} wrong sign-ins at once took {figures['burst_s']:.2f} s")
        print(f"  web RSS before {figures['rss_before']:.0f} MiB (peak so far {figures['peak_before']:.0f}),"
              f" peak during the burst {figures['peak_after']:.0f} MiB")
        answers = dict(figures["answers"])  # type: ignore[call-overload]
        print(f"  answers: {answers}; the right password next: {figures['right_password_after']}")
        print(f"  failed sign-ins in the store's window after the burst: {figures['failures_recorded']}")
        print(f"  admin page during the burst: {figures['pages']} loads, p50 {figures['page_p50']:.0f} ms,"
              f" p99 {figures['page_p99']:.0f} ms (at rest before it: p50 {figures['rest_p50']:.0f} ms,"
              f" slowest of 25 {figures['rest_max']:.0f} ms)")


if __name__ == "__main__":
    main()
