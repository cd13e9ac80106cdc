"""relay_core.store.logbook on both backends: kinds, keyset pages, filters, search, hourly counts, prune, clear.

Every count the counters table gives is checked against a COUNT(*) over the
log itself, after inserts, prunes and a clear: the table is only worth having
if it never drifts.
"""

from __future__ import annotations

import random
from pathlib import Path
from collections import Counter

import pytest

from relay_core.store import logbook
from relay_core.store.logbook import HOUR, LogFilter, log_kind, query_words, search_terms
from relay_core.store import LogEntry, Store, insert_log, transaction

pytestmark = pytest.mark.backends

T0 = 1_700_000_000.0  # 22:13:20 UTC: not on an hour boundary


def write(store: Store, *entries: LogEntry) -> list[int]:
    conn = store.conn()
    with transaction(conn):
        return [insert_log(conn, e) for e in entries]


def accepted(ts: float, to: str = "ann@example.com", subject: str = "Reset your password",
             sender: str = "noreply@portal.org") -> LogEntry:
    return LogEntry("accepted", "queued", message_id="m", sender=sender, recipients=to, subject=subject,
                    source_ip="203.0.113.9", ts=ts, attachments=1)


def attempt(ts: float, status: str, to: str = "ann@example.com") -> LogEntry:
    return LogEntry("attempt", status, message_id="m", stage="DATA", code=250 if status == "sent" else 451,
                    sender="noreply@portal.org", recipients=to, subject="Reset your password", ts=ts)


def true_counts(store: Store, since: float | None = None, until: float | None = None) -> dict[str, int]:
    rows = store.conn().execute("SELECT kind, COUNT(*) FROM log WHERE ts >= ? AND ts < ? GROUP BY kind",
                                (since if since is not None else -1e18, until if until is not None else 1e18))
    return {kind: n for kind, n in rows}


def counted(store: Store, since: float | None = None, until: float | None = None) -> dict[str, int]:
    return store.log.counters(since, until).by_kind


def fts_ok(store: Store) -> None:
    """FTS5's own check of its index against the rows it indexes (raises when they differ)."""
    if store.database.dialect != "sqlite":
        return  # PostgreSQL's GIN index is on an expression of the row: it cannot drift
    store.conn().execute("INSERT INTO log_fts (log_fts, rank) VALUES ('integrity-check', 1)")


# -- kinds and words ---------------------------------------------------------------------------------
@pytest.mark.parametrize("event, status, code, kind", [
    ("accepted", "queued", None, "accepted"), ("unauthorized", "rejected", 401, "unauthorized"),
    ("rejected", "rejected", 429, "rate_limited"), ("rejected", "rejected", 400, "rejected"),
    ("attempt", "sent", 250, "sent"), ("attempt", "partial", 550, "partial"),
    ("attempt", "deferred", 451, "deferred"), ("attempt", "failed", 550, "failed"),
    ("retry", "queued", None, "retried"), ("cancel", "cancelled", None, "cancelled"),
    ("cleared", "cleared", None, "cleared"),
])
def test_every_row_gets_its_kind(event: str, status: str, code: int | None, kind: str) -> None:
    assert log_kind(event, status, code) == kind


def test_search_words_are_lower_case_letters_and_digits_once() -> None:
    assert search_terms("Ann.Lee@Example.com", "ann.lee@example.com, bo_b@x.org", "Re: Réunion 2024!") == \
        "ann lee example com bo b x org re réunion 2024"
    assert query_words("  Example.COM  passw ") == ["example", "com", "passw"]
    assert query_words("-- !! --") == []


def test_the_row_records_kind_words_and_attachments(store: Store) -> None:
    [log_id] = write(store, accepted(T0, to="Ann@Example.com"))
    row = store.log.row(log_id)
    assert row is not None and (row.kind, row.attachments, row.source_ip) == ("accepted", 1, "203.0.113.9")
    terms = store.conn().execute("SELECT terms FROM log WHERE id = ?", (log_id,)).fetchone()[0]
    assert terms == "m noreply portal org ann example com reset your password"  # the message id first


# -- keyset pages ------------------------------------------------------------------------------------
def test_pages_walk_older_and_back_newer_and_stay_put_under_inserts(store: Store) -> None:
    ids = write(store, *[accepted(T0 + i, to=f"u{i}@example.com") for i in range(23)])
    first = store.log.page(LogFilter(), limit=10)
    assert [r.id for r in first.rows] == ids[::-1][:10]
    assert first.newer is None and first.older == ids[13]
    write(store, *[accepted(T0 + 100 + i) for i in range(5)])  # new rows arrive while the admin reads
    second = store.log.page(LogFilter(), before=first.older, limit=10)
    assert [r.id for r in second.rows] == ids[::-1][10:20]
    third = store.log.page(LogFilter(), before=second.older, limit=10)
    assert [r.id for r in third.rows] == ids[::-1][20:] and third.older is None
    assert third.newer == ids[2]
    back = store.log.page(LogFilter(), after=third.newer, limit=10)
    assert [r.id for r in back.rows] == ids[::-1][10:20]
    assert back.older == ids[3] and back.newer == ids[12]
    newest = store.log.page(LogFilter(), after=ids[-1], limit=10)
    assert len(newest.rows) == 5 and newest.newer is None


