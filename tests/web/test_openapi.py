"""GET /api/openapi.json: served without a key, and true to the code — its fields, states and statuses
are the code's own constants, every API route is in it, and real answers validate against it."""

from __future__ import annotations

import re
from typing import Any

import jsonschema_rs
from starlette.routing import Route
from starlette.testclient import TestClient

from relay_core import errors
from relay_core.store.ledger import FINAL_STATES, MESSAGE_STATES
from relay_core.delivery.mailflow import Health, Upstream
from relay_core.message import KNOWN_FIELDS, MAX_RECIPIENTS, RECIPIENT_KINDS, _no_breaks, parse_payload
from relay_core.options import Options, parse_option
from relay_web import api, openapi
from relay_web.app import create_app
from relay_core.config import load_settings
from support import SECRET


def validator(document: dict[str, Any], schema: str) -> Any:
    return jsonschema_rs.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema",
                                        "$ref": f"#/components/schemas/{schema}",
                                        "components": document["components"]})


def answer_schema(document: dict[str, Any], path: str, method: str, status: int) -> str:
    response = document["paths"][path][method]["responses"][str(status)]
    return response["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]


def test_the_document_matches_the_codes_constants() -> None:
    document = openapi.document()
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    assert set(schemas["SendRequest"]["properties"]) == KNOWN_FIELDS
    assert schemas["SendRequest"]["properties"]["to"]["anyOf"][0]["maxItems"] == MAX_RECIPIENTS
    assert schemas["MessageStatus"]["properties"]["status"]["enum"] == list(MESSAGE_STATES)
    assert set(FINAL_STATES) < set(MESSAGE_STATES)
    assert schemas["MessageStatus"]["properties"]["recipients"]["items"]["properties"]["kind"]["enum"] == \
        list(RECIPIENT_KINDS)
    assert openapi.IDEMPOTENCY_HOURS * 3600 == api.IDEMPOTENCY_WINDOW
    # The health answer: every field as_dict() gives, plus the version the endpoint adds.
    health = Health(True, None, True, True, True, True, 1.0, False, Upstream(False, None), {"sent": 1})
    assert set(health.as_dict()) | {"version"} == set(schemas["Health"]["properties"])
    # Every error the send path can raise has its status in the document, and 202 for success.
    raised = {cls.status for cls in (errors.BadRequest, errors.Unauthorized, errors.Forbidden, errors.Conflict,
                                     errors.PayloadTooLarge, errors.RateLimited, errors.NotConfigured,
                                     errors.StoreUnavailable)}
    assert {int(code) for code in document["paths"]["/api/send"]["post"]["responses"]} == raised | {202}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["security"] == ([] if path in ("/healthz", "/api/openapi.json") else [{"bearer": []}])
            limited = operation["responses"].get("429")
            if limited:
                assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= \
                    set(limited["headers"]), (path, method)
    assert document["components"]["securitySchemes"]["bearer"] == {
        **document["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}


def test_its_header_text_and_base64_patterns_are_the_codes_rules() -> None:
    """What the document calls a valid header value or base64 is what parse_payload accepts."""
    header_text = re.compile(openapi.HEADER_TEXT)
    for code in [*range(0x00, 0x100), 0x2028, 0x2029, 0x200B, 0xFEFF, 0x1F600]:
        value = f"a{chr(code)}b"
        try:
            _no_breaks("subject", value)
            accepted = True
        except errors.BadRequest:
            accepted = False
        assert bool(header_text.fullmatch(value)) is accepted, hex(code)
    base64_text = re.compile(openapi.BASE64)
    for value in ["", "QQ==", "QUI=", "QUJD", "QUJDRA==", "Q", "QQ=", "QQ==QQ==", "Q=Q=", "QU JD", "QUJD!"]:
        payload = {"to": "a@example.com", "text": "t",
                   "attachments": [{"filename": "f", "content_b64": value}]}
        try:
            parse_payload(payload, Options(default_from="n@example.org"))
            accepted = True
        except errors.BadRequest:
            accepted = False
        # The code also drops whitespace first (a wrapped base64 block): more lenient, never stricter.
        assert bool(base64_text.fullmatch(value)) is accepted or (" " in value and accepted), value


def test_every_api_route_is_described_with_its_methods(tmp_path: Any) -> None:
    app = create_app(load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "d")}))
    document = openapi.document()
    described = {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}
    served = {(route.path, method) for route in app.routes if isinstance(route, Route)
              and (route.path.startswith("/api/") or route.path == "/healthz")
              for method in (route.methods or ()) if method != "HEAD"}
    assert served == described


def test_real_answers_validate_against_it(tmp_path: Any) -> None:
    settings = load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_DATA_DIR": str(tmp_path / "d")})
    with TestClient(create_app(settings)) as client:
        served = client.get("/api/openapi.json")
        assert served.status_code == 200 and served.headers["content-type"].startswith("application/json")
        document = served.json()
        assert document == openapi.document()
        store = client.app.state.relay.store  # type: ignore[attr-defined]
        key = {"Authorization": f"Bearer {store.api_keys.reveal()}"}
        message = {"from_email": "noreply@example.org", "to": "a@example.com", "cc": ["b@example.com"],
                   "bcc": "c@example.com", "subject": "s", "text": "t", "colour": "blue"}

        def check(response: Any, path: str, method: str) -> None:
            schema = answer_schema(document, path, method, response.status_code)
            validator(document, schema).validate(response.json())

        check(client.post("/api/send", json=message, headers=key), "/api/send", "post")  # 503: no SMTP yet
        store.set_options({k: parse_option(k, v) for k, v in
                           {"smtp_host": "127.0.0.1", "smtp_port": "2525", "smtp_security": "none"}.items()})
        accepted = client.post("/api/send", json=message, headers=key)
        assert accepted.status_code == 202 and accepted.json()["ignored"] == ["colour"]
        check(accepted, "/api/send", "post")
        message_id = accepted.json()["id"]
        for response, path, method in [
            (client.get(f"/api/messages/{message_id}", headers=key), "/api/messages/{message_id}", "get"),
            (client.get("/api/messages/nope", headers=key), "/api/messages/{message_id}", "get"),
            (client.get("/api/health", headers=key), "/api/health", "get"),
            (client.get("/api/health"), "/api/health", "get"),
            (client.get("/healthz"), "/healthz", "get"),
            (client.post("/api/send", content=b"[1]", headers=key), "/api/send", "post"),
            (client.post("/api/send", json={**message, "from_email": "x"}, headers=key), "/api/send", "post"),
        ]:
            check(response, path, method)
        status = client.get(f"/api/messages/{message_id}", headers=key).json()
        assert [r["kind"] for r in status["recipients"]] == ["to", "cc", "bcc"]
        assert set(status) == set(document["components"]["schemas"]["MessageStatus"]["required"])
