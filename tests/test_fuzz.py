"""Fuzzing every route from the server's own OpenAPI schema (schemathesis): valid and invalid bodies, odd
query and path values. Whatever a client sends, the answer is never a 5xx, and every error has the
documented shape. Bounded: a small context and few examples per route, so it takes well under a minute."""
from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, settings

from app.config import Settings
from app.server import create_app


MAX_NEW_TOKENS = 4  # generated bodies ask for up to this many tokens, so each case stays fast on a CPU
SERVER_SETTINGS = {"SOFTSERVE_MAX_SEQ_LEN": "256", "SOFTSERVE_MAX_INPUTS_PER_REQUEST": "4",
            "SOFTSERVE_MAX_REQUEST_MB": "0.25", "SOFTSERVE_MAX_UPLOAD_MB": "0.25"}


def few_tokens(context, body):
    """Keep valid requests cheap: at most MAX_NEW_TOKENS new tokens (invalid values are left as generated)."""
    if not isinstance(body, dict):
        return body
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > MAX_NEW_TOKENS:
            body[key] = MAX_NEW_TOKENS
    if ("prompt" in body or "messages" in body) and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_NEW_TOKENS  # the OpenAI routes' default is the rest of the context
    return body


# Only the fuzzing phase (hypothesis, which favours boundary values); the examples and coverage phases would
# add hundreds of fixed cases per route, and their bodies bypass the max_tokens hook below.
CONFIG = """
[phases.examples]
enabled = false
[phases.coverage]
enabled = false
[phases.stateful]
enabled = false
"""


# The schema is the app's own, built here without loading a model; the server under test serves the same
# document (test_the_fuzzed_schema_is_the_one_served). Loaded at import, not from a fixture: schemathesis's
# fixture-based loader reaches into pytest's private attributes (it breaks on pytest 9.1).
OPENAPI = create_app(Settings()).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=schemathesis.Config.from_str(CONFIG))
schema.hook("map_body")(few_tokens)


def test_the_fuzzed_schema_is_the_one_served(client):
    assert client.get("/openapi.json").json() == OPENAPI


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_makes_a_5xx(case, server):
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    with httpx.Client(base_url=server.url, timeout=10) as probe:  # and the server still serves
        assert probe.get("/health").status_code == 200