def test_an_empty_log_has_one_empty_page(store: Store) -> None:
    page = store.log.page(LogFilter(kind="sent"))
    assert page.rows == [] and page.older is None and page.newer is None


# -- filters -----------------------------------------------------------------------------------------
def test_filter_by_kind_and_time_range_is_exact_at_the_edges(store: Store) -> None:
    entries = [attempt(T0 + i * 600, random.Random(i).choice(["sent", "deferred", "failed"])) for i in range(60)]
    write(store, *entries)
    since, until = T0 + 1234.5, T0 + 6 * HOUR + 17
    want = [e for e in entries if since <= e.ts < until and e.status == "failed"]
    got = list(store.log.iter_rows(LogFilter(kind="failed", since=since, until=until), chunk=4))
    assert [r.ts for r in got] == sorted((e.ts for e in want), reverse=True)
    page = store.log.page(LogFilter(since=since, until=until), limit=1000)
    assert len(page.rows) == sum(1 for e in entries if since <= e.ts < until)


def test_search_finds_words_by_prefix_in_sender_recipients_and_subject(store: Store) -> None:
    write(store,
          accepted(T0, to="ann.lee@example.com", subject="Reset your password"),
          accepted(T0 + 1, to="bob@other.org, carol@example.com", subject="Welcome aboard"),
          accepted(T0 + 2, to="dave@example.net", subject="Your invoice", sender="billing@shop.example"),
          LogEntry("unauthorized", "rejected", code=401, detail="bad key", source_ip="198.51.100.1", ts=T0 + 3))

    def subjects(text: str, **kw: object) -> list[str]:
        rows = store.log.page(LogFilter(words=tuple(query_words(text)), **kw)).rows  # type: ignore[arg-type]
        return [r.subject for r in rows]

    assert subjects("ann") == ["Reset your password"]
    assert subjects("PASSW") == ["Reset your password"]
    assert subjects("carol@example.com") == ["Welcome aboard"]
    assert subjects("example.com") == ["Welcome aboard", "Reset your password"]
    assert subjects("billing") == ["Your invoice"]
    assert subjects("your") == ["Your invoice", "Reset your password"]
    assert subjects("your", kind="accepted", until=T0 + 1) == ["Reset your password"]
    assert subjects("nobody") == []
    assert subjects("xample") == []  # words are matched from their start
    write(store, accepted(T0 + 4, subject="Your bus pass"))
    assert subjects("pass") == ["Your bus pass"]  # a word the log holds whole is matched whole
    assert subjects("passw") == ["Reset your password"]


@pytest.mark.parametrize("walk", [0.0, 30.0], ids=["index", "walk"])
def test_a_prefix_search_gives_the_same_rows_by_walking_the_log_or_from_the_index(
        store: Store, monkeypatch: pytest.MonkeyPatch, walk: float) -> None:
    monkeypatch.setattr(logbook, "WALK_SECONDS", walk)
    write(store, *[accepted(T0 + i, to=f"member{i}@example.com", subject=["Reset your password", "Welcome"][i % 2])
                   for i in range(30)], LogEntry("unauthorized", "rejected", code=401, ts=T0 + 40))
    found = store.log.page(LogFilter(words=tuple(query_words("memb passw"))), limit=5)
    assert [r.recipients for r in found.rows] == [f"member{i}@example.com" for i in (28, 26, 24, 22, 20)]
    older = store.log.page(LogFilter(words=("memb", "passw")), before=found.older, limit=50)
    assert [r.recipients for r in older.rows] == [f"member{i}@example.com" for i in range(18, -1, -2)]
    assert [r.recipients for r in store.log.page(LogFilter(words=("member2",))).rows] == ["member2@example.com"]
    assert store.log.page(LogFilter(words=("membe",), kind="accepted")).rows[0].recipients == "member29@example.com"
    assert store.log.page(LogFilter(words=("zzz",))).rows == []


# -- counters ----------------------------------------------------------------------------------------
def _fill(store: Store, n: int = 400, seed: int = 7) -> list[LogEntry]:
    rng = random.Random(seed)
    entries: list[LogEntry] = []
    for i in range(n):
        ts = T0 + i * 97.3
        kind = rng.choice(["accepted", "sent", "deferred", "failed", "partial", "unauthorized", "limited"])
        if kind == "accepted":
            entries.append(accepted(ts))
        elif kind == "unauthorized":
            entries.append(LogEntry("unauthorized", "rejected", code=401, ts=ts))
        elif kind == "limited":
            entries.append(LogEntry("rejected", "rejected", code=429, ts=ts))
        else:
            entries.append(attempt(ts, kind))
    write(store, *entries)
    return entries


