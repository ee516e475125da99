"""`analyze_geometry`: one set's density, coverage and grains, and a verdict."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loom.analysis.coverage import CoverageResult, directional_coverage
from loom.analysis.grains import GrainResult, grain_analysis
from loom.analysis.pca import unit_rows
from loom.analysis.wolf import WolfResult, wolf_analysis

WOLF_REGIONS = 50


@dataclass
class GeometryResult:
    num_vectors: int
    ambient_dim: int
    wolf_axiom: WolfResult
    directional_coverage: CoverageResult
    grain_analysis: GrainResult
    overall_health: str
    analysis_time_ms: float

    def as_json(self) -> dict[str, Any]:
        """The /analyze/geometry answer (the grains' internal fields left out)."""
        body = asdict(self)
        for internal in ("mean_local_dim", "has_structure"):
            del body["grain_analysis"][internal]
        return body


def overall_health(wolf: WolfResult, coverage: CoverageResult, grains: GrainResult) -> str:
    issues = []
    if wolf.severity in ("moderate", "severe"):
        issues.append("density_violation")
    if coverage.coverage_ratio < 0.1:
        issues.append("dimensional_collapse")
    if not grains.has_structure:
        issues.append("no_grain_structure")
    if not issues:
        return "healthy"
    if len(issues) == 1:
        return f"warning:{issues[0]}"
    return "unhealthy:" + ",".join(issues)


def analyze_geometry(X: np.ndarray, seed: int = 0) -> GeometryResult:
    """X: n x d, one vector a row (n >= 3). The same X and seed give the same numbers."""
    started = time.perf_counter()
    X = np.asarray(X, dtype=np.float64)
    rng = np.random.RandomState(seed)
    # Random draws in the order the spec lists the parts: regions, then cosine pairs.
    wolf = wolf_analysis(X, rng, WOLF_REGIONS)
    coverage = directional_coverage(X, rng)
    grains = grain_analysis(unit_rows(X))
    return GeometryResult(num_vectors=X.shape[0], ambient_dim=X.shape[1], wolf_axiom=wolf,
                          directional_coverage=coverage, grain_analysis=grains,
                          overall_health=overall_health(wolf, coverage, grains),
                          analysis_time_ms=(time.perf_counter() - started) * 1000.0)
