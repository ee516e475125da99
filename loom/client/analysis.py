"""POST /analyze/geometry and /analyze/bilateral as client calls, and their
typed answers (the Weaver client's `/analyze` and `/compare`).

    with LoomClient() as loom:
        a = loom.analyze_geometry(vectors_a)          # n x d: a numpy array or lists
        print(a.overall_health, a.directional_coverage.effective_dim)
        print(loom.analyze_bilateral(vectors_a, vectors_b).overall_alignment)

The server documents its answers with these same models (api/routes_analysis.py).
"""
from __future__ import annotations

import json
from typing import Any

import httpx
from pydantic import Field

from loom.client.models import _Shape
from loom.client.responses import parse

try:  # orjson (a dependency of the server) writes 1,000 x 4,096 floats 10x faster
    import orjson
except ImportError:  # pragma: no cover - the client alone needs only the standard library
    orjson = None  # type: ignore[assignment]

__all__ = ["AnalysisMethods", "AsyncAnalysisMethods", "BilateralAnalysis", "DirectionalCoverage",
           "GeometryAnalysis", "GrainAnalysis", "WolfAxiom"]


class WolfAxiom(_Shape):
    max_density_ratio: float = Field(..., description="largest ratio, over 50 random convex regions (each the "
                                                      "intersection of 3 half-spaces), of the share of unit "
                                                      "vectors inside to the share a uniform spread would put there")
    mean_density_ratio: float = Field(..., description="mean of those ratios (1 for a uniform spread)")
    uniformity_p_value: float = Field(..., description="two-sided one-sample t-test of the ratios against 1.0 "
                                                       "(1.0 when there are 2 ratios or fewer)")
    violation_count: int = Field(..., description="regions whose ratio exceeds 2.5")
    severity: str = Field(..., description='from max_density_ratio: "none" (< 1.5), "mild" (< 2.5), '
                                           '"moderate" (< 5), "severe"')


class DirectionalCoverage(_Shape):
    ambient_dim: int = Field(..., description="d, the length of each vector")
    effective_dim: int = Field(..., description="principal components needed to explain 95% of the variance")
    coverage_ratio: float = Field(..., description="effective_dim / ambient_dim")
    coverage_quality: str = Field(..., description='from coverage_ratio: "degenerate" (< 0.1), "sparse" (< 0.3), '
                                                   '"moderate" (< 0.6), "full"')
    spherical_uniformity: float = Field(..., description="0..1: how much the pairwise cosines look like random "
                                                         "directions' (mean 0, spread 1/sqrt(d)); 0.5 for "
                                                         "fewer than 10 vectors")
    isotropy_score: float = Field(..., description="geometric mean of the PCA variances over the largest "
                                                   "(1: every direction equally spread; 0: none)")


class GrainAnalysis(_Shape):
    num_grains: int = Field(..., description="DBSCAN clusters of the unit vectors (cosine metric, min 3 samples)")
    grain_coverage: float = Field(..., description="share of vectors in some cluster (1 - noise share)")
    mean_grain_size: float = Field(..., description="mean vectors per cluster (0 with no cluster)")
    mean_aspect_ratio: float = Field(..., description="mean over clusters of sqrt(last / first PCA variance) of "
                                                      "the cluster, up to 10 components (0 with no cluster)")


class GeometryAnalysis(_Shape):
    overall_health: str = Field(..., description='"healthy", "warning:<issue>" or "unhealthy:<issue>,<issue>", '
                                                 "issues among density_violation, dimensional_collapse, "
                                                 "no_grain_structure")
    num_vectors: int = Field(..., description="n, the vectors analyzed")
    ambient_dim: int = Field(..., description="d, the length of each vector")
    wolf_axiom: WolfAxiom = Field(..., description="density of random convex regions")
    directional_coverage: DirectionalCoverage = Field(..., description="dimensions spanned, spread of directions")
    grain_analysis: GrainAnalysis = Field(..., description="clusters of directions on the unit sphere")
    analysis_time_ms: float = Field(..., description="time the computation took, in milliseconds")


