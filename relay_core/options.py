"""The relay's own settings: SMTP, senders, limits and delivery policy.

They live in the database, so a change takes effect in every running process
without a restart; this module owns their names, defaults and validation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, Callable

from .errors import BadRequest

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$|^\[?[0-9A-Fa-f:.]+\]?$")
_ADDR_RE = re.compile(r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
SECURITY_MODES = ("starttls", "ssl", "none")
AUTH_METHODS = ("password", "microsoft", "google")
SECRET_OPTIONS = frozenset({"smtp_password", "turnstile_secret", "oauth_client_secret", "oauth_client_certificate",
                            "oauth_refresh_token", "oauth_service_account"})
MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
GOOGLE_AUTHORITY = "https://accounts.google.com"
TURNSTILE_VERIFY_URL = "https://challenges.cloudflare.com/turnstile/v0/siteverify"


def is_address(value: str) -> bool:
    """A plain ASCII address (no SMTPUTF8: most relays' upstream servers refuse it)."""
    return value.isascii() and bool(_ADDR_RE.fullmatch(value)) and len(value) <= 254


def _text(name: str, value: str) -> str:
    if len(value.splitlines()) > 1 or "\r" in value or "\n" in value:
        raise BadRequest(f"{name} must not contain line breaks.")
    return value.strip()


def _host(name: str, value: str) -> str:
    value = _text(name, value)
    if value and not _HOST_RE.match(value):
        raise BadRequest(f"{name} must be a host name or IP address, not {value!r}.")
    return value


def _address(name: str, value: str) -> str:
    value = _text(name, value)
    if value and not is_address(value):
        raise BadRequest(f"{name} must be an email address, not {value!r}.")
    return value


def _allowlist(name: str, value: str) -> str:
    items = [item.strip().lower() for item in _text(name, value).replace(";", ",").split(",")]
    items = [item for item in items if item]
    for item in items:
        if not (is_address(item) or _DOMAIN_RE.match(item)):
            raise BadRequest(f"{name} holds {item!r}, which is neither an email address nor a domain.")
    return ", ".join(items)


def _security(name: str, value: str) -> str:
    # No aliases: "tls" could mean either mode, and an empty value must not turn TLS off.
    cleaned = value.strip().lower()
    if cleaned not in SECURITY_MODES:
        raise BadRequest(f"{name} must be one of starttls, ssl, none, not {value!r}: did you mean starttls "
                         "(port 587) or ssl (port 465)?")
    return cleaned


def _auth(name: str, value: str) -> str:
    cleaned = value.strip().lower()
    if cleaned not in AUTH_METHODS:
        raise BadRequest(f"{name} must be one of {', '.join(AUTH_METHODS)}, not {value!r}.")
    return cleaned


def _path(name: str, value: str) -> str:
    """A file on this host, named absolutely: the web and the worker may run in other directories."""
    value = _text(name, value)
    if value and not value.startswith("/"):
        raise BadRequest(f"{name} must be an absolute path such as /etc/ssl/private-ca.pem, not {value!r}.")
    return value


def _service_account(name: str, value: str) -> str:
    """A Google service account's JSON key, as downloaded; kept compact (one line)."""
    if not value.strip():
        return ""
    try:
        key = json.loads(value)
    except ValueError:
        key = None
    needed = ("client_email", "private_key", "token_uri")
    if not isinstance(key, dict) or key.get("type") != "service_account" or not all(key.get(k) for k in needed):
        raise BadRequest(f"{name} must be a service account's JSON key as Google Cloud Console downloads it "
                         "(type service_account, with client_email, private_key and token_uri).")
    return json.dumps(key, separators=(",", ":"))


def _certificate(name: str, value: str) -> str:
    """A private key and its certificate in PEM (``cat key.pem cert.pem``), for a certificate credential."""
    value = value.strip()
    if value and not ("PRIVATE KEY-----" in value and "-----BEGIN CERTIFICATE-----" in value):
        raise BadRequest(f"{name} must hold the private key and its certificate in PEM (cat key.pem cert.pem).")
    return value


def _helo_name(name: str, value: str) -> str:
    """A host name for EHLO (empty: chosen automatically); never an IP address."""
    value = _text(name, value).rstrip(".")
    if not value:
        return ""
    labels = value.split(".")
    if (len(value) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise BadRequest(f"{name} must be a host name such as mail.example.org (not an IP address), "
                         f"not {value!r}.")
    return value


def _url(name: str, value: str) -> str:
    value = _text(name, value)
    scheme, _, rest = value.partition("://")
    if scheme.lower() not in ("http", "https") or not rest or any(c.isspace() for c in value):
        raise BadRequest(f"{name} must be an http:// or https:// URL, not {value!r}.")
    return value


def _authority(name: str, value: str) -> str:
    """A sign-in address: https only (tokens travel through it), kept without a trailing slash."""
    value = _url(name, value).rstrip("/")
    if not value.lower().startswith("https://"):
        raise BadRequest(f"{name} must be an https:// address, not {value!r}.")
    return value


def _token(name: str, value: str) -> str:
    """A key someone pasted (Turnstile's): printable ASCII, no spaces."""
    value = _text(name, value)
    if value and not (value.isascii() and value.isprintable() and " " not in value):
        raise BadRequest(f"{name} must be the key exactly as given, without spaces.")
    return value


def parse_allowlist(name: str, value: str) -> str:
    """An Allowed From list (the setting's, or an API key's own), normalised."""
    return _allowlist(name, value)


def parse_per_hour(name: str, value: str) -> int | None:
    """A send limit: a whole number of messages per hour (0 = unlimited), or empty for the default."""
    value = value.strip()
    if value.lower() in ("", "default"):
        return None
    number = _number(0, 10**9)(name, value)
    return int(number)


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"{name} must be true or false, not {value!r}.")


def _bound(value: float) -> str:
    """A limit as a person reads it: 65535, 0.001, 1,000,000,000 (never 1e+09)."""
    return f"{value:,.0f}" if value >= 1e6 else f"{value:g}"


def _number(minimum: float, maximum: float, integer: bool = True) -> Callable[[str, str], Any]:
    def parse(name: str, value: str) -> float | int:
        try:
            number: float | int = int(value) if integer else float(value)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise BadRequest(f"{name} must be {kind}, not {value!r}.") from None
        if not minimum <= number <= maximum:
            raise BadRequest(f"{name} must be between {_bound(minimum)} and {_bound(maximum)}, not {value}.")
        return number
    return parse


@dataclass(frozen=True)
class Options:
    """A snapshot of every setting, typed. Defaults are the first-boot values."""

    smtp_host: str = ""
    smtp_port: int = 587
    smtp_security: str = "starttls"
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_tls_verify: bool = True
    smtp_ca_file: str = ""
    smtp_auth: str = "password"
    oauth_tenant: str = ""
    oauth_client_id: str = ""
    oauth_client_secret: str = ""
    oauth_client_certificate: str = ""
    oauth_authority: str = MICROSOFT_AUTHORITY
    oauth_google_authority: str = GOOGLE_AUTHORITY
    oauth_refresh_token: str = ""
    oauth_service_account: str = ""
    smtp_timeout_seconds: int = 30
    smtp_helo_name: str = ""
    default_from: str = ""
    default_from_name: str = ""
    allowed_from: str = ""
    envelope_from: str = ""
    max_attach_mb: float = 25.0
    retry_base_seconds: int = 60
    retry_max_seconds: int = 3600
    max_age_hours: float = 24.0
    lease_seconds: int = 300
    max_per_minute: int = 0
    max_per_hour: int = 0
    max_per_day: int = 0
    connection_idle_seconds: int = 30
    sweep_seconds: int = 30
    retention_sent_hours: float = 24.0
    retention_failed_days: float = 7.0
    log_retention_days: float = 90.0
    log_max_rows: int = 1_000_000
    session_idle_minutes: int = 30
    turnstile_site_key: str = ""
    turnstile_secret: str = ""
    turnstile_verify_url: str = TURNSTILE_VERIFY_URL
    delivery_paused: bool = False
    send_per_hour: int | None = None  # None: RELAY_SEND_PER_HOUR
    bad_key_per_minute: int = 100

    @property
    def smtp_configured(self) -> bool:
        return bool(self.smtp_host)

    @property
    def uses_oauth(self) -> bool:
        return self.smtp_auth != "password"

    @property
    def turnstile_enabled(self) -> bool:
        return bool(self.turnstile_site_key and self.turnstile_secret)

    @property
    def allowed_from_items(self) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.allowed_from.split(",") if item.strip())

    @property
    def pacing_limits(self) -> tuple[tuple[int, float], ...]:
        """(deliveries, per seconds) for each outbound limit that is set."""
        pairs = ((self.max_per_minute, 60.0), (self.max_per_hour, 3600.0), (self.max_per_day, 86400.0))
        return tuple((n, window) for n, window in pairs if n > 0)

    @property
    def max_attach_bytes(self) -> int:
        return int(self.max_attach_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        """The request cap: attachments grow by 4/3 in base64, plus 1 MiB for the rest."""
        return self.max_attach_bytes * 4 // 3 + 4 + 1024 * 1024


PARSERS: dict[str, Callable[[str, str], Any]] = {
    "smtp_host": _host,
    "smtp_port": _number(1, 65535),
    "smtp_security": _security,
    "smtp_username": _text,
    "smtp_password": lambda name, value: value,
    "smtp_tls_verify": _bool,
    "smtp_ca_file": _path,
    "smtp_auth": _auth,
    "oauth_tenant": _token,
    "oauth_client_id": _token,
    "oauth_client_secret": _token,
    "oauth_client_certificate": _certificate,
    "oauth_authority": _authority,
    "oauth_google_authority": _authority,
    "oauth_refresh_token": _token,
    "oauth_service_account": _service_account,
    "smtp_timeout_seconds": _number(1, 600),
    "smtp_helo_name": _helo_name,
    "default_from": _address,
    "default_from_name": _text,
    "allowed_from": _allowlist,
    "envelope_from": _address,
    "max_attach_mb": _number(0, 1024, integer=False),
    "retry_base_seconds": _number(1, 86400),
    "retry_max_seconds": _number(1, 7 * 86400),
    "max_age_hours": _number(0.001, 24 * 30, integer=False),
    "lease_seconds": _number(5, 86400),
    "max_per_minute": _number(0, 10**9),
    "max_per_hour": _number(0, 10**9),
    "max_per_day": _number(0, 10**9),
    "connection_idle_seconds": _number(0, 3600),
    "sweep_seconds": _number(1, 3600),
    "retention_sent_hours": _number(0, 24 * 3650, integer=False),
    "retention_failed_days": _number(0, 3650, integer=False),
    "log_retention_days": _number(1, 3650, integer=False),
    "log_max_rows": _number(1000, 10**9),
    "session_idle_minutes": _number(1, 7 * 24 * 60),
    "turnstile_site_key": _token,
    "turnstile_secret": _token,
    "turnstile_verify_url": _url,
    "delivery_paused": _bool,
    "send_per_hour": parse_per_hour,
    "bad_key_per_minute": _number(0, 10**9),
}
# One line per setting for `config set --help` (and the settings table in docs/operating.md).
HELP: dict[str, str] = {
    "smtp_host": "your mail server's host name (empty: delivery not configured)",
    "smtp_port": "its port: 587 for starttls, 465 for ssl, 25 for none",
    "smtp_security": "starttls, ssl or none",
    "smtp_username": "AUTH user name (empty: no AUTH)",
    "smtp_password": "AUTH password, encrypted at rest",
    "smtp_tls_verify": "verify the server's certificate (true/false)",
    "smtp_ca_file": "PEM file of CA certificates trusted for the mail server and token requests, besides the "
                    "system's (empty: the system's only)",
    "smtp_auth": "how to sign in to the mail server: password, microsoft or google (OAuth 2.0, XOAUTH2)",
    "oauth_tenant": "Microsoft 365: the directory (tenant) id or domain",
    "oauth_client_id": "Microsoft 365 or Google: the application (client) id",
    "oauth_client_secret": "the application's client secret, encrypted at rest (Microsoft: empty for device "
                           "code sign-in)",
    "oauth_client_certificate": "Microsoft 365, the application way: a private key and its certificate in PEM "
                                "instead of a client secret, encrypted at rest",
    "oauth_authority": "Microsoft's sign-in address (national clouds: https://login.microsoftonline.us)",
    "oauth_google_authority": "Google's sign-in address (its OpenID configuration names the endpoints)",
    "oauth_refresh_token": "the connected account's refresh token, encrypted at rest (set by `smtp connect`)",
    "oauth_service_account": "Google Workspace: a service account's JSON key (domain-wide delegation) instead of "
                             "a connected account, encrypted at rest",
    "smtp_timeout_seconds": "timeout for each SMTP operation",
    "smtp_helo_name": "EHLO name (empty: this host's FQDN, or the Default From's domain)",
    "default_from": "sender address when a message has none",
    "default_from_name": "sender name when a message has none",
    "allowed_from": "comma-separated addresses or domains allowed as From (empty: all)",
    "envelope_from": "MAIL FROM for every message (empty: the From address)",
    "max_attach_mb": "total decoded size of one message's attachments, in MiB",
    "retry_base_seconds": "first retry delay; doubles on each retry",
    "retry_max_seconds": "longest retry delay",
    "max_age_hours": "give up on a message (failed) after this age",
    "lease_seconds": "how long a worker may hold a message before another may take it",
    "max_per_minute": "outbound deliveries per minute across all workers (0: no limit)",
    "max_per_hour": "outbound deliveries per hour (0: no limit)",
    "max_per_day": "outbound deliveries per day (0: no limit)",
    "connection_idle_seconds": "keep an SMTP connection open this long between messages",
    "sweep_seconds": "how often a worker re-enqueues lost wake-ups and applies retention",
    "retention_sent_hours": "delete bodies of sent and partial messages after this long",
    "retention_failed_days": "delete bodies of failed and cancelled messages after this long",
    "log_retention_days": "delete log rows and finished messages after this long",
    "log_max_rows": "keep at most this many log rows",
    "delivery_paused": "true: accept and queue, but deliver nothing until resumed",
    "session_idle_minutes": "sign the admin out after this long without a request",
    "turnstile_site_key": "Cloudflare Turnstile site key for the sign-in page (empty: off)",
    "turnstile_secret": "Cloudflare Turnstile secret key, encrypted at rest",
    "turnstile_verify_url": "where Turnstile answers are verified",
    "send_per_hour": "accepted sends per hour for each API key without its own limit (0: unlimited; empty: "
                     "RELAY_SEND_PER_HOUR)",
    "bad_key_per_minute": "requests with a missing or wrong API key one address may make per minute before it gets "
                          "429 (0: no limit)",
}
OPTION_NAMES = tuple(f.name for f in fields(Options))
assert set(PARSERS) == set(OPTION_NAMES) == set(HELP)


def parse_option(name: str, value: str, label: str | None = None) -> Any:
    """Validate one `key=value`, or ``BadRequest`` with a sentence naming ``label`` (the CLI's key,
    the admin UI's visible label: the same rules for both)."""
    if name not in PARSERS:
        raise BadRequest(f"Unknown setting {name!r}; known settings: {', '.join(OPTION_NAMES)}.")
    return PARSERS[name](label or name, value)


def to_text(value: Any) -> str:
    """How a typed value is kept in the settings table."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build_options(stored: dict[str, str]) -> Options:
    """Turn the stored text values into a typed ``Options``, defaults for the rest."""
    values = {}
    for name in OPTION_NAMES:
        if name in stored:
            values[name] = PARSERS[name](name, stored[name])
    return Options(**values)


def check_consistency(options: Options) -> None:
    if options.retry_max_seconds < options.retry_base_seconds:
        raise BadRequest("retry_max_seconds must not be smaller than retry_base_seconds.")


def describe_changes(before: Options, values: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """'Port: 587 → 2525; Password changed' for the audit trail. Secret values never appear."""
    parts = []
    for name, value in values.items():
        old = getattr(before, name)
        if old == value:
            continue
        label = (labels or {}).get(name, name)
        if name in SECRET_OPTIONS:
            parts.append(f"{label} {'cleared' if not value else 'changed'}")
        else:
            parts.append(f"{label}: {to_text(old) or '(empty)'} → {to_text(value) or '(empty)'}")
    return "; ".join(parts)
