"""Grains: DBSCAN clusters of the set's directions on the unit sphere, and
each cluster's shape (its local dimension and elongation)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import DBSCAN

from loom.analysis.pca import effective_dim, pca_variances

MIN_SAMPLES = 3
MAX_LOCAL_COMPONENTS = 10
# Distances are worked out this many matrix entries at a time (64 MB of
# float64), so 10,000 vectors never need their whole distance matrix at once.
DISTANCE_BLOCK = 8_000_000


@dataclass
class GrainResult:
    num_grains: int
    grain_coverage: float
    mean_grain_size: float
    mean_aspect_ratio: float
    mean_local_dim: float
    has_structure: bool


def dbscan_eps(U: np.ndarray) -> float:
    """1.5 x the median over rows of the distance to the row's (k+1)-th nearest
    other row (the diagonal counts as infinitely far), k = min(3, n - 1)."""
    n = len(U)
    k = min(3, n - 1)
    squares = np.einsum("ij,ij->i", U, U)
    kth = np.empty(n)
    step = max(1, DISTANCE_BLOCK // n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        # |u - v|^2 = |u|^2 + |v|^2 - 2 u.v: one matrix product per block.
        d2 = squares[start:stop, None] + squares[None, :] - 2.0 * (U[start:stop] @ U.T)
        D = np.sqrt(np.maximum(d2, 0.0))
        D[np.arange(stop - start), np.arange(start, stop)] = np.inf
        kth[start:stop] = np.partition(D, k, axis=1)[:, k]
    eps = 1.5 * float(np.median(kth))
    return eps if np.isfinite(eps) and eps > 0 else 0.5


def grain_shape(rows: np.ndarray) -> tuple[int, float]:
    """(local_dim, aspect_ratio) of one cluster's rows."""
    m, d = rows.shape
    if m < 3:
        return m, 1.0
    variances, ratios = pca_variances(rows, min(m - 1, d, MAX_LOCAL_COMPONENTS))
    aspect = 1.0
    if len(variances) >= 2 and variances[0] > 0:
        aspect = float(np.sqrt(variances[-1] / variances[0]))
    return effective_dim(ratios), aspect


def grain_analysis(U: np.ndarray) -> GrainResult:
    """Grains of unit rows `U`."""
    n = len(U)
    labels = DBSCAN(eps=dbscan_eps(U), min_samples=MIN_SAMPLES, metric="cosine").fit_predict(U)
    clusters = [U[labels == c] for c in np.unique(labels[labels >= 0])]
    coverage = 1.0 - float((labels == -1).sum()) / n
    if not clusters:
        return GrainResult(0, coverage, 0.0, 0.0, 0.0, False)
    shapes = [grain_shape(rows) for rows in clusters]
    return GrainResult(num_grains=len(clusters), grain_coverage=coverage,
                       mean_grain_size=float(np.mean([len(rows) for rows in clusters])),
                       mean_aspect_ratio=float(np.mean([aspect for _, aspect in shapes])),
                       mean_local_dim=float(np.mean([dim for dim, _ in shapes])),
                       has_structure=len(clusters) > 1 and coverage > 0.5)
