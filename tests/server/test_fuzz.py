"""Requests generated from the daemon's own OpenAPI schema, valid and not: none gets a 5xx."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.support.server_process import running_server

pytestmark = pytest.mark.slow

CASES_PER_OPERATION_AND_MODE = 40  # ~9 operations, valid and invalid: a few hundred requests
MAX_TOKENS = 4  # generated requests decode a few tokens at most: the run stays short


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fuzz") / "cache"
    with running_server(cache, "--max-body-mb", "0.25") as srv:
        yield srv


def bounded(case: schemathesis.Case) -> None:
    """Cap the tokens a generated completion may decode (its other fields stay as drawn)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            body[field] = min(value, MAX_TOKENS)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # absent or null: the server's default would apply


def problem(case: schemathesis.Case, response: schemathesis.Response) -> str | None:
    """Why the answer to ``case`` is wrong, or None."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            error = json.loads(response.text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} without an error JSON: {response.text[:300]}"
        if not error.get("message"):
            return f"{response.status_code} with an empty error message"
    return None


def fuzz(operation: schemathesis.APIOperation, mode: GenerationMode, url: str) -> list[str]:
    """Send generated requests for ``operation``; one line per wrong answer."""
    failures: list[str] = []

    @settings(
        max_examples=CASES_PER_OPERATION_AND_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        bounded(case)
        response = case.call(base_url=url, timeout=300)
        why = problem(case, response)
        failures.append("" if why is None else f"{case.method} {case.formatted_path}: {why}")

    try:
        call()
    except Unsatisfiable:  # no input of the operation can break its schema
        assert mode == GenerationMode.NEGATIVE
    return failures


def test_no_generated_request_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    answers = [
        line
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for line in fuzz(operation, mode, server.url)
    ]
    assert len(answers) >= 200  # requests sent
    wrong = [line for line in answers if line]
    assert not wrong, "\n".join(wrong[:20])
    assert server.proc.poll() is None
