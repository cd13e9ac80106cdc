"""The relay's own address: the Host names it answers to, and whether a request reached it over TLS.

The loopback names are always answered: the container's health check asks
http://127.0.0.1:8000, and no other site's page can make a browser send them,
which a DNS-rebinding attack would need. With RELAY_TRUSTED_PROXIES set, a
request that did not come through those proxies came straight, so over plain
HTTP, whatever its Host. What the settings change is docs/operating.md's
(HTTPS in front) and docs/security.md's.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import Scope

from relay_core.config import Settings
from relay_core.logs import fields

from .auth import trusted_peer
from .http_limits import LogBudget

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
refusal_log = LogBudget()  # a refused Host is one warning line, at most 10 a minute


@functools.lru_cache(maxsize=256)  # a relay sees a handful of Host values; parsing one costs ~5 us
def host_name(header: str) -> str:
    """The name of a Host header ("Relay.example.org:443" → "relay.example.org"), "" when it is not one."""
    if not header or "@" in header or "/" in header or "\\" in header:
        return ""
    parts = urlsplit(f"//{header}")
    try:
        parts.port
    except ValueError:
        return ""
    return (parts.hostname or "").rstrip(".")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


class Site:
    """What RELAY_PUBLIC_URL, RELAY_ALLOWED_HOSTS and RELAY_TRUSTED_PROXIES say about requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.public_url = settings.public_url
        parts = urlsplit(settings.public_url)
        self.public_scheme = parts.scheme
        self.public_host = parts.hostname or ""
        default_port = {"http": 80, "https": 443}.get(parts.scheme)
        self.public_origin = (parts.scheme, self.public_host, parts.port or default_port)
        named = {self.public_host, *settings.allowed_hosts} - {""}
        self.hosts: frozenset[str] | None = frozenset(named | LOOPBACK) if named else None
        self.judges_tls = bool(self.public_url or settings.trusted_proxies)

    def allows(self, scope: Scope) -> bool:
        return self.hosts is None or host_name(_header(scope, b"host")) in self.hosts

    def is_public_host(self, scope: Scope) -> bool:
        return bool(self.public_host) and host_name(_header(scope, b"host")) == self.public_host

    def scheme(self, scope: Scope) -> str:
        """http or https, as the client's request was sent (see the module docstring)."""
        if self.settings.trusted_proxies:
            client = scope.get("client")
            if not (client and trusted_peer(client[0], self.settings)):
                return str(scope.get("scheme", "http"))  # not through a known proxy: as it arrived
            said = _header(scope, b"x-forwarded-proto").split(",")[0].strip().lower()
            if said in ("http", "https"):
                return said
        if self.is_public_host(scope):
            return self.public_scheme
        return str(scope.get("scheme", "http"))

    def over_tls(self, scope: Scope) -> bool:
        return self.judges_tls and self.scheme(scope) == "https"

    @property
    def secure_cookies(self) -> bool:
        """Secure unless told otherwise: by the public URL's scheme, or by RELAY_INSECURE_COOKIES=1."""
        if self.public_url:
            return self.public_scheme == "https"
        return not self.settings.insecure_cookies

    def url_for(self, request: Request, name: str, **params: Any) -> str:
        """The absolute address of route ``name`` as the outside sees it (for links handed to others)."""
        path = str(request.app.url_path_for(name, **params))
        if self.public_url:
            return self.public_url + path
        return str(request.url_for(name, **params).replace(scheme=self.scheme(request.scope)))

    def refuse(self, scope: Scope) -> str:
        """Log a refused Host (one budgeted line); the 400's sentence: the name and the fix, not the allowed names."""
        asked = _header(scope, b"host")
        client = scope.get("client")
        peer = client[0] if client else ""
        refusal_log.warn("refused a request from %s for host %r", peer, asked[:100],
                         **fields("web.host_refused", client=peer, status=400))
        where = f" (its address is {self.public_url})" if self.public_url else ""
        return (f"This relay does not answer to the host name {asked[:100]!r}{where}. If that name is this "
                "relay's too, add it to RELAY_ALLOWED_HOSTS, or set RELAY_PUBLIC_URL to it.")


@functools.lru_cache(maxsize=16)
def site_of(settings: Settings) -> Site:
    return Site(settings)
