"""Density of random convex regions ("wolf axiom"): how far the share of
vectors inside random intersections of half-spaces strays from the share a
uniform spread over the sphere would put there."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from loom.analysis.grade import grade
from loom.analysis.pca import unit_rows

HALF_SPACES = 3
MIN_EXPECTED = 0.01
VIOLATION_RATIO = 2.5


@dataclass
class WolfResult:
    max_density_ratio: float
    mean_density_ratio: float
    uniformity_p_value: float
    violation_count: int
    severity: str


def severity(max_ratio: float) -> str:
    return grade(max_ratio, ((1.5, "none"), (2.5, "mild"), (5.0, "moderate")), "severe")


def wolf_analysis(X: np.ndarray, rng: np.random.RandomState, regions: int = 50) -> WolfResult:
    U = unit_rows(X)
    n, d = U.shape
    root_d = np.sqrt(d)
    # All draws first, in the spec's order (per region, per half-space: the
    # normal, then its threshold), then one matrix product for every test.
    normals = np.empty((regions * HALF_SPACES, d))
    thresholds = np.empty(regions * HALF_SPACES)
    for k in range(regions * HALF_SPACES):
        a = rng.randn(d)
        normals[k] = a / np.linalg.norm(a)
        thresholds[k] = rng.uniform(-0.5, 0.5) / root_d
    inside = (U @ normals.T >= thresholds).reshape(n, regions, HALF_SPACES).all(axis=2)
    # A row kept by all three half-spaces is one the sequential filter keeps.
    expected = (1.0 - stats.norm.cdf(thresholds * root_d)).reshape(regions, HALF_SPACES).prod(axis=1)
    used = expected >= MIN_EXPECTED
    ratios = (inside.sum(axis=0)[used] / n) / expected[used]
    if ratios.size == 0:
        return WolfResult(1.0, 1.0, 1.0, 0, severity(1.0))
    p_value = 1.0
    if ratios.size > 2:
        p_value = float(stats.ttest_1samp(ratios, 1.0).pvalue)
        if not np.isfinite(p_value):
            p_value = 1.0  # every ratio exactly 1.0: nothing to tell from uniform
    max_ratio = float(ratios.max())
    return WolfResult(max_density_ratio=max_ratio, mean_density_ratio=float(ratios.mean()),
                      uniformity_p_value=p_value, violation_count=int((ratios > VIOLATION_RATIO).sum()),
                      severity=severity(max_ratio))