class BilateralAnalysis(_Shape):
    directional_alignment: float = Field(..., description="cosine between the two sets' mean unit vectors")
    subspace_overlap: float = Field(..., description="0..1: mean squared cosine of the principal angles between "
                                                     "the sets' top PCA subspaces (up to 10 components)")
    grain_alignment: float = Field(..., description="0..1: likeness of the sets' grain counts, coverage and local "
                                                    "dimension (0 if either set has no grain)")
    density_similarity: float = Field(..., description="0..1: likeness of the sets' mean density ratios over 30 "
                                                       "random convex regions each")
    effective_dim_ratio: float = Field(..., description="smaller over larger of the sets' effective dimensions")
    overall_alignment: float = Field(..., description="da^0.3 * so^0.3 * ga^0.2 * ds^0.2 of the four scores "
                                                      "above, each clipped to 0..1")
    analysis_time_ms: float = Field(..., description="time the computation took, in milliseconds")


# --- the calls -----------------------------------------------------------------


def _rows(vectors: Any) -> Any:
    """A set of vectors as the encoder below can write it: a 2-D numpy array as
    float64, which orjson writes directly (float32 would travel as its shortest
    float32 digits, not its exact value); anything else with `tolist` (a torch
    tensor) or a sequence of rows that may themselves be arrays, as lists."""
    if orjson is not None and hasattr(vectors, "astype") and getattr(vectors, "ndim", 0) == 2:
        return vectors.astype("float64", order="C", copy=False)
    if hasattr(vectors, "tolist"):
        return vectors.tolist()
    return [row.tolist() if hasattr(row, "tolist") else list(row) for row in vectors]


def _request(http: httpx.Client | httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Request:
    # Encoded here rather than by httpx (json=): the standard library takes
    # seconds over millions of floats, and httpx refuses NaN before the
    # server can say which field holds it.
    if orjson is not None:
        content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    else:
        content = json.dumps(body, separators=(",", ":"), default=float).encode()
    return http.build_request("POST", path, content=content, headers={"Content-Type": "application/json"})


def _geometry_body(vectors: Any, seed: int) -> dict[str, Any]:
    return {"vectors": _rows(vectors), "seed": seed}


def _bilateral_body(sender: Any, receiver: Any, seed: int) -> dict[str, Any]:
    return {"sender_vectors": _rows(sender), "receiver_vectors": _rows(receiver), "seed": seed}


class AnalysisMethods:
    """LoomClient's analysis calls (a mixin: uses the client's `_http` and `_send`)."""

    _http: httpx.Client

    def analyze_geometry(self, vectors: Any, seed: int = 0) -> GeometryAnalysis:
        """Density, coverage and grains of one set (n >= 3 vectors, one a row)."""
        request = _request(self._http, "/analyze/geometry", _geometry_body(vectors, seed))
        return parse(GeometryAnalysis, self._send(request))  # type: ignore[attr-defined]

    def analyze_bilateral(self, sender: Any, receiver: Any, seed: int = 0) -> BilateralAnalysis:
        """How alike two sets of the same dimension are."""
        request = _request(self._http, "/analyze/bilateral", _bilateral_body(sender, receiver, seed))
        return parse(BilateralAnalysis, self._send(request))  # type: ignore[attr-defined]


class AsyncAnalysisMethods:
    """AsyncLoomClient's analysis calls, awaited."""

    _http: httpx.AsyncClient

    async def analyze_geometry(self, vectors: Any, seed: int = 0) -> GeometryAnalysis:
        request = _request(self._http, "/analyze/geometry", _geometry_body(vectors, seed))
        return parse(GeometryAnalysis, await self._send(request))  # type: ignore[attr-defined]

    async def analyze_bilateral(self, sender: Any, receiver: Any, seed: int = 0) -> BilateralAnalysis:
        request = _request(self._http, "/analyze/bilateral", _bilateral_body(sender, receiver, seed))
        return parse(BilateralAnalysis, await self._send(request))  # type: ignore[attr-defined]
