"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis), over real HTTP.

Every operation in /openapi.json gets generated requests, valid and invalid,
against a live `loom serve`. No answer may be a 5xx, and the server must still
be healthy and serving afterwards.

Bounded so the file runs in well under 90 s on two CPU cores: a few dozen
examples per operation, and generation lengths are capped (a valid
`max_tokens` of up to 8192 would make one example run for many seconds; the
limits themselves are tested in test_errors.py).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from loom import protocol as P
from tests.conftest import TOY
from tests.helpers import Stack, user

# Deterministic and short by default; LOOM_FUZZ_EXAMPLES=500 LOOM_FUZZ_RANDOM=1 for a longer, fresh hunt.
MAX_EXAMPLES = int(os.environ.get("LOOM_FUZZ_EXAMPLES", "30"))
DERANDOMIZE = not os.environ.get("LOOM_FUZZ_RANDOM")
FUZZ_MAX_TOKENS = 4  # longest generation a fuzzed request may ask for


# Every operation the API serves; a new endpoint must be added here to be fuzzed
# (test_every_operation_is_fuzzed fails until it is).
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/models"),
    ("GET", "/metrics"),
    ("POST", "/models/load"),
    ("DELETE", "/models/{model_id}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/generate"),
    ("POST", "/embed"),
    ("POST", "/embed/batch"),
    ("POST", "/generate/batch"),
    ("POST", "/analyze/geometry"),
    ("POST", "/analyze/bilateral"),
    ("POST", "/patch"),
]


@pytest.fixture(scope="module")
def api_schema(stack: Stack):
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    # Read whole SSE streams (schemathesis stops at 20 events by default), so
    # that how each stream ends can be checked.
    schema.config.max_stream_events = 10_000
    return schema


def test_every_operation_is_fuzzed(api_schema):
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


def bound(case: Any) -> None:
    """Cap generation length, keeping invalid values invalid so validation is still fuzzed."""
    body = case.body
    if case.method.upper() != "POST" or not isinstance(body, dict):
        return
    if case.path.startswith("/analyze/"):
        # Vectors of one length, which JSON Schema cannot say: else every valid example is a 422.
        sets = [body.get(k) for k in ("vectors", "sender_vectors", "receiver_vectors")]
        sets = [rows for rows in sets if isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)]
        for rows in sets:
            width = len(sets[0][0])
            rows[:] = [(row * width)[:width] for row in rows]
        return
    if case.path == "/generate/batch" and isinstance(body.get("prompts"), list) and len(body["prompts"]) <= 100:
        del body["prompts"][3:]  # each prompt is a generation: keep a fuzzed batch short (over 100 stays invalid)
    if case.path not in ("/v1/chat/completions", "/generate", "/generate/batch", "/patch"):
        return
    if "max_tokens" not in body:
        if case.path == "/patch":
            return  # /patch generates nothing unless asked
        body["max_tokens"] = FUZZ_MAX_TOKENS  # the default (256) would be a long run
        return
    tokens = body["max_tokens"]
    # JSON Schema's integers include 243.0, and pydantic also takes "243".
    if isinstance(tokens, str) and tokens.strip().isdigit():
        tokens = int(tokens)
    if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) and tokens == int(tokens) \
            and FUZZ_MAX_TOKENS < tokens <= 8192:
        body["max_tokens"] = 1 + int(tokens) % FUZZ_MAX_TOKENS


def no_worker_for_device(case: Any, response: Any, devices: set[str], error: dict | None = None) -> bool:
    """The one documented 5xx a valid request can get: it named a device no worker runs on
    (503 no_worker_available, as when that device's worker is down)."""
    body = case.body if isinstance(case.body, dict) else {}
    device = body.get("device")
    if not isinstance(device, str) or device.strip() in devices:
        return False
    if error is None:
        if response.status_code != 503:
            return False
        error = response.json().get("error", {})
    return error.get("type") == P.ErrorType.NO_WORKER and device.strip() in error.get("message", "")


