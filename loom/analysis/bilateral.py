"""`analyze_bilateral`: how alike two sets of vectors are (a sender's and a
receiver's concept, say), direction by direction and shape by shape."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loom.analysis.coverage import set_variances
from loom.analysis.grains import GrainResult, grain_analysis
from loom.analysis.pca import effective_dim, pca_components, unit_rows
from loom.analysis.wolf import wolf_analysis

WOLF_REGIONS = 30
MAX_SUBSPACE = 10
EPS = 1e-10


@dataclass
class BilateralResult:
    directional_alignment: float
    subspace_overlap: float
    grain_alignment: float
    density_similarity: float
    effective_dim_ratio: float
    overall_alignment: float
    analysis_time_ms: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def directional_alignment(S: np.ndarray, R: np.ndarray) -> float:
    ms, mr = S.mean(axis=0), R.mean(axis=0)
    ms = ms / (np.linalg.norm(ms) + EPS)
    mr = mr / (np.linalg.norm(mr) + EPS)
    return float(ms @ mr)


def subspace_overlap(S: np.ndarray, R: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between the sets' top PCA subspaces."""
    c = min(MAX_SUBSPACE, S.shape[1], len(S) - 1, len(R) - 1)
    if c < 1:
        return 0.0
    VS, VR = pca_components(S, c), pca_components(R, c)
    singular = np.linalg.svd(VS.T @ VR, compute_uv=False)
    return float(np.mean(singular ** 2))


def grain_alignment(gs: GrainResult, gr: GrainResult) -> float:
    if gs.num_grains == 0 or gr.num_grains == 0:
        return 0.0
    count = 1 - abs(gs.num_grains - gr.num_grains) / max(gs.num_grains, gr.num_grains)
    coverage = 1 - abs(gs.grain_coverage - gr.grain_coverage)
    local = 1 - abs(gs.mean_local_dim - gr.mean_local_dim) / max(gs.mean_local_dim, gr.mean_local_dim, 1)
    return float(0.4 * count + 0.3 * coverage + 0.3 * local)


def density_similarity(sender: np.ndarray, receiver: np.ndarray, rng: np.random.RandomState) -> float:
    ms = wolf_analysis(sender, rng, WOLF_REGIONS).mean_density_ratio
    mr = wolf_analysis(receiver, rng, WOLF_REGIONS).mean_density_ratio
    return float(1 - abs(ms - mr) / max(ms, mr, 1))


def effective_dim_ratio(sender: np.ndarray, receiver: np.ndarray) -> float:
    ds, dr = effective_dim(set_variances(sender)[1]), effective_dim(set_variances(receiver)[1])
    return float(min(ds, dr) / max(ds, dr, 1))


def analyze_bilateral(sender: np.ndarray, receiver: np.ndarray, seed: int = 0) -> BilateralResult:
    """Two n x d sets (n may differ, d may not). The same sets and seed give the same numbers."""
    started = time.perf_counter()
    sender = np.asarray(sender, dtype=np.float64)
    receiver = np.asarray(receiver, dtype=np.float64)
    rng = np.random.RandomState(seed)
    S, R = unit_rows(sender), unit_rows(receiver)
    da = directional_alignment(S, R)
    so = subspace_overlap(S, R)
    ga = grain_alignment(grain_analysis(S), grain_analysis(R))
    ds = density_similarity(sender, receiver, rng)
    overall = (np.clip(da, 0, 1) ** 0.3 * np.clip(so, 0, 1) ** 0.3
               * np.clip(ga, 0, 1) ** 0.2 * np.clip(ds, 0, 1) ** 0.2)
    return BilateralResult(directional_alignment=da, subspace_overlap=so, grain_alignment=ga,
                           density_similarity=ds, effective_dim_ratio=effective_dim_ratio(sender, receiver),
                           overall_alignment=float(overall),
                           analysis_time_ms=(time.perf_counter() - started) * 1000.0)
