"""Send limits and refused-request counts in the store, on both backends.

Every test runs on a real SQLite file and on a fresh PostgreSQL database
(conftest.py). "Another process" is a second ``Store`` on the same
database, with connections (and, on PostgreSQL, a pool) of its own.
"""

from __future__ import annotations

import threading

import pytest

from relay_core.store.accounts import ApiKey
from relay_core.store.limits import effective_limit
from relay_core.options import Options
from relay_core.store.refusals import ADDRESS_ROWS_PER_MINUTE, DETAILED_PER_MINUTE, MISSING, WRONG
from relay_web.refusal_gate import RefusalGate
from relay_core.store import LogEntry, Store, transaction

pytestmark = pytest.mark.backends

T0 = 1_700_000_000.0  # a whole minute (T0 % 60 == 20: some seconds into it)



def take(store: Store, key_id: int, limit: int, now: float) -> object:
    conn = store.conn()
    with transaction(conn):
        return store.api_keys.take_send(conn, key_id, limit, now)


def test_the_limit_counts_sends_and_says_honestly_when_a_slot_frees(store: Store) -> None:
    key_id, _ = store.api_keys.add("limited")
    first = take(store, key_id, 3, T0)
    assert (first.limit, first.remaining, first.retry_after) == (3, 2, 0)  # type: ignore[attr-defined]
    take(store, key_id, 3, T0 + 600)  # ten minutes later
    take(store, key_id, 3, T0 + 601)
    refused = take(store, key_id, 3, T0 + 1200)
    # The first send was counted in minute T0 // 60; it leaves the window an hour after that minute began.
    frees_at = (T0 // 60 + 60) * 60
    assert refused.retry_after == refused.reset == int(frees_at - (T0 + 1200))  # type: ignore[attr-defined]
    assert refused.remaining == 0 and refused.headers()["Retry-After"] == str(refused.retry_after)  # type: ignore[attr-defined]
    # Still refused a second before; counted again once that minute has left the window.
    assert take(store, key_id, 3, frees_at - 1).retry_after == 1  # type: ignore[attr-defined]
    again = take(store, key_id, 3, frees_at)
    assert again.retry_after == 0 and again.remaining == 0  # type: ignore[attr-defined]
    # Other keys have counts of their own.
    other_id, _ = store.api_keys.add("other")
    assert take(store, other_id, 3, T0 + 1200).remaining == 2  # type: ignore[attr-defined]
    assert store.api_keys.sends_in_window(key_id, frees_at) == 3
    assert store.api_keys.prune_send_counts(frees_at + 3600) == 4  # rows: 3 minutes of this key, 1 of the other
    assert store.api_keys.sends_in_window(key_id, frees_at) == 0


def test_a_refused_send_rolls_its_count_back_with_its_job(store: Store) -> None:
    key_id, _ = store.api_keys.add("limited")
    conn = store.conn()
    with pytest.raises(RuntimeError):
        with transaction(conn):
            store.api_keys.take_send(conn, key_id, 5, T0)
            raise RuntimeError("the rest of the accept failed")
    assert store.api_keys.sends_in_window(key_id, T0) == 0


def test_the_count_is_exact_under_concurrent_accepts_from_two_processes(store: Store, other: Store) -> None:
    key_id, _ = store.api_keys.add("shared")
    limit, attempts = 25, 48
    outcomes: list[int] = []
    lock = threading.Lock()

    def run(relay: Store, n: int) -> None:
        for i in range(n):
            conn = relay.conn()
            with transaction(conn):
                quota = relay.api_keys.take_send(conn, key_id, limit, T0 + i * 0.001)
            with lock:
                outcomes.append(quota.retry_after)
        relay.close()

    threads = [threading.Thread(target=run, args=(s, attempts // 6)) for s in (store, other) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == attempts
    assert outcomes.count(0) == limit  # exactly the limit was let through, not one more
    assert store.api_keys.sends_in_window(key_id, T0) == limit


def test_which_limit_applies() -> None:
    key = ApiKey(1, "k", False, T0, None, "lookup")
    assert effective_limit(key, Options(), 0) == 0  # unlimited by default
    assert effective_limit(key, Options(), 50) == 50  # RELAY_SEND_PER_HOUR
    assert effective_limit(key, Options(send_per_hour=20), 50) == 20  # the setting wins over the environment
    assert effective_limit(key, Options(send_per_hour=0), 50) == 0
    own = ApiKey(1, "k", False, T0, None, "lookup", per_hour=5)
    assert effective_limit(own, Options(send_per_hour=20), 50) == 5  # the key's own wins
    assert effective_limit(ApiKey(1, "k", False, T0, None, "lookup", per_hour=0), Options(send_per_hour=20), 50) == 0


def test_key_limits_are_kept_changed_and_carried_to_a_new_portal_key(store: Store) -> None:
    key_id, _ = store.api_keys.add("scoped", 7, "example.org, a@b.org")
    key = next(k for k in store.api_keys.all() if k.id == key_id)
    assert (key.per_hour, key.allowed_from_items) == (7, ("example.org", "a@b.org"))
    assert store.api_keys.set_limits(key_id, per_hour=None) and store.api_keys.set_limits(key_id, allowed_from="")
    key = next(k for k in store.api_keys.all() if k.id == key_id)
    assert (key.per_hour, key.allowed_from) == (None, "")
    assert not store.api_keys.set_limits(9999, per_hour=3)
    primary = next(k for k in store.api_keys.all() if k.is_primary)
    store.api_keys.set_limits(primary.id, per_hour=100, allowed_from="example.org",
                              audit=("admin", "198.51.100.1", "api_key.limits", "set"))
    store.api_keys.new_primary()
    new = next(k for k in store.api_keys.all() if k.is_primary and k.revoked_at is None)
    assert (new.per_hour, new.allowed_from) == (100, "example.org")
    assert store.log.audit_entries(limit=1)[0].action == "api_key.limits"


# -- refused requests -----------------------------------------------------------------------------
def flush(gate: RefusalGate, store: Store) -> dict:
    made = gate.job(store)
    assert made is not None
    batch, job = made
    conn = store.conn()
    with transaction(conn):
        totals, _ = job(conn)
    gate.written(batch, totals)
    return totals


def log_rows(store: Store) -> list:
    return store.conn().execute("SELECT event, code, source_ip, detail, ts FROM log ORDER BY id").fetchall()


def test_refusals_are_one_log_row_per_address_minute_and_reason(store: Store) -> None:
    for i in range(3):
        store.log.write(LogEntry("accepted", "queued", message_id=f"m{i}", ts=T0 - 100 + i))
    gate = RefusalGate(clock=lambda: T0)
    for i in range(250):
        wait = gate.unauthenticated("203.0.113.9", WRONG, 100, T0 + i * 0.01)
        assert (wait == 0) is (i < 100)  # 401 up to the budget, then 429 ...
        assert wait == 0 or wait == 40 - int(i * 0.01)  # ... until the minute ends (T0 is 20 s into one)
    gate.unauthenticated("203.0.113.9", MISSING, 100, T0 + 3)
    gate.unauthenticated("198.51.100.4", WRONG, 100, T0 + 4)
    assert flush(gate, store) == {("203.0.113.9", int(T0 // 60)): 251, ("198.51.100.4", int(T0 // 60)): 1}
    for i in range(50):  # the same minute, later: the same row grows
        gate.unauthenticated("203.0.113.9", WRONG, 100, T0 + 10 + i * 0.01)
    flush(gate, store)
    rows = log_rows(store)
    assert [r["event"] for r in rows] == ["accepted"] * 3 + ["unauthorized"] * 3  # earlier rows kept
    wrong = [r for r in rows if r["source_ip"] == "203.0.113.9" and "wrong" in r["detail"]]
    assert len(wrong) == 1 and wrong[0]["code"] == 401 and wrong[0]["ts"] == T0
    assert wrong[0]["detail"].startswith("300 requests with a wrong API key from 203.0.113.9 in the minute from ")
    assert "200 of them answered 429 (over the limit of 100 a minute)" in wrong[0]["detail"]
    # The next minute starts a new row and a fresh budget.
    assert gate.unauthenticated("203.0.113.9", WRONG, 100, T0 + 60) == 0
    # A write the store refused is not lost: its counts go into the next one.
    batch = gate.take()
    assert batch is not None and gate.take() is None  # one write at a time
    gate.written(batch, None)
    gate.unauthenticated("203.0.113.9", WRONG, 100, T0 + 61)
    flush(gate, store)
    assert log_rows(store)[-1]["detail"].startswith("2 requests with a wrong API key")


def test_two_web_processes_share_one_budget_and_one_row(store: Store, other: Store) -> None:
    gates = [RefusalGate(clock=lambda: T0), RefusalGate(clock=lambda: T0)]
    for i in range(60):
        assert gates[0].unauthenticated("203.0.113.9", WRONG, 100, T0) == 0
    flush(gates[0], store)
    for i in range(40):
        assert gates[1].unauthenticated("203.0.113.9", WRONG, 100, T0) == 0
    assert flush(gates[1], other) == {("203.0.113.9", int(T0 // 60)): 100}
    # Each process now knows the other's count: the next one is over the budget in both.
    assert gates[1].unauthenticated("203.0.113.9", WRONG, 100, T0) > 0
    flush(gates[1], other)
    # The first process has not flushed since: it still judges by the 60 + 40 it last saw... plus
    # this one, which it answers 401 although the store already holds 101: a second late at most.
    assert gates[0].unauthenticated("203.0.113.9", WRONG, 100, T0 + 1) == 0
    assert flush(gates[0], store)[("203.0.113.9", int(T0 // 60))] == 102
    assert gates[0].unauthenticated("203.0.113.9", WRONG, 100, T0 + 1) > 0
    rows = [r for r in log_rows(store) if r["event"] == "unauthorized"]
    assert len(rows) == 1 and rows[0]["detail"].startswith("102 requests")


def test_refusals_with_a_good_key_keep_detail_then_are_counted(store: Store) -> None:
    gate = RefusalGate(clock=lambda: T0)
    detailed = [gate.detailed("203.0.113.9", T0) for _ in range(DETAILED_PER_MINUTE + 5)]
    assert detailed == [True] * DETAILED_PER_MINUTE + [False] * 5
    for _ in range(5):
        gate.counted("203.0.113.9", 400, "bad_request", T0)
    flush(gate, store)
    (row,) = log_rows(store)
    assert row["event"] == "rejected" and row["code"] == 400
    assert row["detail"].startswith("5 more requests refused with 400 from 203.0.113.9")
    assert gate.detailed("203.0.113.9", T0 + 60)  # a new minute
    assert store.log.prune_refusals(T0 + 2 * 86400) == 1


def test_a_flood_spread_over_many_addresses_adds_few_log_rows(store: Store) -> None:
    # 1,500 keyless requests from 750 addresses once added 1,500 log rows, pushing the real history out.
    for i in range(3):
        store.log.write(LogEntry("accepted", "queued", message_id=f"m{i}", ts=T0 - 100 + i))
    gate = RefusalGate(clock=lambda: T0)
    addresses = [f"10.0.{i // 250}.{i % 250}" for i in range(750)]
    for start in range(0, 750, 100):  # several flushes, as a web process makes about once a second
        for ip in addresses[start:start + 100]:
            for reason in (MISSING, WRONG):
                assert gate.unauthenticated(ip, reason, 100, T0) == 0
        flush(gate, store)
    rows = log_rows(store)
    assert [r["event"] for r in rows[:3]] == ["accepted"] * 3
    refused = rows[3:]
    assert len(refused) == 2 * (ADDRESS_ROWS_PER_MINUTE + 1)  # per reason: the first addresses, then one row
    shared = [r for r in refused if r["source_ip"] is None]
    assert sorted(r["detail"].split(" in the minute")[0] for r in shared) == [
        f"{750 - ADDRESS_ROWS_PER_MINUTE} requests with a wrong API key from {750 - ADDRESS_ROWS_PER_MINUTE} "
        "more addresses",
        f"{750 - ADDRESS_ROWS_PER_MINUTE} requests with no API key from {750 - ADDRESS_ROWS_PER_MINUTE} "
        "more addresses"]
    # Each address keeps its own budget, whichever row it is counted in.
    last = addresses[-1]
    for _ in range(98):
        assert gate.unauthenticated(last, WRONG, 100, T0 + 1) == 0
    assert gate.unauthenticated(last, WRONG, 100, T0 + 1) > 0
    flush(gate, store)
    assert len(log_rows(store)) == len(rows)
