"""Schemathesis against a real `tspro-relay web`: /api/openapi.json is what the code does.

Schemathesis (its CLI, as an operator would run it) reads the document from
the running web process and throws generated requests at every operation
it describes — its coverage phase (boundary and invalid values), fuzzing,
and the stateful phase that follows the document's link from a 202 to the
message's status — once with the relay's key and once with a wrong one.
Every operation must be tested, no answer may be a 5xx, and no answer may
break the document (status code, content type, headers, body schema); with
the key the API must also refuse what the document calls invalid and
refuse requests without the key.

SMTP points at an aiosmtpd sink so sends are accepted (202) rather than all
refused as "not configured"; no worker runs, so the generated messages
wait in the store instead of being delivered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from relay_web import openapi
from support import Relay, SmtpServer

pytestmark = pytest.mark.slow
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance"]
# Only meaningful with a valid key: refusing invalid input, and refusing a request without the key.
KEYED_CHECKS = ["negative_data_rejection", "ignored_auth", "unsupported_method"]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    root = tmp_path_factory.mktemp("schemathesis")
    with SmtpServer("none") as sink:
        relay = Relay(root)
        relay.configure(*sink.settings(), "default_from=noreply@example.org")
        relay.start_web()
        try:
            yield relay
        finally:
            relay.close()


def run_schemathesis(relay: Relay, key: str, checks: list[str], report: Path, phases: str,
                     examples: int) -> dict[str, Any]:
    paths = list(openapi.document()["paths"])
    # The document's own path is left out unless named: name every path so all are tested.
    include = [arg for path in paths for arg in ("--include-path", path)]
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{relay.web.url}/api/openapi.json",  # type: ignore[union-attr]
               "-H", f"Authorization: Bearer {key}", "--checks", ",".join(checks),
               "--max-examples", str(examples), "--seed", "8", "--workers", "1", "--request-timeout", "10",
               "--phases", phases, *include,
               "--report", "json", "--report-json-path", str(report), "--output-sanitize", "true"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=report.parent)
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(report.read_text())
    outcome["console"] = result.stdout
    outcome["returncode"] = result.returncode
    return outcome


def assert_clean(outcome: dict[str, Any], least_cases: int) -> None:
    tail = outcome["console"][-4000:]
    assert outcome["returncode"] == 0 and outcome["exit_code"] == 0, tail
    assert outcome["failures"] == [] and outcome["errors"] == [], tail
    operations = outcome["operations"]
    assert operations["selected"] == operations["tested"] == len(openapi.document()["paths"]), operations
    assert operations["errored"] == operations["skipped"] == 0, operations
    assert outcome["test_cases"]["with_failures"] == 0 and outcome["test_cases"]["generated"] >= least_cases, tail


def test_with_the_key_every_operation_and_no_broken_answer(relay: Relay, tmp_path: Path) -> None:
    outcome = run_schemathesis(relay, relay.key, CHECKS + KEYED_CHECKS, tmp_path / "keyed.json",
                               "coverage,fuzzing,stateful", 10)
    assert_clean(outcome, 200)
    # The generated sends reached the store (202), and the link to their status was followed.
    accepted = relay.query("SELECT COUNT(*) FROM messages")[0][0]
    assert accepted > 0
    assert "API Links:    1 covered" in outcome["console"]
    assert relay.query("SELECT COUNT(*) FROM log WHERE code >= 500")[0][0] == 0


def test_with_a_wrong_key_only_refusals_and_none_breaks_the_document(relay: Relay, tmp_path: Path) -> None:
    before = relay.query("SELECT COUNT(*) FROM messages")[0][0]
    outcome = run_schemathesis(relay, "tsr_" + "w" * 43, CHECKS, tmp_path / "wrong.json", "fuzzing", 10)
    assert_clean(outcome, 20)
    assert relay.query("SELECT COUNT(*) FROM messages")[0][0] == before  # a wrong key queued nothing
