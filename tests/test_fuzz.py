"""The API driven from its own OpenAPI schema (schemathesis): no 5xx and no answer outside the schema, for
generated requests and for strings holding lone surrogates and control characters. Bounded in count and time."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import deploy, undeploy

FUZZ_KEY = "fuzz-key-0123456789abcdef"
HEADERS = {"X-API-Key": FUZZ_KEY}
EXAMPLES = 60  # per operation: 3 rerank routes, 2 score routes, 3 GET routes


@pytest.fixture(scope="module")
def fuzz_url(serve_url, model_dirs) -> Iterator[str]:
    """A small application for the fuzzer: tiny models, small limits, a key; deleted after the module."""
    deploy(
        "fuzz",
        {
            "text": {"model": str(model_dirs["cross_encoder"])},
            "image_text": {"model": str(model_dirs["clip"])},
            "api_key": FUZZ_KEY,
            "max_documents_per_request": 8,
            "max_text_chars": 300,
            "max_request_bytes": 65536,
            "max_image_bytes": 16384,
            "request_timeout_s": 20,
        },
    )
    try:
        yield f"{serve_url}/fuzz"
    finally:
        undeploy("fuzz")


def test_generated_requests_get_no_5xx_and_answers_inside_the_schema(fuzz_url):
    # Each operation's strategy driven by hypothesis here (schemathesis' own pytest loader does not run on
    # this pytest). call_and_validate fails on a 5xx, on an answer (status, headers, body) its operation's
    # schema does not allow, and on a schema-invalid request accepted. Not checked: that every schema-valid
    # request is accepted, since some limits are the service's own (an all-whitespace query is a 422).
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", headers=HEADERS)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v2/rerank", "/v1/rerank", "/rerank", "/score", "/v1/score", "/health"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case) -> None:
            case.call_and_validate(headers=HEADERS, timeout=30, excluded_checks=[positive_data_acceptance])

        call()


# Lone surrogates (valid JSON escapes, not valid Unicode), control characters, NUL, odd whitespace and marks.
HOSTILE = st.text(
    alphabet=st.characters(categories=["Cs", "Cc", "Cf", "Zl", "Zp", "Mn", "Co", "Lu", "Nd"]), max_size=40
)


# Seeded (derandomize) and without an example database: the same examples here as under CI=true, where
# Hypothesis' own CI profile derandomizes anyway; a run never replays what an earlier local run stored.
@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(query=HOSTILE, documents=st.lists(HOSTILE, min_size=1, max_size=4), instruction=st.none() | HOSTILE)
def test_hostile_strings_get_an_answer_or_a_4xx_never_a_5xx(fuzz_url, query, documents, instruction):
    body = json.dumps({"query": query, "documents": documents, "instruction": instruction})  # ASCII escapes
    response = httpx.post(
        f"{fuzz_url}/v2/rerank", content=body, headers={**HEADERS, "Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code in (200, 413, 422), response.text
    if response.status_code != 200:
        assert response.json()["error"]["message"]