def test_counters_match_the_rows_for_any_range(store: Store) -> None:
    _fill(store)
    assert counted(store) == true_counts(store)
    assert store.log.counters().total == 400
    for since, until in [(None, T0 + 5 * HOUR), (T0 + 1800, None), (T0 + 1800, T0 + 2500), (T0 + 3 * HOUR + 5,
                         T0 + 9 * HOUR + 1), (T0 - HOUR, T0 + 20 * HOUR), (T0 + 7200, T0 + 7200)]:
        assert counted(store, since, until) == true_counts(store, since, until), (since, until)


def test_hourly_series_for_the_chart(store: Store) -> None:
    entries = _fill(store)
    now = T0 + 11 * HOUR + 5
    series = store.log.hourly(now=now, hours=24)
    assert len(series) == 24 and series[-1][0] == int(now // HOUR) * HOUR
    expected: Counter[tuple[int, str]] = Counter()
    for e in entries:
        if e.event == "attempt":
            expected[(int(e.ts // HOUR) * HOUR, e.status)] += 1
    for start, counts in series:
        assert counts == {k: expected[(start, k)] for k in ("sent", "deferred", "failed")}


def test_prune_keeps_counters_and_search_in_step(store: Store) -> None:
    _fill(store, n=600)
    now = T0 + 600 * 97.3 + 10
    store.workers.prune(now, sent_body_seconds=0, failed_body_seconds=0, log_seconds=now - (T0 + 5 * HOUR),
                        log_max_rows=10**9, idempotency_seconds=0)
    oldest = store.conn().execute("SELECT MIN(ts) FROM log").fetchone()[0]
    assert T0 + 4 * HOUR <= oldest < T0 + 5 * HOUR + 98  # whole hours go
    assert counted(store) == true_counts(store)
    store.workers.prune(now, sent_body_seconds=0, failed_body_seconds=0, log_seconds=10**9, log_max_rows=1000 - 999,
                        idempotency_seconds=0)
    remaining = store.conn().execute("SELECT COUNT(*) FROM log").fetchone()[0]
    assert remaining == 1
    assert counted(store) == true_counts(store)
    fts_ok(store)
    assert len(store.log.page(LogFilter(words=("reset",))).rows) <= 1


def test_clear_leaves_one_row_and_the_audit_trail(store: Store) -> None:
    _fill(store, n=50)
    removed = store.log.clear("admin", "192.0.2.4", now=T0 + 9 * HOUR)
    assert removed == 50
    [row] = store.log.page(LogFilter()).rows
    assert (row.kind, row.detail, row.source_ip, row.sender) == ("cleared", "log cleared by admin", "192.0.2.4",
                                                                 "admin")
    assert counted(store) == {"cleared": 1} == true_counts(store)
    [audit] = store.log.audit_entries(action_prefix="log.")
    assert (audit.actor, audit.ip, audit.action) == ("admin", "192.0.2.4", "log.clear")
    assert "50 rows" in audit.detail
    fts_ok(store)
    assert store.log.page(LogFilter(words=("reset",))).rows == []


def test_rows_from_before_the_migration_are_filled_in(store: Store) -> None:
    conn = store.conn()
    with transaction(conn):  # as an older relay wrote them: no kind, no words, not counted
        conn.execute("INSERT INTO log (ts, event, status, code, sender, recipients, subject) VALUES"
                     " (?, 'rejected', 'rejected', 429, '', '', ''), (?, 'attempt', 'sent', 250, 'a@b.org',"
                     " 'Zed@Example.com', 'Old news')", (T0, T0 + 10))
    store.migrate()
    assert counted(store) == {"rate_limited": 1, "sent": 1} == true_counts(store)
    [row] = store.log.page(LogFilter(words=("zed",))).rows
    assert row.subject == "Old news" and row.kind == "sent"
    fts_ok(store)


def test_last_attempts_newest_first(store: Store) -> None:
    write(store, attempt(T0, "sent"), attempt(T0 + 1, "deferred"), accepted(T0 + 2), attempt(T0 + 3, "failed"),
          accepted(T0 + 4))
    assert [r.kind for r in store.log.last_attempts(3)] == ["failed", "deferred", "sent"]


def test_migrate_store_carries_the_log_its_counts_and_its_search(tmp_path: Path, pg_url: str) -> None:
    from relay_core import crypto
    from relay_core.config import load_settings
    from relay_core.maintenance.transfer import copy_store
    from support import SECRET

    settings = load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "data")})
    source = Store.open(settings, crypto.derive_keys(settings))
    _fill(source, n=80)
    before = counted(source)
    source.shutdown()
    report = copy_store(settings, pg_url)
    assert report.tables["log"] == 80 and "log_fts" not in report.tables
    target_settings = load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "other"),
                                     "RELAY_DATABASE_URL": pg_url})
    target = Store.open(target_settings, crypto.derive_keys(target_settings))
    try:
        assert counted(target) == before == true_counts(target)
        assert len(target.log.page(LogFilter(words=("passw",)), limit=1000).rows) == sum(
            n for kind, n in before.items() if kind not in ("unauthorized", "rate_limited"))
    finally:
        target.shutdown()
