"""Property-based API check: schemathesis generates requests from our /openapi.json (valid and
invalid ones) and none may get a 5xx, and every response must match the published schema.

Bounded: a fixed number of examples per operation, and generation sizes (n, max_tokens) capped
so a generated request never runs long on CPU; their validation has dedicated tests elsewhere.
"""
from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from server_utils import PagodaServer

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 20
GENERATION_CAPS = {"n": 2, "max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4}


@pytest.fixture(scope="module")
def server():
    with PagodaServer(["--max-model-len", "256", "--disable-log-requests", "--disable-log-stats"]) as s:
        yield s


def _bound(case) -> None:
    body = case.body
    if case.path.endswith(("completions", "responses")) and isinstance(body, dict):
        for key, cap in GENERATION_CAPS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[key] = cap
        if "chat" in case.path and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = GENERATION_CAPS["max_tokens"]
        if case.path.endswith("responses") and "max_output_tokens" not in body:
            body["max_output_tokens"] = GENERATION_CAPS["max_output_tokens"]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def test_openapi_no_server_errors(server):
    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                              "/tokenize", "/detokenize", "/health", "/metrics"}
    session = requests.Session()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def check(case):
                _bound(case)
                response = case.call(session=session, timeout=60)
                case.validate_response(response, checks=CHECKS)
            try:
                check()
            except Unsatisfiable:
                # nothing to break in an operation without parameters or body
                assert mode == GenerationMode.NEGATIVE, op.label
