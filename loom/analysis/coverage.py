"""Directional coverage: how many dimensions the set spans (PCA) and how
evenly its directions spread over the sphere."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loom.analysis.grade import grade
from loom.analysis.pca import effective_dim, pca_variances, unit_rows

MAX_PAIRS = 5000
LOG_FLOOR = 1e-10


@dataclass
class CoverageResult:
    ambient_dim: int
    effective_dim: int
    coverage_ratio: float
    coverage_quality: str
    spherical_uniformity: float
    isotropy_score: float


def coverage_quality(ratio: float) -> str:
    return grade(ratio, ((0.1, "degenerate"), (0.3, "sparse"), (0.6, "moderate")), "full")


def isotropy_score(variances: np.ndarray) -> float:
    """Geometric mean of the positive PCA variances over the largest."""
    largest = float(variances.max()) if variances.size else 0.0
    positive = variances[variances > 0]
    if largest <= 0 or positive.size == 0:
        return 0.0
    return float(np.exp(np.mean(np.log(positive + LOG_FLOOR))) / largest)


def spherical_uniformity(U: np.ndarray, rng: np.random.RandomState) -> float:
    """1 when pairwise cosines look like random directions' (mean 0, spread 1/sqrt(d))."""
    n, d = U.shape
    if n < 10:
        return 0.5
    if n * (n - 1) // 2 <= MAX_PAIRS:
        i, j = np.triu_indices(n, k=1)
    else:
        i = rng.randint(0, n, MAX_PAIRS)
        j = rng.randint(0, n, MAX_PAIRS)
        keep = i != j
        i, j = i[keep], j[keep]
    # In slices: 5000 pairs of 16,384-wide rows would be two 650 MB copies at once.
    cosines = np.concatenate([np.einsum("ij,ij->i", U[i[k:k + 500]], U[j[k:k + 500]])
                              for k in range(0, len(i), 500)])
    m, s, e = float(cosines.mean()), float(cosines.std()), 1.0 / np.sqrt(d)
    return float(0.5 * np.exp(-abs(m) * np.sqrt(d)) + 0.5 * np.exp(-abs(s - e) / e))


def set_variances(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PCA coverage reads: of the raw rows, as many components as n - 1 centered rows can have."""
    n, d = X.shape
    return pca_variances(X, min(n - 1, d))


def directional_coverage(X: np.ndarray, rng: np.random.RandomState) -> CoverageResult:
    n, d = X.shape
    variances, ratios = set_variances(X)
    dim = effective_dim(ratios)
    ratio = dim / d
    return CoverageResult(ambient_dim=d, effective_dim=dim, coverage_ratio=float(ratio),
                          coverage_quality=coverage_quality(ratio),
                          spherical_uniformity=spherical_uniformity(unit_rows(X), rng),
                          isotropy_score=isotropy_score(variances))
