"""The Transaction Log page, its CSV export, and Clear log.

Filters travel in the query string, so a filtered page can be bookmarked and
exported as it is; keyset pages keep "Older" and "Newer" right while rows arrive.
"""

from __future__ import annotations

import calendar
import csv
import io
import time
from dataclasses import dataclass
from typing import Iterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from relay_core.store.logbook import KINDS, LogFilter, LogRow, query_words

from .forms import FormState, confirmed, read_form
from .keys import confirm_page
from .sessions import relay_state, require_admin
from .settings_page import actor
from .templating import render

PAGE_SIZE = 50
EXPORT_CHUNK = 2000
RANGES = {"": ("Any time", None), "hour": ("Last hour", 3600), "day": ("Last 24 hours", 86400),
          "week": ("Last 7 days", 7 * 86400), "month": ("Last 30 days", 30 * 86400),
          "custom": ("Between the dates below", None)}
# Every kind, so the tiles add up to Total.
COUNTERS = [("total", "Total"), *KINDS.items()]
CSV_COLUMNS = ["time_utc", "status", "message_id", "sender", "recipients", "subject", "attachments", "source_ip",
               "stage", "code", "detail", "duration_ms", "row_id"]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class LogQuery:
    """The page's query string, checked: a filter, a page position, and what to say about bad parts."""

    flt: LogFilter
    shown: FormState
    before: int | None = None
    after: int | None = None

    def params(self, **extra: str | int) -> str:
        """The query string for the same filter (and ``extra``), for links and the export."""
        from urllib.parse import urlencode

        values = {k: v for k, v in self.shown.values.items() if v}
        values.update({k: str(v) for k, v in extra.items()})
        return urlencode(values)


def _parse_time(text: str) -> float:
    """'2026-05-01T14:30' (or with seconds, or a date alone), read as UTC."""
    text = text.strip()
    for layout in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text, layout)))
        except ValueError:
            continue
    raise ValueError(text)


def _position(value: str) -> int | None:
    return int(value) if value.isdigit() and len(value) < 19 else None


def parse_query(request: Request, now: float | None = None) -> LogQuery:
    now = time.time() if now is None else now
    params = request.query_params
    shown = FormState(values={name: params.get(name, "").strip() for name in ("status", "range", "from", "to", "q")})
    kind = shown.values["status"]
    if kind and kind not in KINDS:
        shown.errors["status"] = f"There is no status {kind!r}; showing every status."
        kind = ""
    span = shown.values["range"]
    if span not in RANGES:
        shown.errors["range"] = "Choose one of the time ranges offered."
        span = ""
    since = until = None
    if span and span != "custom":
        since = now - float(RANGES[span][1] or 0)
    if shown.values["from"] or shown.values["to"]:
        if span not in ("", "custom"):
            shown.errors["range"] = "Choose “Between the dates below” to use the dates, or clear them."
        else:
            for name in ("from", "to"):
                if not shown.values[name]:
                    continue
                try:
                    moment = _parse_time(shown.values[name])
                except ValueError:
                    shown.errors[name] = "Give a date and time such as 2026-05-01 14:30 (UTC)."
                    continue
                if name == "from":
                    since = moment
                else:
                    until = moment + (86400 if len(shown.values[name]) == 10 else 60)  # the whole day or minute
            if since is not None and until is not None and since >= until:
                shown.errors["to"] = "“To” must be after “From”."
                since = until = None
    words = query_words(shown.values["q"])
    if shown.values["q"] and not words:
        shown.errors["q"] = "Search for a word of the sender, a recipient or the subject (letters or digits)."
    flt = LogFilter(kind or None, since, until, tuple(words))
    return LogQuery(flt, shown, _position(params.get("before", "")), _position(params.get("after", "")))


@require_admin
async def log_page(request: Request) -> Response:
    query = parse_query(request)
    store = relay_state(request).store
    page = await run_in_threadpool(store.log.page, query.flt, query.before, query.after, PAGE_SIZE)
    counters = await run_in_threadpool(store.log.counters, query.flt.since, query.flt.until)
    cleared = request.query_params.get("cleared", "")
    span = query.shown.get("range")
    if span in RANGES and span not in ("", "custom") and "range" not in query.shown.errors:
        counted_over = RANGES[span][0].lower()
    elif query.flt.since is not None or query.flt.until is not None:
        counted_over = "between the dates chosen"
    else:
        counted_over = "the whole log"
    return render(request, "logs.html", {
        "query": query, "page": page, "counters": counters, "counter_names": COUNTERS,
        "status_choices": [("", "Every status"), *KINDS.items()],
        "range_choices": [(key, label) for key, (label, _) in RANGES.items()],
        "counted_over": counted_over, "filtered": query.flt.active,
        "notice": f"The log was cleared ({cleared} rows removed)." if cleared.isdigit() else "",
    })


# -- the export -----------------------------------------------------------------------------------
def safe_cell(value: object) -> str:
    """Text a spreadsheet shows as text: a cell it would run as a formula gets a leading quote."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_rows(rows: list[LogRow]) -> list[list[str]]:
    return [[safe_cell(cell) for cell in (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.ts)), r.kind, r.message_id, r.sender, r.recipients,
        r.subject, r.attachments, r.source_ip, r.stage, r.code, r.detail, r.duration_ms, r.id)] for r in rows]


def export_chunks(request: Request, flt: LogFilter) -> Iterator[bytes]:
    """The CSV, a chunk of rows at a time (Starlette runs each step in a worker thread)."""
    store = relay_state(request).store
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    yield ("\ufeff" + out.getvalue()).encode()  # the BOM makes spreadsheets read UTF-8
    for rows in store.log.chunks(flt, EXPORT_CHUNK):
        out.seek(0)
        out.truncate()
        writer.writerows(csv_rows(rows))
        yield out.getvalue().encode()


@require_admin
async def export_csv(request: Request) -> Response:
    query = parse_query(request)
    if query.shown.failed:
        return RedirectResponse(f"/logs?{query.params()}", status_code=303)  # the page says what is wrong
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return StreamingResponse(export_chunks(request, query.flt), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="tspro-relay-log-{stamp}.csv"'})


# -- clearing --------------------------------------------------------------------------------------
@require_admin
async def clear_log(request: Request) -> Response:
    form = await read_form(request)
    if not confirmed(form):
        return confirm_page(request, "/logs/clear", "Clear the whole transaction log? Every row is deleted for "
                            "good; the audit trail keeps a note that you did it.", "Clear log", back="/logs")
    who, ip = actor(request)
    removed = await run_in_threadpool(relay_state(request).store.log.clear, who, ip)
    return RedirectResponse(f"/logs?cleared={removed}", status_code=303)
