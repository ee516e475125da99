"""POST /analyze/geometry and /analyze/bilateral through a real `loom serve`
(API, broker, worker processes): the Weaver-shaped answers, equal to the
in-process math (loom/analysis) on the same vectors and seed; bad input is a
422 naming the field and leaves the server healthy; /health answers while
analyses run; the Python client's calls; /docs describes every field."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json

import httpx
import numpy as np
import pytest

from loom.analysis import analyze_bilateral, analyze_geometry
from loom.client import AsyncLoomClient, LoomClient, LoomHTTPError
from loom.client.analysis import BilateralAnalysis, GeometryAnalysis
from tests.helpers import Stack

# The JSON types the Weaver client decodes (analysis-spec.md).
GEOMETRY_SHAPE = {
    "overall_health": str, "num_vectors": int, "ambient_dim": int, "analysis_time_ms": float,
    "wolf_axiom": {"max_density_ratio": float, "mean_density_ratio": float, "uniformity_p_value": float,
                   "violation_count": int, "severity": str},
    "directional_coverage": {"ambient_dim": int, "effective_dim": int, "coverage_ratio": float,
                             "coverage_quality": str, "spherical_uniformity": float, "isotropy_score": float},
    "grain_analysis": {"num_grains": int, "grain_coverage": float, "mean_grain_size": float,
                       "mean_aspect_ratio": float},
}
BILATERAL_SHAPE = {k: float for k in ("directional_alignment", "subspace_overlap", "grain_alignment",
                                      "density_similarity", "effective_dim_ratio", "overall_alignment",
                                      "analysis_time_ms")}
TOLERANCE = 1e-9  # the server's BLAS runs on one thread, this process's on several: rounding apart


def clusters(k: int, per: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return np.concatenate([c + 0.2 * rng.randn(per, d) for c in rng.randn(k, d)])


def assert_shape(body: dict, shape: dict) -> None:
    assert set(body) == set(shape), body
    for key, kind in shape.items():
        if isinstance(kind, dict):
            assert_shape(body[key], kind)
        else:
            # JSON keeps 1.0 and 1 apart: a float field must never arrive as an integer, nor an int as a bool.
            assert type(body[key]) is kind, (key, body[key])


def assert_same_numbers(got: dict, want: dict) -> None:
    for key, value in want.items():
        if key == "analysis_time_ms":
            continue
        if isinstance(value, dict):
            assert_same_numbers(got[key], value)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=TOLERANCE, abs=1e-12), key
        else:
            assert got[key] == value, key


def post(stack: Stack, path: str, body: dict | bytes) -> httpx.Response:
    with stack.client() as client:
        if isinstance(body, bytes):
            return client.post(path, content=body, headers={"Content-Type": "application/json"})
        return client.post(path, json=body)


def test_geometry_is_weaver_shaped_and_equals_the_math(stack: Stack):
    X = clusters(3, 12, 24, seed=1)
    r = post(stack, "/analyze/geometry", {"vectors": X.tolist(), "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_shape(body, GEOMETRY_SHAPE)
    assert body["num_vectors"] == 36 and body["ambient_dim"] == 24
    assert_same_numbers(body, analyze_geometry(X, seed=7).as_json())
    # No seed is seed 0, and the same request gives the same numbers.
    first = post(stack, "/analyze/geometry", {"vectors": X.tolist()}).json()
    again = post(stack, "/analyze/geometry", {"vectors": X.tolist(), "seed": 0}).json()
    first.pop("analysis_time_ms"), again.pop("analysis_time_ms")
    assert first == again


def test_bilateral_is_weaver_shaped_and_equals_the_math(stack: Stack):
    S, R = clusters(3, 10, 16, seed=2), clusters(2, 12, 16, seed=3)
    r = post(stack, "/analyze/bilateral", {"sender_vectors": S.tolist(), "receiver_vectors": R.tolist(), "seed": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_shape(body, BILATERAL_SHAPE)
    assert_same_numbers(body, analyze_bilateral(S, R, seed=4).as_json())


def test_python_clients(stack: Stack):
    S = clusters(3, 10, 16, seed=5).astype(np.float32)  # numpy in, typed answers out
    with LoomClient(stack.url) as loom:
        geometry = loom.analyze_geometry(S, seed=1)
        assert isinstance(geometry, GeometryAnalysis)
        assert_same_numbers(geometry.model_dump(), analyze_geometry(S.astype(np.float64), seed=1).as_json())
        same = loom.analyze_bilateral(S, list(S), seed=2)  # a list of row arrays works too
        assert isinstance(same, BilateralAnalysis)
        assert same.directional_alignment == pytest.approx(1.0) and same.subspace_overlap == pytest.approx(1.0)
        with pytest.raises(LoomHTTPError) as caught:
            loom.analyze_geometry(S[:2])
        assert caught.value.status_code == 422 and "vectors" in str(caught.value)
        nan = S.copy()
        nan[1, 3] = np.nan
        with pytest.raises(LoomHTTPError) as caught:
            loom.analyze_geometry(nan)
        assert caught.value.status_code == 422 and "vectors" in str(caught.value)

    async def from_async() -> BilateralAnalysis:
        async with AsyncLoomClient(stack.url) as loom:
            return await loom.analyze_bilateral(S, S[::-1], seed=2)

    reversed_rows = asyncio.run(from_async())
    assert reversed_rows.model_dump() == {**same.model_dump(), "analysis_time_ms": reversed_rows.analysis_time_ms}


ROWS = [[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]]


@pytest.mark.parametrize("path, body, field, words", [
    ("/analyze/geometry", {"vectors": ROWS[:2]}, "vectors", "at least 3 vectors"),
    ("/analyze/geometry", {"vectors": [[1.0, 2.0], [3.0], [5.0, 7.0]]}, "vectors", "same length"),
    ("/analyze/geometry", b'{"vectors": [[1.0, 2.0], [3.0, NaN], [5.0, 7.0]]}', "vectors", "NaN"),
    ("/analyze/geometry", b'{"vectors": [[1.0, 2.0], [3.0, Infinity], [5.0, 7.0]]}', "vectors", "infinity"),
    ("/analyze/geometry", {"vectors": [[1.0, 2.0], [3.0, None], [5.0, 7.0]]}, "vectors", "numbers"),
    ("/analyze/geometry", {"vectors": [[0.5]] * 10_001}, "vectors", "at most 10000 vectors"),
    ("/analyze/geometry", {"vectors": [[0.5] * 16_385] * 3}, "vectors", "at most 16384 dimensions"),
    ("/analyze/geometry", {"vectors": ROWS, "seed": -1}, "seed", "greater than or equal"),
    ("/analyze/geometry", {"vector": ROWS}, "vectors", "required"),
    ("/analyze/geometry", b"[1, 2, 3]", "body", "JSON object"),
    ("/analyze/geometry", b'{"vectors": [[1.0, 2.0],', "body", "not valid JSON"),
    ("/analyze/bilateral", {"sender_vectors": ROWS, "receiver_vectors": [[1.0, 2.0, 3.0]] * 3},
     "receiver_vectors", "sender_vectors has 2, receiver_vectors has 3"),
    ("/analyze/bilateral", {"sender_vectors": ROWS[:1], "receiver_vectors": ROWS}, "sender_vectors", "at least 3"),
    ("/analyze/bilateral", {"sender_vectors": ROWS}, "receiver_vectors", "required"),
])
def test_bad_input_is_422_naming_the_field(stack: Stack, path, body, field, words):
    r = post(stack, path, body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{field}: ") and words in error["message"], error


def test_server_healthy_after_bad_input(stack: Stack):
    for body in ({"vectors": ROWS[:1]}, b'{"vectors": [[NaN]]}', b"\xff\xfe"):
        assert post(stack, "/analyze/geometry", body).status_code == 422
    assert stack.health()["status"] == "healthy"
    assert post(stack, "/analyze/geometry", {"vectors": ROWS}).status_code == 200


def test_health_answers_while_analyses_run(stack: Stack):
    X = clusters(4, 100, 256, seed=6).tolist()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(post, stack, "/analyze/geometry", {"vectors": X, "seed": s}) for s in range(3)]
        running.append(pool.submit(post, stack, "/analyze/bilateral", {"sender_vectors": X, "receiver_vectors": X}))
        health = httpx.get(f"{stack.url}/health", timeout=30)
        answers = [f.result() for f in running]
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert [a.status_code for a in answers] == [200] * 4, [a.text[:200] for a in answers]


def test_docs_describe_every_field(stack: Stack):
    spec = httpx.get(f"{stack.url}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]

    def described(schema: dict, where: str) -> None:
        for name, prop in schema["properties"].items():
            assert prop.get("description"), f"{where}.{name} has no description"
            ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("allOf", []) if "$ref" in a), None)
            if ref:
                described(schemas[ref.rsplit("/", 1)[1]], f"{where}.{name}")

    for path, fields in (("/analyze/geometry", {"vectors", "seed"}),
                         ("/analyze/bilateral", {"sender_vectors", "receiver_vectors", "seed"})):
        operation = spec["paths"][path]["post"]
        request = operation["requestBody"]["content"]["application/json"]["schema"]
        assert set(request["properties"]) == fields
        described(request, path)
        answer = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        described(schemas[answer], answer)
    assert json.dumps(schemas["GeometryAnalysis"]).count("description") >= 7
