"""Process settings, read once from the environment (and a `.env` file).

Only this module reads ``os.environ``. Everything about SMTP, keys, the
allowlist and limits lives in the database (see ``options.py``); what is here
is what a process needs before it can open that database.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

MIN_SECRET_LENGTH = 32
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one clear sentence."""


class Secret:
    """A string that never prints itself (as Starlette's ``Secret``)."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Settings:
    secret_key: Secret
    secret_key_old: Secret | None = None
    data_dir: Path = Path("data")
    admin_user: str = "admin"
    admin_password: Secret | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    insecure_cookies: bool = False
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    public_url: str = ""  # scheme://host[:port] the admins and the portal use; "" when not told
    allowed_hosts: tuple[str, ...] = ()  # further Host names to answer to (relay_web.site)
    send_per_hour: int = 0
    queue_url: str = ""
    worker_threads: int = 8
    metrics: bool = False
    metrics_token: Secret | None = None
    database_url: Secret | None = None  # PostgreSQL instead of relay.db; it may hold a password

    @property
    def db_path(self) -> Path:
        return self.data_dir / "relay.db"

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.db"


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional quotes."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1/true/yes/on or 0/false/no/off, not {value!r}.")


def _parse_int(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {value!r}.") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {number}.")
    return number


def _parse_proxies(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in value.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"RELAY_TRUSTED_PROXIES holds {item!r}, which is not an IP address or network."
            ) from None
    return tuple(networks)


# A DNS name (underscores too: Docker's service names may have them), an IPv4 or an IPv6 address.
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|[0-9a-f:.]*:[0-9a-f:.]*")


def _parse_public_url(value: str) -> str:
    """``scheme://host[:port]``, lower-cased, without a default port or a trailing slash."""
    url = value.strip()
    if not url:
        return ""
    expected = "a URL such as https://relay.example.org"
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"RELAY_PUBLIC_URL must be {expected} (http or https), not {url!r}.")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"RELAY_PUBLIC_URL must be {expected}, without a user name or password.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"RELAY_PUBLIC_URL must be {expected} with no path, query or fragment (the relay is "
                          f"served at the root of its address), not {url!r}.")
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = (parts.hostname or "").rstrip(".")
    if not host or port == -1 or not _HOST_NAME.fullmatch(host):
        raise ConfigError(f"RELAY_PUBLIC_URL must be {expected} with a host name and an optional port, not {url!r}.")
    scheme = parts.scheme.lower()
    shown = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{shown}" + (f":{port}" if port not in (None, default) else "")


def _parse_hosts(value: str) -> tuple[str, ...]:
    hosts = []
    for item in value.replace(";", ",").split(","):
        name = item.strip().lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if not name:
            continue
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(f"RELAY_ALLOWED_HOSTS holds {item.strip()!r}, which is not a host name (give names "
                              "such as relay.lan, without a scheme or port).")
        hosts.append(name)
    return tuple(hosts)


def parse_database_url(value: str, name: str = "RELAY_DATABASE_URL") -> Secret | None:
    """A postgresql:// URL (kept as a ``Secret``: it may hold a password), or None when empty."""
    url = value.strip()
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        shown = url.split("://", 1)[0] + "://..." if "://" in url else "a value without a scheme"
        raise ConfigError(
            f"{name} must be a PostgreSQL URL (postgresql://user:password@host:5432/dbname), not {shown}"
            + ("; leave it unset to keep the store in relay.db in the data directory." if name.startswith("RELAY")
               else ".")
        )
    return Secret(url)


def _read_secret(env: Mapping[str, str]) -> str:
    secret = env.get("RELAY_SECRET_KEY", "")
    secret_file = env.get("RELAY_SECRET_KEY_FILE", "")
    if not secret and secret_file:
        try:
            secret = Path(secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"RELAY_SECRET_KEY_FILE points to {secret_file}, which cannot be read ({exc.strerror})."
            ) from None
    if not secret:
        dotenv = Path.cwd() / ".env"
        where = f"{dotenv} (there is none)" if not dotenv.exists() else f"{dotenv} (it does not set it)"
        raise ConfigError(
            f"RELAY_SECRET_KEY is not set: looked in the environment and in {where}. If this relay already "
            "has a .env, run the command from the folder that holds it (or export its variables); "
            "`tspro-relay init` writes a new .env for a new relay, and run here it would start a second, "
            "empty relay."
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"RELAY_SECRET_KEY is {len(secret)} characters long; use at least {MIN_SECRET_LENGTH} "
            "random characters (run `tspro-relay init` to write one)."
        )
    return secret


def environment(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """The effective variables: `.env` in the working directory, the environment winning."""
    merged = read_dotenv((cwd or Path.cwd()) / ".env")
    merged.update(os.environ if environ is None else environ)
    return merged


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build ``Settings`` from a mapping (``os.environ`` plus `.env` by default)."""
    env = environment() if environ is None else dict(environ)
    secret = _read_secret(env)
    log_level = env.get("RELAY_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"RELAY_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}.")
    log_format = env.get("RELAY_LOG_FORMAT", "text").strip().lower() or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"RELAY_LOG_FORMAT must be text or json, not {log_format!r}.")
    admin_password = env.get("RELAY_ADMIN_PASSWORD", "")
    old = env.get("RELAY_SECRET_KEY_OLD", "")
    token = env.get("RELAY_METRICS_TOKEN", "")
    return Settings(
        secret_key=Secret(secret),
        secret_key_old=Secret(old) if old else None,
        data_dir=Path(env.get("RELAY_DATA_DIR", "") or "data"),
        admin_user=env.get("RELAY_ADMIN_USER", "").strip() or "admin",
        admin_password=Secret(admin_password) if admin_password else None,
        log_level=log_level,
        log_format=log_format,
        insecure_cookies=_parse_bool("RELAY_INSECURE_COOKIES", env.get("RELAY_INSECURE_COOKIES", "")),
        trusted_proxies=_parse_proxies(env.get("RELAY_TRUSTED_PROXIES", "")),
        public_url=_parse_public_url(env.get("RELAY_PUBLIC_URL", "")),
        allowed_hosts=_parse_hosts(env.get("RELAY_ALLOWED_HOSTS", "")),
        send_per_hour=_parse_int("RELAY_SEND_PER_HOUR", env.get("RELAY_SEND_PER_HOUR", "") or "0", 0),
        queue_url=env.get("RELAY_QUEUE_URL", "").strip(),
        worker_threads=_parse_int("RELAY_WORKER_THREADS", env.get("RELAY_WORKER_THREADS", "") or "8", 1),
        metrics=_parse_bool("RELAY_METRICS", env.get("RELAY_METRICS", "")),
        metrics_token=Secret(token) if token else None,
        database_url=parse_database_url(env.get("RELAY_DATABASE_URL", "")),
    )


def is_shared_queue(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))
