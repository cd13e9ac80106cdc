"""Who is asking: the Bearer token and the client's address behind trusted proxies."""

from __future__ import annotations

import ipaddress

from starlette.requests import Request

from relay_core.config import Settings


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


def trusted_peer(address: str, settings: Settings) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.trusted_proxies)


def client_ip(request: Request, settings: Settings) -> str:
    """The peer address; behind a trusted proxy, the nearest untrusted X-Forwarded-For hop."""
    peer = request.client.host if request.client else ""
    if not settings.trusted_proxies or not trusted_peer(peer, settings):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted_peer(hop, settings):
            return hop
    return hops[0] if hops else peer
