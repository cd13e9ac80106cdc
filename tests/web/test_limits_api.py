"""Per-key send limits, per-key Allowed From lists and the budget of wrong keys, through the real app.

(The same across two real web processes: tests/e2e/test_limits_shared.py; a flood of
10,000 wrong keys: tests/e2e/test_flood.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from starlette.testclient import TestClient

from relay_core.config import Settings
from relay_core.options import parse_option
from admin_helpers import admin_client, admin_settings, field_value
from api_helpers import error_of, flush_refusals, payload, queued, running_client, settings_with


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with running_client(settings) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def add_key(client: TestClient, label: str, per_hour: int | None = None, allowed: str = "") -> str:
    store = client.app.state.relay.store  # type: ignore[attr-defined]
    _, key = store.api_keys.add(label, per_hour, allowed)
    return key


def test_a_keys_limit_answers_429_with_honest_headers_while_another_key_sends(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path)) as client:
        limited = add_key(client, "limited", per_hour=3)
        first = client.post("/api/send", json=payload(), headers=bearer(limited))
        assert first.status_code == 202
        assert (first.headers["RateLimit-Limit"], first.headers["RateLimit-Remaining"]) == ("3", "2")
        assert 3540 <= int(first.headers["RateLimit-Reset"]) <= 3600
        # A key check with an empty body, and an Idempotency-Key repeat, are not sends.
        error_of(client.post("/api/send", headers=bearer(limited)), 400)
        keyed = client.post("/api/send", json=payload(), headers={**bearer(limited), "Idempotency-Key": "once"})
        again = client.post("/api/send", json=payload(), headers={**bearer(limited), "Idempotency-Key": "once"})
        assert keyed.status_code == again.status_code == 202 and keyed.json() == again.json()
        third = client.post("/api/send", json=payload(), headers=bearer(limited))
        assert third.headers["RateLimit-Remaining"] == "0"
        refused = client.post("/api/send", json=payload(), headers=bearer(limited))
        assert "reached its limit of 3 messages per hour" in error_of(refused, 429)
        assert refused.headers["RateLimit-Remaining"] == "0"
        assert refused.headers["Retry-After"] == refused.headers["RateLimit-Reset"]
        assert 3540 <= int(refused.headers["Retry-After"]) <= 3600
        # The portal's own key has no limit: it is not affected, and its answers carry no RateLimit-*.
        free = client.post("/api/send", json=payload())
        assert free.status_code == 202 and "RateLimit-Limit" not in free.headers
        assert queued(client) == (4, 4)  # three for the limited key, one for the portal's


def test_the_global_setting_and_the_environment_default(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path, RELAY_SEND_PER_HOUR="1")) as client:
        store = client.app.state.relay.store  # type: ignore[attr-defined]
        assert client.post("/api/send", json=payload()).headers["RateLimit-Limit"] == "1"
        error_of(client.post("/api/send", json=payload()), 429)
        store.set_options({"send_per_hour": parse_option("send_per_hour", "5")})  # the setting wins
        answer = client.post("/api/send", json=payload())
        assert answer.status_code == 202 and answer.headers["RateLimit-Remaining"] == "3"
        store.set_options({"send_per_hour": parse_option("send_per_hour", "0")})  # 0: unlimited
        assert "RateLimit-Limit" not in client.post("/api/send", json=payload()).headers


def test_a_keys_own_allowed_from_applies_on_top_of_the_relays(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path), allowed_from="example.org, partner.example") as client:
        scoped = add_key(client, "newsletter", allowed="news@example.org")
        assert client.post("/api/send", json=payload(from_email="news@example.org"),
                           headers=bearer(scoped)).status_code == 202
        refused = error_of(client.post("/api/send", json=payload(from_email="noreply@example.org"),
                                       headers=bearer(scoped)), 403)
        assert refused == ("The From address noreply@example.org is not permitted by the Allowed From list of the "
                           "API key “newsletter”.")
        # Its own list cannot widen the relay's: both must admit the From.
        wide = add_key(client, "wide", allowed="elsewhere.test")
        refused = error_of(client.post("/api/send", json=payload(from_email="a@elsewhere.test"), headers=bearer(wide)),
                           403)
        assert "the relay's Allowed From list" in refused
        # The portal's key, without a list of its own, sends From anything the relay allows.
        assert client.post("/api/send", json=payload(from_email="noreply@example.org")).status_code == 202


def test_wrong_keys_from_one_address_get_429_after_the_budget_and_one_log_row(tmp_path: Path) -> None:
    with running_client(settings_with(tmp_path)) as client:
        store = client.app.state.relay.store  # type: ignore[attr-defined]
        store.set_options({"bad_key_per_minute": parse_option("bad_key_per_minute", "5")})
        good = dict(client.headers)
        client.headers.pop("Authorization")
        statuses = []
        for i in range(8):
            path = ("/api/send", "/api/health", "/api/messages/x")[i % 3]
            answer = client.post(path, json=payload(), headers=bearer("tsr_wrong")) if path == "/api/send" \
                else client.get(path, headers=bearer("tsr_wrong"))
            statuses.append(answer.status_code)
        assert statuses == [401] * 5 + [429] * 3
        assert "Too many requests with a missing or wrong API key from 203.0.113.7" in error_of(answer, 429)
        assert 1 <= int(answer.headers["Retry-After"]) <= 60
        error_of(client.post("/api/send", json=payload()), 429)  # no key at all counts too
        # The right key from the same address is not refused for the wrong ones.
        assert client.post("/api/send", json=payload(), headers=good).status_code == 202
        flush_refusals(client)
        rows = store.conn().execute("SELECT event, code, detail FROM log WHERE event = 'unauthorized'"
                                    " ORDER BY id").fetchall()
        assert [r["code"] for r in rows] == [401, 401]  # one row for the wrong key, one for none
        assert rows[0]["detail"].startswith("8 requests with a wrong API key from 203.0.113.7")
        assert "3 of them answered 429 (over the limit of 5 a minute)" in rows[0]["detail"]
        assert rows[1]["detail"].startswith("1 request with no API key from 203.0.113.7")


def test_refusals_with_a_good_key_are_logged_one_by_one_then_counted(client: TestClient) -> None:
    for _ in range(14):
        error_of(client.post("/api/send", json=payload(to=[])), 400)
    flush_refusals(client)
    rows = client.app.state.relay.store.conn().execute(  # type: ignore[attr-defined]
        "SELECT detail FROM log ORDER BY id").fetchall()
    assert len(rows) == 11
    assert all("holds no recipient" in r["detail"] for r in rows[:10])
    assert rows[10]["detail"].startswith("4 more requests refused with 400 from 203.0.113.7")


# -- the admin pages ------------------------------------------------------------------------------
def test_the_key_card_sets_a_keys_limits_and_records_them(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path)) as client:
        store = client.state.store
        key_id, _ = store.api_keys.add("partner")
        page = client.get("/settings").text
        assert f'id="key-{key_id}-per_hour"' in page and f'id="key-{key_id}-allowed_from"' in page
        refused = client.post(f"/settings/api-keys/{key_id}/limits", {"per_hour": "many", "allowed_from": "x y"})
        assert refused.status_code == 200
        assert "Sends per hour must be a whole number, not &#39;many&#39;." in refused.text
        assert "Allowed From holds &#39;x y&#39;" in refused.text and "were not changed" in refused.text
        assert f'id="key-{key_id}-per_hour" name="per_hour" type="text" inputmode="numeric" class="narrow"\n' \
               f'                 value="many"' in refused.text  # what was typed is shown again
        saved = client.post(f"/settings/api-keys/{key_id}/limits", {"per_hour": "12", "allowed_from": "Example.org"})
        assert saved.status_code == 303 and saved.headers["location"] == "/settings?saved=limits#keys"
        key = next(k for k in store.api_keys.all() if k.id == key_id)
        assert (key.per_hour, key.allowed_from) == (12, "example.org")
        assert store.log.audit_entries(limit=1)[0].detail == (
            "set the limits of the API key “partner”: 12 sends per hour, From limited to example.org")
        assert client.post(f"/settings/api-keys/{key_id}/limits", {"per_hour": "", "allowed_from": ""},
                           token=None).status_code == 403  # no CSRF token: refused, nothing changed
        client.post(f"/settings/api-keys/{key_id}/limits", {"per_hour": "", "allowed_from": ""})
        key = next(k for k in store.api_keys.all() if k.id == key_id)
        assert (key.per_hour, key.allowed_from) == (None, "")


def test_a_key_is_added_with_its_limits_and_the_defaults_are_settings(tmp_path: Path) -> None:
    with admin_client(admin_settings(tmp_path, RELAY_SEND_PER_HOUR="40")) as client:
        store = client.state.store
        assert client.post("/settings/api-keys", {"label": "limited", "new_per_hour": "-1"}).status_code == 200
        assert "limited" not in [k.label for k in store.api_keys.all()]
        answer = client.post("/settings/api-keys", {"label": "limited", "new_per_hour": "9",
                                                    "new_allowed_from": "news@example.org"})
        assert answer.status_code == 303
        key = next(k for k in store.api_keys.all() if k.label == "limited")
        assert (key.per_hour, key.allowed_from) == (9, "news@example.org")
        assert "empty: the relay's default, 40 per hour" in client.get("/settings").text
        form = {"retry_base_seconds": "60", "retry_max_seconds": "3600", "max_age_hours": "24", "max_per_minute": "0",
                "max_per_hour": "0", "max_per_day": "0", "send_per_hour": "100", "bad_key_per_minute": "30"}
        assert client.post("/settings/delivery", form).status_code == 303
        options = store.options()
        assert (options.send_per_hour, options.bad_key_per_minute) == (100, 30)
        assert field_value(client.get("/settings").text, "send_per_hour") == "100"
        assert "Sends per hour per API key: (empty) → 100" in store.log.audit_entries(limit=1)[0].detail


def test_limits_in_the_cli(tmp_path: Path) -> Any:
    from support import cli, relay_env
    env = relay_env(tmp_path / "data")
    key = cli(env, "api-key", "add", "--label", "partner", "--per-hour", "5", "--allowed-from", "Example.org",
              cwd=tmp_path).stdout.strip()
    assert key.startswith("tsr_")
    listed = cli(env, "api-key", "list", cwd=tmp_path).stdout.splitlines()
    assert listed[1].endswith("\t5 sends per hour; From limited to example.org")
    assert listed[0].endswith("\tno send limit (the relay's default)")
    assert cli(env, "api-key", "set", "2", "--per-hour", "default", cwd=tmp_path).stdout == \
        "Key 2 (partner): no send limit (the relay's default); From limited to example.org.\n"
    cli(env, "config", "set", "send_per_hour=8", cwd=tmp_path)
    assert "8 sends per hour (the relay's default)" in cli(env, "api-key", "list", cwd=tmp_path).stdout
    for args, error in [(("--per-hour", "x"), "--per-hour must be a whole number"),
                        (("--allowed-from", "not a domain"), "--allowed-from holds 'not a domain'"),
                        ((), "needs --per-hour and/or --allowed-from")]:
        refused = cli(env, "api-key", "set", "2", *args, cwd=tmp_path, check=False)
        assert refused.returncode == 1 and error in refused.stderr
    assert "No active API key with id 7" in cli(env, "api-key", "set", "7", "--per-hour", "1", cwd=tmp_path,
                                                check=False).stderr
