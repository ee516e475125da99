"""The analysis math (loom/analysis) on constructed data: the known answers
of analysis-spec.md's last section, agreement with a literal transcription of
the spec (scikit-learn's PCA(svd_solver="full"), loops, scipy distances), and
the same numbers for the same input and seed. No HTTP here."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cdist
from sklearn.cluster import DBSCAN
from sklearn.decomposition import PCA

from loom.analysis import InputError, analyze_bilateral, analyze_geometry, check_same_dims, check_vectors
from loom.analysis.coverage import spherical_uniformity
from loom.analysis.grains import GrainResult, dbscan_eps, grain_analysis
from loom.analysis.pca import pca_components, pca_variances, unit_rows
from loom.analysis.wolf import wolf_analysis
from loom.analysis.bilateral import grain_alignment

RTOL = 1e-7  # the fast paths against the literal spec: same decompositions, rounding apart


def gaussian(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, d)


def clusters(k: int, per: int, d: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    centers = rng.randn(k, d)
    return np.concatenate([c + spread * rng.randn(per, d) for c in centers])


def without_time(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "analysis_time_ms"}


# --- a literal reading of the spec, for reference --------------------------------


def ref_effective_dim(pca: PCA) -> int:
    return int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), 0.95) + 1)


def ref_wolf(X: np.ndarray, rng: np.random.RandomState, regions: int) -> dict:
    U = unit_rows(X)
    n, d = U.shape
    ratios = []
    for _ in range(regions):
        inside, expected = U, 1.0
        for _ in range(3):
            a = rng.randn(d)
            a = a / np.linalg.norm(a)
            t = rng.uniform(-0.5, 0.5) / np.sqrt(d)
            inside = inside[inside @ a >= t]
            expected *= 1 - stats.norm.cdf(t * np.sqrt(d))
        if expected >= 0.01:
            ratios.append((len(inside) / n) / expected)
    ratios = np.array(ratios)
    p = float(stats.ttest_1samp(ratios, 1.0).pvalue) if len(ratios) > 2 else 1.0
    return {"max_density_ratio": ratios.max(), "mean_density_ratio": ratios.mean(), "uniformity_p_value": p,
            "violation_count": int((ratios > 2.5).sum())}


def ref_coverage(X: np.ndarray, rng: np.random.RandomState) -> dict:
    n, d = X.shape
    pca = PCA(n_components=min(n - 1, d), svd_solver="full").fit(X - X.mean(axis=0))
    ev = pca.explained_variance_
    pos = ev[ev > 0]
    U = unit_rows(X)
    if n < 10:
        su = 0.5
    else:
        if n * (n - 1) / 2 <= 5000:
            cos = [U[i] @ U[j] for i in range(n) for j in range(i + 1, n)]
        else:
            i, j = rng.randint(0, n, 5000), rng.randint(0, n, 5000)
            cos = [U[a] @ U[b] for a, b in zip(i, j) if a != b]
        m, s, e = np.mean(cos), np.std(cos), 1 / np.sqrt(d)
        su = 0.5 * math.exp(-abs(m) * math.sqrt(d)) + 0.5 * math.exp(-abs(s - e) / e)
    return {"effective_dim": ref_effective_dim(pca), "spherical_uniformity": su,
            "isotropy_score": float(np.exp(np.mean(np.log(pos + 1e-10))) / ev.max())}


def ref_grains(U: np.ndarray) -> dict:
    n, d = U.shape
    k = min(3, n - 1)
    D = cdist(U, U)
    np.fill_diagonal(D, np.inf)
    eps = 1.5 * np.median(np.partition(D, k, axis=1)[:, k])
    eps = eps if np.isfinite(eps) and eps > 0 else 0.5
    labels = DBSCAN(eps=eps, min_samples=3, metric="cosine").fit(U).labels_
    sizes, aspects, dims = [], [], []
    for c in sorted(set(labels) - {-1}):
        rows = U[labels == c]
        m = len(rows)
        sizes.append(m)
        pca = PCA(n_components=min(m - 1, d, 10), svd_solver="full").fit(rows)
        ev = pca.explained_variance_
        aspects.append(math.sqrt(ev[-1] / ev[0]) if len(ev) >= 2 and ev[0] > 0 else 1.0)
        dims.append(ref_effective_dim(pca))
    return {"eps": eps, "num_grains": len(sizes), "grain_coverage": 1 - (labels == -1).sum() / n,
            "mean_grain_size": np.mean(sizes), "mean_aspect_ratio": np.mean(aspects), "mean_local_dim": np.mean(dims)}


def assert_close(ours: dict, ref: dict) -> None:
    for key, want in ref.items():
        got = ours[key]
        if isinstance(want, (int, np.integer)) and not isinstance(want, bool):
            assert got == want, (key, got, want)
        else:
            assert got == pytest.approx(float(want), rel=RTOL, abs=1e-12), (key, got, want)


# --- the spec's known answers ------------------------------------------------------------


def test_isotropic_gaussians_cover_the_space_uniformly():
    body = analyze_geometry(gaussian(2000, 16)).as_json()
    coverage = body["directional_coverage"]
    assert coverage["coverage_quality"] in ("full", "moderate")
    assert coverage["spherical_uniformity"] > 0.9
    assert body["wolf_axiom"]["severity"] in ("none", "mild")
    assert "density_violation" not in body["overall_health"]


def test_a_plane_inside_64_dims_collapses():
    rng = np.random.RandomState(1)
    X = rng.randn(200, 2) @ rng.randn(2, 64)
    body = analyze_geometry(X).as_json()
    assert body["directional_coverage"]["effective_dim"] <= 2
    assert body["directional_coverage"]["coverage_quality"] == "degenerate"
    assert "dimensional_collapse" in body["overall_health"]


def test_three_tight_clusters_are_three_grains():
    body = analyze_geometry(clusters(3, 40, 32, 0.01)).as_json()
    grains = body["grain_analysis"]
    assert grains["num_grains"] == 3
    assert grains["grain_coverage"] > 0.95
    assert grains["mean_grain_size"] == pytest.approx(40, abs=2)
    assert "no_grain_structure" not in body["overall_health"]


def test_a_set_against_itself_plus_tiny_noise_aligns():
    X = gaussian(300, 48)
    noisy = X + 1e-6 * np.random.RandomState(9).randn(*X.shape)
    body = analyze_bilateral(X, noisy).as_json()
    assert body["directional_alignment"] > 0.999
    assert body["subspace_overlap"] > 0.999
    assert body["effective_dim_ratio"] == 1.0


def test_unrelated_sets_do_not_align():
    body = analyze_bilateral(clusters(2, 30, 64, 0.05, seed=1), clusters(2, 30, 64, 0.05, seed=2)).as_json()
    assert body["subspace_overlap"] < 0.5
    assert body["overall_alignment"] < 0.9


# --- the same numbers for the same input and seed -------------------------------------


@pytest.mark.parametrize("n, d", [(150, 24), (120, 300)])
def test_same_input_and_seed_same_numbers(n, d):
    X = clusters(3, n // 3, d, 0.3)
    first, again = analyze_geometry(X, seed=5).as_json(), analyze_geometry(X.copy(), seed=5).as_json()
    assert without_time(first) == without_time(again)
    other = analyze_geometry(X, seed=6).as_json()
    assert other["wolf_axiom"] != first["wolf_axiom"]  # the seed does drive the draws
    Y = X[::-1] + 0.1
    assert without_time(analyze_bilateral(X, Y, seed=2).as_json()) == \
        without_time(analyze_bilateral(X.copy(), Y.copy(), seed=2).as_json())


# --- against the literal spec ----------------------------------------------------------


@pytest.mark.parametrize("n, d", [(150, 24), (60, 300), (7, 5)])
def test_geometry_matches_the_literal_spec(n, d):
    X = clusters(3, n // 3, d, 0.4, seed=n) if n > 10 else gaussian(n, d, seed=3)
    ours = analyze_geometry(X, seed=11)
    rng = np.random.RandomState(11)
    assert_close(ours.as_json()["wolf_axiom"], ref_wolf(X, rng, 50))
    assert_close(ours.as_json()["directional_coverage"], ref_coverage(X, rng))
    grains = ref_grains(unit_rows(X))
    assert dbscan_eps(unit_rows(X)) == pytest.approx(grains.pop("eps"), rel=1e-9)
    if grains["num_grains"]:
        assert_close(vars(ours.grain_analysis), grains)


def test_many_vectors_sample_their_cosine_pairs_as_the_spec_does():
    X = gaussian(400, 12)  # 79,800 pairs > 5,000: sampled
    rng = np.random.RandomState(4)
    wolf_analysis(X, rng, 50)
    ref_rng = np.random.RandomState(4)
    ref_wolf(X, ref_rng, 50)
    assert spherical_uniformity(unit_rows(X), rng) == pytest.approx(
        ref_coverage(X, ref_rng)["spherical_uniformity"], rel=1e-12)


def test_bilateral_matches_the_literal_spec():
    S, R = clusters(3, 30, 40, 0.3, seed=1), clusters(3, 25, 40, 0.3, seed=2) + 0.2
    ours = analyze_bilateral(S, R, seed=3).as_json()
    US, UR = unit_rows(S), unit_rows(R)
    ms, mr = US.mean(0), UR.mean(0)
    assert ours["directional_alignment"] == pytest.approx(
        (ms / (np.linalg.norm(ms) + 1e-10)) @ (mr / (np.linalg.norm(mr) + 1e-10)), rel=1e-12)
    VS = PCA(10, svd_solver="full").fit(US).components_.T
    VR = PCA(10, svd_solver="full").fit(UR).components_.T
    assert ours["subspace_overlap"] == pytest.approx(np.mean(np.linalg.svd(VS.T @ VR)[1] ** 2), rel=RTOL)
    gs, gr = ref_grains(US), ref_grains(UR)
    ga = 0.0
    if gs["num_grains"] and gr["num_grains"]:
        ga = (0.4 * (1 - abs(gs["num_grains"] - gr["num_grains"]) / max(gs["num_grains"], gr["num_grains"]))
              + 0.3 * (1 - abs(gs["grain_coverage"] - gr["grain_coverage"]))
              + 0.3 * (1 - abs(gs["mean_local_dim"] - gr["mean_local_dim"])
                       / max(gs["mean_local_dim"], gr["mean_local_dim"], 1)))
    assert ours["grain_alignment"] == pytest.approx(ga, rel=RTOL, abs=1e-12)
    rng = np.random.RandomState(3)
    ws, wr = ref_wolf(S, rng, 30)["mean_density_ratio"], ref_wolf(R, rng, 30)["mean_density_ratio"]
    assert ours["density_similarity"] == pytest.approx(1 - abs(ws - wr) / max(ws, wr, 1), rel=RTOL)
    ds = ref_effective_dim(PCA(min(len(S) - 1, 40), svd_solver="full").fit(S))
    dr = ref_effective_dim(PCA(min(len(R) - 1, 40), svd_solver="full").fit(R))
    assert ours["effective_dim_ratio"] == min(ds, dr) / max(ds, dr, 1)
    clipped = [min(max(ours[k], 0.0), 1.0) for k in
               ("directional_alignment", "subspace_overlap", "grain_alignment", "density_similarity")]
    assert ours["overall_alignment"] == pytest.approx(
        clipped[0] ** 0.3 * clipped[1] ** 0.3 * clipped[2] ** 0.2 * clipped[3] ** 0.2, rel=1e-12)


@pytest.mark.parametrize("n, d, c", [(80, 500, 10), (300, 20, 10), (50, 50, 7)])
def test_pca_helpers_match_sklearn_full_solver(n, d, c):
    X = gaussian(n, d) * np.linspace(3, 0.5, d)  # distinct variances: a well-defined top subspace
    full = PCA(n_components=min(n - 1, d), svd_solver="full").fit(X)
    variances, ratios = pca_variances(X, min(n - 1, d))
    np.testing.assert_allclose(variances, full.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(ratios, full.explained_variance_ratio_, rtol=1e-9)
    top = PCA(n_components=c, svd_solver="full").fit(X).components_.T
    ours = pca_components(X, c)
    np.testing.assert_allclose(ours.T @ ours, np.eye(c), atol=1e-10)
    np.testing.assert_allclose(ours @ ours.T, top @ top.T, atol=1e-8)  # the same span


# --- pieces with answers by hand ----------------------------------------------------


def test_grain_alignment_formula():
    a = GrainResult(2, 0.8, 10.0, 0.5, 3.0, True)
    b = GrainResult(4, 0.6, 10.0, 0.5, 6.0, True)
    assert grain_alignment(a, b) == pytest.approx(0.4 * 0.5 + 0.3 * 0.8 + 0.3 * 0.5)
    assert grain_alignment(a, GrainResult(0, 0.0, 0.0, 0.0, 0.0, False)) == 0.0


def test_few_or_tiny_sets_keep_the_fallbacks():
    X = gaussian(4, 3)
    body = analyze_geometry(X).as_json()
    assert body["directional_coverage"]["spherical_uniformity"] == 0.5  # n < 10
    assert dbscan_eps(unit_rows(X)) == 0.5  # the (k+1)-th neighbour of 4 rows is the diagonal's infinity
    assert grain_analysis(unit_rows(X)).num_grains in (0, 1)


@pytest.mark.parametrize("X", [np.zeros((6, 5)), np.ones((12, 4)), np.eye(3)], ids=["zeros", "equal", "eye"])
def test_degenerate_sets_give_finite_numbers(X):
    for body in (analyze_geometry(X).as_json(), analyze_bilateral(X, X).as_json()):
        flat = [v for v in body.values() if not isinstance(v, dict)]
        flat += [v for sub in body.values() if isinstance(sub, dict) for v in sub.values()]
        assert all(math.isfinite(v) for v in flat if isinstance(v, float)), body


# --- input checks --------------------------------------------------------------------


@pytest.mark.parametrize("value, words", [
    ([[1.0, 2.0]] * 2, "at least 3 vectors"),
    ([[1.0, 2.0], [3.0], [4.0, 5.0]], "same length"),
    ([[1.0, 2.0], [3.0, float("nan")], [4.0, 5.0]], "NaN or infinity"),
    ([[1.0, 2.0], [3.0, float("inf")], [4.0, 5.0]], "NaN or infinity"),
    ([[1.0, 2.0], [3.0, 4.0], [-1e200, 5.0]], "beyond"),
    ([[1.0, "2"], [3.0, 4.0], [4.0, 5.0]], "list of numbers"),
    ([[1.0, None], [3.0, 4.0], [4.0, 5.0]], "list of numbers"),
    ([[1.0, [2.0]], [3.0, 4.0], [4.0, 5.0]], "list of numbers"),
    ([[]] * 3, "0 dimensions"),
    ([[0.0] * 16_385] * 3, "at most 16384 dimensions"),
    ([[0.0]] * 10_001, "at most 10000 vectors"),
    ({"a": 1}, "list of vectors"),
])
def test_bad_vectors_name_their_field(value, words):
    with pytest.raises(InputError) as caught:
        check_vectors("vectors", value)
    assert caught.value.field == "vectors" and words in caught.value.message


def test_vectors_are_float64_and_dimensions_must_match():
    a = check_vectors("sender_vectors", [[1, 2], [3, 4], [5, 6]])
    assert a.dtype == np.float64 and a.shape == (3, 2)
    b = check_vectors("receiver_vectors", np.ones((4, 3), dtype=np.float32))
    with pytest.raises(InputError) as caught:
        check_same_dims("sender_vectors", a, "receiver_vectors", b)
    assert caught.value.field == "receiver_vectors"
    assert "sender_vectors has 2" in caught.value.message and "receiver_vectors has 3" in caught.value.message
