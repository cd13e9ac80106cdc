"""Benchmark: the portal's sends and an admin's pages while strangers and a bad key lean on the web.

    python bench/bench_hostile.py [--seconds 25] [--cpus 0] [--code DIR] [--no-signins]
    python bench/bench_hostile.py --protocol-cost [--seconds 5]

Starts `tspro-relay web` (SQLite; SMTP set to a closed port: sends only need
accepting), signs an admin in, uses a second key up to its limit of one send
an hour, then for --seconds runs, from a child process, all at once:
  - 200 stalled request heads (half a head, then nothing; reconnect when hung up);
  - 20 endless header lines (16 KiB every 10 ms; at most 32 MiB a connection);
  - 20 slow 36 MB bodies under the over-limit key (a byte every 2 s);
  - 50 concurrent wrong sign-ins, wave after wave.
Meanwhile it measures the portal's good sends (2 clients, one send each per
50 ms: all must be 202), GET / for the signed-in admin every 100 ms, and
every 50 ms the RSS of what `tspro-relay web` started (its supervisor and
the server). Prints the figures and the attackers' answers. --cpus pins the web (and its children) to those CPUs;
--code DIR runs the relay from another checkout (main, for "before").

--protocol-cost instead measures what the bounded head costs: wrk against a
bare endpoint (bare_app.py) under uvicorn's httptools protocol and under the
relay's, alternating.

Bounded: the attack stops at --seconds, or as soon as the web passes 2 GiB.
Talks to 127.0.0.1 only. Goals: RSS <= 150 MiB, sends p99 <= 250 ms, admin p99 <= 500 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Awaitable

import httpx

from common import HERE, Relay, free_port, portal_message, rss_mib, stop, wait_http, wrk

RSS_CEILING_MIB = 2048
PASSWORD = "bench-admin-password-1"
WRONG = "not-the-password"


# -- the attackers (run in a child process: python bench_hostile.py --attack URL KEY SECONDS [--no-signins]) --
async def answered(reader: asyncio.StreamReader) -> str:
    """The status of the answer the server sends before it hangs up ('closed' without one)."""
    try:
        data = await reader.read(4096)
    except (ConnectionError, OSError):
        return "reset"
    match = re.match(rb"HTTP/1\.1 (\d+)", data)
    return match.group(1).decode() if match else "closed"


async def stalled_head(port: int, until: float, tally: Counter[str]) -> None:
    while time.monotonic() < until:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\n")
        try:
            outcome = await asyncio.wait_for(answered(reader), until - time.monotonic())
        except asyncio.TimeoutError:
            outcome = "held to the end"
        tally["stalled head " + outcome] += 1
        writer.close()


async def endless_header(port: int, until: float, tally: Counter[str]) -> None:
    chunk = b"x" * 16384
    while time.monotonic() < until:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\nX-Endless: ")
        answer = asyncio.ensure_future(answered(reader))
        sent, outcome = 0, "held to the end"
        try:
            while not answer.done() and time.monotonic() < until:
                if sent >= 32 * 1024 * 1024:
                    outcome = "sent 32 MiB"
                    break
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        if answer.done():
            outcome = answer.result()
        answer.cancel()
        tally["endless header " + outcome] += 1
        writer.close()


async def slow_body(port: int, key: str, until: float, tally: Counter[str]) -> None:
    """Dribble a 36 MB body; after an answer too, as an attacker would, until the server hangs up."""
    while time.monotonic() < until:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST /api/send HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {key}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 36000000\r\n\r\n{").encode())
        outcome = "held to the end"
        try:
            while time.monotonic() < until:
                try:
                    data = await asyncio.wait_for(reader.read(4096), 2)
                except asyncio.TimeoutError:
                    writer.write(b" ")
                    continue
                if not data:
                    outcome = "closed"
                    break
                status = re.match(rb"HTTP/1\.1 (\d+)", data)
                if status:
                    tally["slow body answered " + status.group(1).decode()] += 1
        except (ConnectionError, OSError):
            outcome = "reset"
        tally["slow body " + outcome] += 1
        writer.close()


async def wrong_sign_ins(url: str, until: float, tally: Counter[str]) -> None:
    async def one(http: httpx.AsyncClient) -> None:
        page = await http.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        answer = await http.post("/login", data={"username": "admin", "password": WRONG, "next": "/",
                                                 "csrf_token": token.group(1) if token else ""},
                                 headers={"Origin": url})
        tally[f"sign-in {answer.status_code}"] += 1

    while time.monotonic() < until:
        clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(50)]
        try:
            await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients), return_exceptions=True),
                                   max(0.1, until - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        for client in clients:
            await client.aclose()


async def attack(url: str, key: str, seconds: float, signins: bool) -> Counter[str]:
    port = int(url.rsplit(":", 1)[1])
    until = time.monotonic() + seconds
    tally: Counter[str] = Counter()
    jobs = [stalled_head(port, until, tally) for _ in range(200)]
    jobs += [endless_header(port, until, tally) for _ in range(20)]
    jobs += [slow_body(port, key, until, tally) for _ in range(20)]
    if signins:
        jobs.append(wrong_sign_ins(url, until, tally))
    await asyncio.gather(*jobs, return_exceptions=True)
    return tally


# -- the measurement --------------------------------------------------------------------------------
def group_pids(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def group_rss(pid: int) -> float:
    total = 0.0
    for member in group_pids(pid):
        try:
            total += rss_mib(member)
        except (OSError, RuntimeError):
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def status_of(request: Awaitable[httpx.Response]) -> int | str:
    try:
        return (await request).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def portal_sends(url: str, key: str, until: float) -> tuple[list[float], Counter[int | str]]:
    times: list[float] = []
    statuses: Counter[int | str] = Counter()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            i = 0
            while time.monotonic() < until:
                started = time.perf_counter()
                statuses[await status_of(http.post("/api/send", json=portal_message(i)))] += 1
                times.append((time.perf_counter() - started) * 1000)
                i += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(client(), client())
    return times, statuses


async def admin_pages(http: httpx.AsyncClient, until: float) -> tuple[list[float], Counter[int | str]]:
    times: list[float] = []
    statuses: Counter[int | str] = Counter()
    while time.monotonic() < until:
        started = time.perf_counter()
        statuses[await status_of(http.get("/"))] += 1
        times.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.1)
    return times, statuses


def sign_in(url: str) -> httpx.AsyncClient:
    with httpx.Client(base_url=url) as http:
        page = http.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token, "no sign-in form"
        answer = http.post("/login", data={"username": "admin", "password": PASSWORD, "next": "/",
                                           "csrf_token": token.group(1)}, headers={"Origin": url})
        assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text[:300]
        return httpx.AsyncClient(base_url=url, timeout=60, cookies=http.cookies)


def run(seconds: float, cpus: set[int] | None, code: str | None, signins: bool) -> None:
    relay = Relay(RELAY_INSECURE_COOKIES="1")  # plain HTTP on loopback: the session cookie without Secure
    if code:
        relay.env["PYTHONPATH"] = code
    relay.cli("config", "set", "smtp_host=127.0.0.1", "smtp_port=2", "smtp_security=none")
    # Set by the CLI, the password needs no change at the first sign-in (the seeded one would).
    subprocess.run([sys.executable, "-m", "relay_cli", "admin", "set-password", "--password-stdin"],
                   input=PASSWORD + "\n", text=True, env=relay.env, cwd=relay.dir, check=True, capture_output=True)
    limited = relay.cli("api-key", "add", "--label", "over its limit", "--per-hour", "1").split()[-1]
    attacker = None
    try:
        relay.start_web()
        assert relay.web is not None
        pid = relay.web.pid  # what `tspro-relay web` started: its supervisor, if it has one, and the server
        if cpus:
            for member in group_pids(pid):
                os.sched_setaffinity(member, cpus)
        key = relay.key
        assert httpx.post(relay.url + "/api/send", json=portal_message(),
                          headers={"Authorization": f"Bearer {limited}"}).status_code == 202  # its one send
        admin = sign_in(relay.url)
        idle = group_rss(pid)
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], group_rss(pid))
                if peak[0] > RSS_CEILING_MIB and attacker is not None and attacker.poll() is None:
                    attacker.kill()  # bounded: spare the machine

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        attacker = subprocess.Popen([sys.executable, __file__, "--attack", relay.url, limited, str(seconds),
                                     *([] if signins else ["--no-signins"])], stdout=subprocess.PIPE, text=True)
        time.sleep(1)  # let the attack take hold
        until = time.monotonic() + seconds - 2

        async def measure() -> tuple[tuple[list[float], Counter[int | str]], tuple[list[float], Counter[int | str]]]:
            async with admin:
                return await asyncio.gather(portal_sends(relay.url, key, until), admin_pages(admin, until))

        (sends, send_statuses), (pages, page_statuses) = asyncio.run(measure())
        out, _ = attacker.communicate(timeout=seconds + 120)
        stop.set()
        sampler.join()
        tally = json.loads(out) if out.strip() else {"attacker": "killed at the RSS ceiling"}
        print(f"web group RSS: idle {idle:.0f} MiB, peak {peak[0]:.0f} MiB"
              + (f" (attack stopped at the {RSS_CEILING_MIB} MiB ceiling)" if peak[0] > RSS_CEILING_MIB else ""))
        print(f"good sends: {len(sends)}, answers {dict(send_statuses)}, p50 {statistics.median(sends):.0f} ms, "
              f"p99 {percentile(sends, 0.99):.0f} ms")
        print(f"admin GET /: {len(pages)}, answers {dict(page_statuses)}, p50 {statistics.median(pages):.0f} ms, "
              f"p99 {percentile(pages, 0.99):.0f} ms")
        print("attackers' outcomes:", ", ".join(f"{k} x{v}" for k, v in sorted(tally.items())))
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        relay.cleanup()


def protocol_cost(seconds: int, rounds: int = 3) -> None:
    """wrk against the bare endpoint (bare_app.py) with uvicorn's httptools protocol and with the
    relay's, alternating, so both see the same load from the rest of the machine."""
    figures: dict[str, list[dict[str, float]]] = {"httptools": [], "limited": []}
    for _ in range(rounds):
        for name in figures:
            port = free_port()
            env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
            proc = subprocess.Popen([sys.executable, str(HERE / "bare_app.py"), str(port), name], env=env)
            try:
                wait_http(f"http://127.0.0.1:{port}/")
                wrk(f"http://127.0.0.1:{port}/api/send", portal_message(), "x", seconds=1)
                figures[name].append(wrk(f"http://127.0.0.1:{port}/api/send", portal_message(), "x", seconds=seconds))
            finally:
                stop(proc)
    for name, runs in figures.items():
        rates = [run["rate"] for run in runs]
        print(f"{name}: {statistics.median(rates):.0f} req/s median of {', '.join(f'{r:.0f}' for r in rates)}; "
              f"p99 {statistics.median(run['p99'] for run in runs):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument("--cpus", help="pin the web to these CPUs, e.g. 0")
    parser.add_argument("--code", help="run the relay from this checkout (e.g. /work/main)")
    parser.add_argument("--no-signins", dest="signins", action="store_false")
    parser.add_argument("--protocol-cost", action="store_true",
                        help="instead: requests/s of a bare endpoint with httptools and with the relay's protocol")
    parser.add_argument("--attack", nargs=3, metavar=("URL", "KEY", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        url, key, seconds = args.attack
        print(json.dumps(asyncio.run(attack(url, key, float(seconds), args.signins))))
        return
    if args.protocol_cost:
        protocol_cost(int(args.seconds) if args.seconds != 25 else 5)
        return
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    run(args.seconds, cpus, args.code, args.signins)


if __name__ == "__main__":
    main()
