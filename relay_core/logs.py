"""Process logging: text lines, or one JSON object per line, on stderr; never a secret.

Only the fields named in ``STRUCTURED_FIELDS`` reach a JSON line: whatever else
a record carries (a library's arguments, say) stays out, so a body, key or
password reaches the log only if written into a message on purpose.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

from .config import Settings

STRUCTURED_FIELDS = ("message_id", "status", "stage", "code", "duration_ms", "attempts", "count",
                     "worker", "threads", "method", "path")


# C0 and C1 controls, DEL, line and paragraph separators, bidi overrides: what could drive an operator's
# terminal, forge a log line or reorder what is shown, when text a client sent is printed as it came.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with each control character (but those in ``keep``) written as its escape, ``\\x1b``."""
    if not _CONTROLS.search(text):
        return text
    return _CONTROLS.sub(lambda m: m.group() if m.group() in keep else m.group().encode("unicode_escape").decode(),
                         text)


class ControlEscaping:
    """A text stream that escapes control characters but line breaks and tabs: every CLI output."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(escape_controls(text, keep="\n\t"))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class TextFormatter(logging.Formatter):
    """The text log line; the message's control characters escaped, line breaks included (a traceback
    after it keeps its lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def fields(event: str, **values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event name and its structured fields."""
    return {"event": event, **values}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        data: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            # Records from libraries (uvicorn, huey) carry no event: their logger names one.
            "event": getattr(record, "event", None) or record.name,
            "logger": record.name,
            "message": escape_controls(record.getMessage()),
        }
        for name in STRUCTURED_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Huey logs two lines per task at INFO, which costs a third of its rate.
    logging.getLogger("huey").setLevel(logging.WARNING if root.level >= logging.INFO else logging.DEBUG)
    # psycopg's pool logs every connection checkout at INFO.
    logging.getLogger("psycopg.pool").setLevel(max(root.level, logging.WARNING))
    quiet_pool_retries()


def quiet_pool_retries() -> None:
    """While the database is down, each pool retries about once a second for every connection
    it lost (db/postgres.py), and each try logs a warning: one every half minute says as much."""
    logging.getLogger("psycopg.pool").filters[:] = [EveryFewSeconds("error connecting", 30.0)]


class EveryFewSeconds(logging.Filter):
    """Lets one record whose message starts with ``prefix`` through per ``seconds``."""

    def __init__(self, prefix: str, seconds: float) -> None:
        super().__init__()
        self.prefix, self.seconds, self.last = prefix, seconds, float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if record.created - self.last < self.seconds:
            return False
        self.last = record.created
        return True
