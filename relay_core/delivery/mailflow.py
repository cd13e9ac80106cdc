"""Would mail flow now? One judgement, shared by /api/health, the CLI and the admin UI.

The portal's "test connection" reads only ``ok``, ``configured`` and ``error``
from /api/health, so ``ok`` must be false, with a sentence the portal can show,
whenever an accepted message would not go out now (not configured, paused, no
worker, OAuth revoked, the upstream failing). The facts come back too, so every
place that shows them tells the same story.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import probe
from ..store.ledger import CONNECTION_STAGES
from ..store.logbook import AttemptFact
from .oauth import revoked_sentence
from .probe import UPSTREAM_SETTINGS
from ..store import Store

WORKER_STALE_SECONDS = 60
UPSTREAM_WINDOW = 3


@dataclass(frozen=True)
class Upstream:
    """How the last attempts at the mail server went."""

    failing: bool
    sentence: str | None  # what is wrong, in plain words; None when nothing is
    stage: str | None = None
    code: int | None = None
    server_words: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # newest first: at, stage, code, detail
    check: dict[str, Any] | None = None  # the check of the current settings, while no attempt replaced it


@dataclass(frozen=True)
class Health:
    ok: bool
    error: str | None
    configured: bool
    smtp_configured: bool
    api_key_configured: bool
    worker_alive: bool
    worker_heartbeat_at: float | None
    paused: bool
    upstream: Upstream
    counts: dict[str, int]
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The /api/health shape: the portal's three fields first, then the facts."""
        return {
            "ok": self.ok, "configured": self.configured, "error": self.error,
            "smtp_configured": self.smtp_configured, "api_key_configured": self.api_key_configured,
            "worker_alive": self.worker_alive, "worker_heartbeat_at": self.worker_heartbeat_at,
            "delivery_paused": self.paused, "upstream": asdict(self.upstream), "messages": self.counts,
        }


def _strip_stage(detail: str, stage: str | None) -> str:
    """'AUTH: the mail server ... refuses ...' -> 'the mail server ... refuses ...'."""
    prefix = f"{stage}: " if stage else ""
    return detail[len(prefix):] if prefix and detail.startswith(prefix) else detail


def _server_words(detail: str, code: int | None) -> str | None:
    """The server's own reply inside a detail, when the relay quoted one."""
    if code is None:
        return None
    marker = str(code)
    at = detail.find(marker)
    if at == -1:
        return None
    words = detail[at:].strip()
    # Drop only the bracket the relay wrapped the reply in, never one of the server's own.
    if at > 0 and detail[at - 1] == "(" and words.endswith(")"):
        words = words[:-1]
    return words


def _what(stage: str | None) -> str:
    return {"connect": "connecting", "EHLO": "greeting the server", "STARTTLS": "STARTTLS",
            "AUTH": "AUTH"}.get(stage or "", stage or "")


def assess_upstream(attempts: list[AttemptFact], window: int = UPSTREAM_WINDOW,
                    check: dict[str, Any] | None = None) -> Upstream:
    """Failing when the newest ``window`` attempts all failed before any message was offered, or when
    there is no attempt yet and ``check`` (of the same settings) failed."""
    facts = [{"at": a.at, "status": a.status, "stage": a.stage, "code": a.code, "detail": a.detail}
             for a in attempts[:window]]
    if check is not None and not attempts:
        if check["state"] != "failed":
            return Upstream(False, None, check=check)
        words = _strip_stage(check["detail"], check["stage"]).rstrip(".")
        return Upstream(True, f"a check of the new SMTP settings failed at {_what(check['stage'])}: {words}",
                        check["stage"], check["code"], _server_words(check["detail"], check["code"]), check=check)
    if len(attempts) < window:
        return Upstream(False, None, attempts=facts)
    recent = attempts[:window]
    if not all(a.status in ("deferred", "failed") and a.stage in CONNECTION_STAGES for a in recent):
        return Upstream(False, None, attempts=facts)
    newest = recent[0]
    words = _strip_stage(newest.detail, newest.stage).rstrip(".")
    sentence = f"the last {window} delivery attempts failed at {_what(newest.stage)}: {words}"
    return Upstream(True, sentence, newest.stage, newest.code, _server_words(newest.detail, newest.code), facts)


def assess(store: Store, now: float | None = None, window: int = UPSTREAM_WINDOW, counts: bool = True) -> Health:
    """Judge whether mail would flow now; ``counts=False`` skips the scan counting messages per state."""
    now = time.time() if now is None else now
    options = store.options()
    has_key = any(key.revoked_at is None for key in store.api_keys.all())
    heartbeat = store.workers.last_heartbeat()
    alive = heartbeat is not None and now - heartbeat < WORKER_STALE_SECONDS
    since = store.options_changed_at(UPSTREAM_SETTINGS)
    check = probe.latest(store)
    if check is not None and check["for"] < since:
        check = None  # of settings changed since
    upstream = assess_upstream(store.log.recent_attempts(window, since=since), window, check)

    problems = []
    if not options.smtp_configured:
        problems.append("SMTP delivery is not configured: set the SMTP host in the relay's settings.")
    if not has_key:
        problems.append("The relay has no API key.")
    if "smtp_password" in store.unreadable_secrets:
        problems.append("The stored SMTP password cannot be decrypted with this RELAY_SECRET_KEY, so nothing is "
                        "delivered: re-enter it in the relay's settings.")
    revoked = revoked_sentence(store)
    if revoked:
        problems.append(revoked + ".")
    if options.delivery_paused:
        problems.append("Delivery is paused: mail is accepted and queued but not sent until an admin clicks the "
                        "Resume delivery button on the relay's Queue page (or runs tspro-relay resume).")
    if not alive:
        if heartbeat is None:
            problems.append("No delivery worker is running, so queued mail is not being sent.")
        else:
            problems.append(f"No delivery worker has reported for {int(now - heartbeat)} seconds, so queued "
                            "mail is not being sent.")
    if options.smtp_configured and upstream.failing and upstream.sentence and not revoked:
        problems.append("The mail server is failing: " + upstream.sentence + ".")
    configured = options.smtp_configured and has_key
    return Health(
        ok=not problems, error=" ".join(problems) or None, configured=configured,
        smtp_configured=options.smtp_configured, api_key_configured=has_key, worker_alive=alive,
        worker_heartbeat_at=heartbeat, paused=options.delivery_paused, upstream=upstream,
        counts=store.messages.counts() if counts else {}, problems=problems,
    )
