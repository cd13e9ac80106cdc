"""The API tests' helpers: the real app with its lifespan running, a payload, and what an answer or the
queue holds. Used by the test modules of tests/web that call /api/ (test_api.py and its neighbours)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
from starlette.testclient import TestClient

from relay_core.config import Settings, load_settings
from relay_core.options import parse_option
from relay_web.app import create_app
from relay_web.headers import STATIC_CACHE
from support import SECRET


@contextmanager
def running_client(settings: Settings, raise_server_exceptions: bool = True, **options: str) -> Iterator[TestClient]:
    """The app with its lifespan running, SMTP set (plus ``options``) and the key in the headers."""
    with TestClient(create_app(settings), client=("203.0.113.7", 50000),
                    raise_server_exceptions=raise_server_exceptions) as client:
        store = client.app.state.relay.store
        values = {"smtp_host": "127.0.0.1", "smtp_port": "2525", "smtp_security": "none", **options}
        store.set_options({k: parse_option(k, v) for k, v in values.items() if v is not None})
        client.headers["Authorization"] = f"Bearer {store.api_keys.reveal()}"
        yield client


def settings_with(tmp_path: Any, **env: str) -> Settings:
    return load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "d"), **env})


def payload(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"from_email": "noreply@example.org", "from_name": "Portal",
                            "to": ["a@example.com"], "subject": "Hello", "text": "Body"}
    data.update(overrides)
    return data


def queued(client: TestClient) -> tuple[int, int]:
    state = client.app.state.relay
    # The writer answers a batch, then enqueues its ids, then takes the next batch: once an empty
    # job has run, every earlier 202's wake-up is in the queue (without this, a loaded machine
    # sometimes read the queue between the answer and the enqueue).
    state.intake.submit(lambda conn: (None, [])).result(10)
    return sum(state.store.messages.counts().values()), state.queue.pending()


def error_of(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["ok"] is False and isinstance(body["error"], str) and body["error"].endswith((".", ")"))
    assert set(body) == {"ok", "error"}
    return body["error"]


def flush_refusals(client: TestClient) -> None:
    """What the web process writes about once a second: the refusals counted since."""
    future = client.app.state.relay.flush_refusals()  # type: ignore[attr-defined]
    if future is not None:
        future.result(10)


REQUIRED_CSP = ("default-src 'self'", "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'",
                "form-action 'self'")
TEXT_TYPES = re.compile(r"^(text/|application/(javascript|json|xml)|image/svg\+xml|[a-z]+/[a-z.+-]+\+(json|xml))")


def check_headers(response: httpx.Response, what: str) -> None:
    """The security headers, each once (test_headers.py walks every route with this)."""
    headers = response.headers
    for name in ("content-security-policy", "x-content-type-options", "referrer-policy", "cache-control",
                 "x-frame-options"):
        assert len(headers.get_list(name)) == 1, f"{what}: {name} is {headers.get_list(name)}"
    directives = {d.strip() for d in headers["content-security-policy"].split(";")}
    missing = set(REQUIRED_CSP) - directives
    assert not missing, f"{what}: the CSP lacks {missing}"
    assert not any("unsafe-" in d or " *" in f" {d}" for d in directives), f"{what}: a weakened CSP {directives}"
    assert headers["x-content-type-options"] == "nosniff", what
    assert headers["referrer-policy"] in ("no-referrer", "same-origin"), what
    assert headers["x-frame-options"] == "DENY", what
    static_ok = response.request.url.path.startswith("/static/") and response.status_code < 400
    assert headers["cache-control"] == (STATIC_CACHE if static_ok else "no-store"), what
    content_type = headers.get("content-type", "")
    if content_type and TEXT_TYPES.match(content_type.lower()):
        assert "charset=utf-8" in content_type.lower(), f"{what}: {content_type}"
    assert content_type or response.status_code in (204, 304) or response.request.method == "HEAD" \
        or not response.content, f"{what}: a body without a Content-Type"