def check(case: Any, stack: Stack, devices: set[str]) -> int:
    bound(case)
    response = case.call(base_url=stack.url, timeout=60)
    if no_worker_for_device(case, response, devices):
        return response.status_code
    # Only the server-error check: the schema documents 200 and 422, while
    # 400/401/404/429 are the contract's answers for bad models and limits.
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:500])
    content_type = response.headers.get("content-type") or [""]  # schemathesis keeps a list per header
    if response.status_code >= 400 and content_type[0].startswith("application/json"):
        # Every error answer says what went wrong, and never with a traceback.
        assert "Traceback" not in response.text
        body = response.json()
        assert "error" in body or "detail" in body, body
    if content_type[0].startswith("text/event-stream"):
        # A server error after the 200 is an `error` event: still a server error.
        events = re.findall(r"^event: (\w+)$", response.text, re.M)
        assert events and events[-1] in ("message_delta", "error"), response.text[-500:]
        assert events.count("message_delta") + events.count("error") == 1, events
        if events[-1] == "error":
            error = json.loads(response.text.rstrip().rsplit("data: ", 1)[1])["error"]
            if not (error["type"] == P.ErrorType.NO_WORKER and no_worker_for_device(case, None, devices, error)):
                assert P.HTTP_STATUS.get(error["type"], 500) < 500, (case.body, error)
    return response.status_code


# Negative (schema-violating) data only where there is a body to violate.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_server_errors(api_schema, stack: Stack, method: str, path: str, mode: GenerationMode):
    operation = api_schema[path][method]
    devices = {w["device"] for w in stack.workers()}
    assert devices, "no live worker before fuzzing"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None, print_blob=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def fuzz(case):
        statuses.append(check(case, stack, devices))

    statuses: list[int] = []
    fuzz()
    print(f"{method} {path} {mode.value}: {len(statuses)} requests, statuses {sorted(Counter(statuses).items())}")
    # The fuzzer really ran, and valid requests really got through validation.
    assert len(statuses) >= (1 if method == "GET" else MAX_EXAMPLES // 2), statuses  # GETs take no input
    if mode == GenerationMode.POSITIVE and path != "/models/load" and "{" not in path:
        assert 200 in statuses, statuses
    if mode == GenerationMode.NEGATIVE:
        assert 422 in statuses, statuses


def test_empty_device_means_any_worker(stack: Stack):
    """Found by fuzzing: "device": "" matched no worker and got a 503 "no worker is connected"."""
    with stack.client() as client:
        r = client.post("/generate", json={"model": TOY, "prompt": "hi", "max_tokens": 2, "device": ""})
        assert r.status_code == 200, r.text
        r = client.post("/models/load", json={"model": TOY, "device": " "})
        assert r.status_code == 200, r.text
        r = client.post("/generate", json={"model": TOY, "prompt": "hi", "max_tokens": 2, "device": "tpu:9"})
        assert r.status_code == 503 and "tpu:9" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate"])
@pytest.mark.parametrize("layers", [[2**70, 1], [-(2**65)], 2**70])
def test_huge_layer_indexes_are_422(stack: Stack, path: str, layers):
    """Found by fuzzing: a layer index past 64 bits inside a list was a 500 (msgpack overflow)."""
    body = {"model": TOY, "max_tokens": 2, "return_hidden_states": True, "hidden_state_layers": layers}
    body.update({"prompt": "hi"} if path == "/generate" else {"messages": user("hi")})
    with stack.client() as client:
        for stream in (False, True):
            r = client.post(path, json={**body, "stream": stream})
            assert r.status_code == 422, r.text
            assert "hidden_state_layers" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_tiny_temperature_is_answered(stack: Stack, stream: bool):
    """Found by fuzzing: temperature 1.4e-45 (valid: 0..2) made sampling divide by ~0 and
    the request hung forever (the failed prefill's request was answered by no one)."""
    body = {"model": TOY, "prompt": "hi", "max_tokens": 2, "temperature": 1.401298464324817e-45, "stream": stream}
    r = httpx.post(f"{stack.url}/generate", json=body, timeout=20)
    assert r.status_code == 200, r.text
    if stream:
        assert "event: message_delta" in r.text and "event: error" not in r.text, r.text
    else:
        assert r.json()["token_count"] == 2


def test_stack_still_serves_after_fuzzing(stack: Stack):
    assert stack.proc.poll() is None, stack.log()[-3000:]
    with stack.client() as client:
        health = client.get("/health")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "healthy"
        r = client.post("/v1/chat/completions", json={"model": TOY, "messages": user("hi"), "max_tokens": 3,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
