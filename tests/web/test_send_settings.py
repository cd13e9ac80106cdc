"""The send path checks a request against the settings and keys the web process last read, and the
transaction that stores it checks they are still current; a refusal is given only after the same check.

So a change made elsewhere (another process: here a second Store on the same relay.db, with a cache
of its own, as the CLI or a second web process has) applies to the very next send, in both
directions: what became forbidden is refused, what became allowed is accepted. The real app and store
run through Starlette's TestClient; nothing is mocked.
"""

from __future__ import annotations

import base64
from typing import Iterator

import pytest
from starlette.testclient import TestClient

from relay_core import crypto
from relay_core.config import Settings
from relay_core.store import Store
from api_helpers import error_of, payload, queued, running_client


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with running_client(settings) as client:
        assert client.post("/api/send", json=payload()).status_code == 202  # the settings are cached now
        yield client


@pytest.fixture
def elsewhere(settings: Settings) -> Iterator[Store]:
    """The same relay.db through another Store: its writes never touch the web's cache."""
    other = Store.open(settings, crypto.derive_keys(settings))
    yield other
    other.shutdown()


def test_a_key_replaced_elsewhere_stops_working_at_the_next_send(client: TestClient, elsewhere: Store) -> None:
    old = client.headers["Authorization"]
    new = elsewhere.api_keys.new_primary()
    error_of(client.post("/api/send", json=payload(), headers={"Authorization": old}), 401)
    response = client.post("/api/send", json=payload(), headers={"Authorization": f"Bearer {new}"})
    assert response.status_code == 202, response.text
    assert queued(client) == (2, 2)  # the first send and this one; the refused one stored nothing


def test_a_key_revoked_elsewhere_is_refused_before_anything_is_stored(client: TestClient,
                                                                       elsewhere: Store) -> None:
    key_id, token = elsewhere.api_keys.add("second")
    assert client.post("/api/send", json=payload(), headers={"Authorization": f"Bearer {token}"}).status_code == 202
    elsewhere.api_keys.revoke(key_id)
    error_of(client.post("/api/send", json=payload(), headers={"Authorization": f"Bearer {token}"}), 401)
    assert queued(client) == (2, 2)


def test_an_allowlist_set_and_cleared_elsewhere_applies_both_ways(client: TestClient, elsewhere: Store) -> None:
    elsewhere.set_options({"allowed_from": "other.example"})
    error_of(client.post("/api/send", json=payload()), 403)
    elsewhere.set_options({"allowed_from": ""})
    # The web process last saw the allowlist that refuses this From: it reads again before refusing.
    assert client.post("/api/send", json=payload()).status_code == 202
    assert queued(client) == (2, 2)


def test_delivery_unconfigured_then_configured_elsewhere(settings: Settings, elsewhere: Store) -> None:
    with running_client(settings) as client:
        elsewhere.set_options({"smtp_host": ""})
        error_of(client.post("/api/send", json=payload()), 503)  # checked when the cache was current
        elsewhere.set_options({"smtp_host": "127.0.0.1"})
        assert client.post("/api/send", json=payload()).status_code == 202
        assert queued(client) == (1, 1)


def test_a_larger_attachment_limit_set_elsewhere_admits_a_larger_body(settings: Settings,
                                                                      elsewhere: Store) -> None:
    with running_client(settings, max_attach_mb="1") as client:
        assert client.post("/api/send", json=payload()).status_code == 202
        attachment = [{"filename": "a.bin", "mime_type": "application/octet-stream",
                       "content_b64": base64.b64encode(b"x" * 1_500_000).decode()}]
        error_of(client.post("/api/send", json=payload(attachments=attachment)), 413)
        elsewhere.set_options({"max_attach_mb": 2.0})
        response = client.post("/api/send", json=payload(attachments=attachment))
        assert response.status_code == 202, response.text
        assert queued(client) == (2, 2)


def test_settings_changed_between_the_check_and_the_commit_are_checked_again(client: TestClient,
                                                                           elsewhere: Store) -> None:
    """The writer finds the revision moved after the request was checked: checked again, stored once."""
    intake = client.app.state.relay.intake
    original = intake.submit_async
    changed = []

    def submit_after_a_change(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not changed:  # the change lands after this request's checks, before its transaction
            changed.append(True)
            elsewhere.set_options({"allowed_from": "other.example"})
        return original(*args, **kwargs)

    intake.submit_async = submit_after_a_change
    try:
        error_of(client.post("/api/send", json=payload()), 403)
    finally:
        intake.submit_async = original
    assert changed and queued(client) == (1, 1)  # only the fixture's first send

