"""The connection check: connect, secure and sign in at the mail server without sending mail.

A worker also runs it once after each change of the saved SMTP settings, so a
wrong password shows in /api/health at once rather than after three failed
messages. One worker checks each change: it claims it by a compare-and-set on
the ``meta`` row ``upstream_probe``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import smtplib
import time
from typing import Any

from . import smtp
from ..db import transaction
from ..logs import fields
from ..options import Options
from ..store import Store

logger = logging.getLogger("relay.probe")
PROBE_TIMEOUT = 15.0  # per SMTP operation
ROW = "upstream_probe"
# A change to any of these may have fixed (or broken) the upstream: attempts before it say nothing.
UPSTREAM_SETTINGS = ("smtp_host", "smtp_port", "smtp_security", "smtp_username", "smtp_password",
                     "smtp_tls_verify", "smtp_helo_name", "smtp_ca_file", "smtp_auth", "oauth_tenant",
                     "oauth_client_id", "oauth_client_secret", "oauth_authority", "oauth_google_authority")


def probe(options: Options, store: Any = None) -> str:
    """Connect, secure, authenticate, and say what happened. Raises ``smtp.DeliveryError`` (blocking).

    With OAuth 2.0 a new access token is fetched first (the check is of the grant as much as of the server)."""
    from . import oauth  # only where a check runs: /api/health and the CLI read this module too

    token = ""
    if options.uses_oauth:
        try:
            token = oauth.access_token(options, store, fresh=True)
        except oauth.OAuthError as exc:
            raise smtp.DeliveryError(f"AUTH: {exc.message}", stage="AUTH", permanent=False) from None
    target = dataclasses.replace(smtp.Target.from_options(options, token),
                                 timeout=min(float(options.smtp_timeout_seconds), PROBE_TIMEOUT))
    client = smtp.connect(target)
    try:
        greeting = (client.ehlo_resp or b"").decode("utf-8", "replace").splitlines()
        steps = [f"Connected to {target.host}:{target.port}"]
        if target.security == "ssl":
            steps.append("over SSL/TLS")
        elif target.security == "starttls":
            steps.append("and started TLS (STARTTLS)")
        if target.token:
            steps.append(f"and signed in as {target.username} with an access token from "
                         f"{oauth.PROVIDER_NAMES[options.smtp_auth]} (XOAUTH2)")
        elif target.username:
            steps.append(f"and signed in as {target.username}")
        name = greeting[0].split()[0] if greeting and greeting[0].split() else ""
        answer = f" The server calls itself {name}." if name else ""
        return " ".join(steps) + "." + answer + " No mail was sent."
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def latest(store: Store) -> dict[str, Any] | None:
    """The last check: ``for`` (the settings change it checked), ``at``, ``state``
    (checking | ok | failed), ``stage``, ``code`` and ``detail``."""
    row = store.conn().execute("SELECT value FROM meta WHERE name = ?", (ROW,)).fetchone()
    return json.loads(row[0]) if row else None


def _swap(store: Store, old: str | None, new: dict[str, Any]) -> bool:
    """Replace the row's text ``old`` with ``new``; False when another worker changed it first."""
    text = json.dumps(new)
    conn = store.conn()
    with transaction(conn, durable=False):
        if old is None:
            return conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                                (ROW, text)).rowcount == 1
        return conn.execute("UPDATE meta SET value = ? WHERE name = ? AND value = ?",
                            (text, ROW, old)).rowcount == 1


def check_new_settings(store: Store, now: float | None = None) -> dict[str, Any] | None:
    """Check the saved SMTP settings once after each change; None when there was nothing to do
    (no change since the last check, no host set, or another worker took it)."""
    options = store.options()
    changed = store.options_changed_at(UPSTREAM_SETTINGS)
    if not options.smtp_configured or not changed:
        return None
    row = store.conn().execute("SELECT value FROM meta WHERE name = ?", (ROW,)).fetchone()
    old = row[0] if row else None
    if old is not None and json.loads(old)["for"] >= changed:
        return None
    now = time.time() if now is None else now
    checking = {"for": changed, "at": now, "state": "checking", "stage": None, "code": None, "detail": ""}
    if not _swap(store, old, checking):
        return None
    try:
        outcome = {**checking, "at": time.time(), "state": "ok", "detail": probe(options, store)}
    except smtp.DeliveryError as exc:
        outcome = {**checking, "at": time.time(), "state": "failed", "stage": exc.stage, "code": exc.code,
                   "detail": exc.message}
    _swap(store, json.dumps(checking), outcome)
    logger.info("checked the new SMTP settings: %s", outcome["detail"],
                extra=fields("probe.checked", state=outcome["state"]))
    return outcome
