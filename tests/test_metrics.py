from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.evaluation import metrics as M

# ---------------------------------------------------------------- hand-computed cases


def test_auroc_hand_computed_with_tie():
    # pairs (pos, neg): (0.8,0.1)=1 (0.8,0.4)=1 (0.4,0.1)=1 (0.4,0.4)=0.5 -> 3.5/4
    assert M.auroc([0.8, 0.4, 0.1, 0.4], [1, 1, 0, 0]) == pytest.approx(0.875)


@pytest.mark.parametrize(
    "scores, labels, expected",
    [([1, 2, 3, 4], [0, 0, 1, 1], 1.0), ([4, 3, 2, 1], [0, 0, 1, 1], 0.0),
     ([1, 1, 1, 1], [0, 1, 0, 1], 0.5)],
)
def test_auroc_extremes(scores, labels, expected):
    assert M.auroc(scores, labels) == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1)), min_size=2, max_size=40)
    .filter(lambda xs: len({y for _, y in xs}) == 2)
)
def test_auroc_and_auprc_match_sklearn(pairs):
    s = np.array([a for a, _ in pairs], dtype=float) / 3.0  # coarse grid -> many ties
    y = np.array([b for _, b in pairs])
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auprc_hand_computed():
    # order 0.9(1) 0.8(0) 0.7(1): P=1 at R=.5, P=2/3 at R=1 -> .5 + .5*2/3
    assert M.auprc([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 + 1 / 3)


def test_brier_hand_computed():
    assert M.brier([0.0, 0.5, 1.0], [0, 1, 1]) == pytest.approx(0.25 / 3)


def test_ece_hand_computed():
    # bins (uniform, 2): [0,.5): p=.2,.4 labels 0,1 -> |.5-.3|=.2 ; [.5,1]: p=.9 label 1 -> .1
    assert M.ece([0.2, 0.4, 0.9], [0, 1, 1], n_bins=2) == pytest.approx((2 * 0.2 + 0.1) / 3)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_small_for_calibrated_predictions(strategy):
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    assert M.ece(p, y, n_bins=10, strategy=strategy) < 0.02
    # a miscalibrated version is clearly worse
    assert M.ece(p**3, y, strategy=strategy) > 0.1


def test_reliability_curve_bins():
    mp, frac, counts = M.reliability_curve([0.05, 0.15, 0.95, 1.0], [0, 1, 1, 1], n_bins=10)
    np.testing.assert_allclose(mp, [0.05, 0.15, 0.975])
    np.testing.assert_allclose(frac, [0, 1, 1])
    np.testing.assert_array_equal(counts, [1, 1, 2])


def test_prr_oracle_random_and_reverse():
    q = np.array([0, 1, 0, 1, 1, 0, 1, 1.0])
    assert M.prr(q, q) == pytest.approx(1.0)
    assert M.prr(-q, q) < 0
    # hand check: n=2, q=[0,1]; est rejects q=1 first: curve [.5, 0]; oracle [.5, 1]; rnd .5
    assert M.prr([1.0, 0.0], [0.0, 1.0]) == pytest.approx(-1.0)
    rng = np.random.default_rng(1)
    qq = rng.integers(0, 2, 5000).astype(float)
    assert abs(M.prr(rng.uniform(size=5000), qq)) < 0.1


# ---------------------------------------------------------------- routing curves


def test_quality_vs_cloud_fraction_hand_computed_and_ties():
    p = [0.9, 0.1, 0.5, 0.1]
    edge = [1, 0, 1, 1]
    cloud = [1, 1, 0, 0]
    f, q = M.quality_vs_cloud_fraction(p, edge, cloud)
    np.testing.assert_allclose(f, [0, 0.25, 0.5, 0.75, 1.0])
    # escalation order: idx1 (+1), idx3 (-1, tie with idx1 broken by position), idx2 (-1), idx0
    np.testing.assert_allclose(q, [0.75, 1.0, 0.75, 0.5, 0.5])


def test_oracle_and_random_curves():
    edge = np.array([1, 0, 1, 0.0])
    cloud = np.array([0, 1, 1, 1.0])
    _f, q = M.oracle_curve(edge, cloud)
    np.testing.assert_allclose(q, [0.5, 0.75, 1.0, 1.0, 0.75])
    fr, qr = M.random_curve(edge, cloud)
    np.testing.assert_allclose(qr, 0.5 + fr * 0.25)
    # the oracle dominates any confidence ordering
    rng = np.random.default_rng(3)
    for _ in range(20):
        _, qc = M.quality_vs_cloud_fraction(rng.uniform(size=4), edge, cloud)
        assert np.all(qc <= q + 1e-12)


def _cpt_reference(f, q, w, s, x):
    """Straightforward re-derivation: walk segments, first crossing, linear interpolation."""
    target = w + x / 100.0 * (s - w)
    up = s > w
    for i in range(len(f)):
        gap_left = (target - q[i]) if up else (q[i] - target)
        if gap_left <= 1e-12:  # reached (up to rounding)
            if i == 0 or abs(gap_left) <= 1e-12:
                return f[i]
            q0, q1 = q[i - 1], q[i]
            return f[i - 1] + (f[i] - f[i - 1]) * (target - q0) / (q1 - q0)
    return math.nan


def _apgr_reference(f, q, w, s):
    total = 0.0
    for i in range(1, len(f)):
        a = (q[i - 1] - w) / (s - w)
        b = (q[i] - w) / (s - w)
        total += (f[i] - f[i - 1]) * (a + b) / 2.0
    return total


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("x", [20.0, 50.0, 80.0, 100.0])
def test_cpt_apgr_match_reference(seed, x):
    rng = np.random.default_rng(seed)
    n = 30
    edge = rng.integers(0, 2, n).astype(float)
    cloud = np.clip(edge + rng.integers(0, 2, n), 0, 1).astype(float)
    if seed % 2:  # graded qualities sometimes
        edge, cloud = edge * rng.uniform(0.5, 1, n), cloud * rng.uniform(0.5, 1, n)
    f, q = M.quality_vs_cloud_fraction(rng.uniform(size=n), edge, cloud)
    w, s = float(edge.mean()), float(cloud.mean())
    if w == s:
        pytest.skip("degenerate draw")
    got = M.cpt(f, q, w, s, x)
    ref = _cpt_reference(f, q, w, s, x)
    assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, abs=1e-9)
    assert M.apgr(f, q, w, s) == pytest.approx(_apgr_reference(f, q, w, s), abs=1e-9)


def test_cpt_apgr_hand_computed_and_random_is_half():
    f = np.array([0, 0.5, 1.0])
    q = np.array([0.2, 0.6, 0.6])
    assert M.cpt(f, q, 0.2, 0.6, 50) == pytest.approx(0.25)
    assert M.cpt(f, q, 0.2, 0.6, 100) == pytest.approx(0.5)
    assert M.apgr(f, q, 0.2, 0.6) == pytest.approx(0.75)
    fr, qr = M.random_curve([0, 1, 0, 0], [1, 1, 1, 0])
    assert M.apgr(fr, qr, 0.25, 0.75) == pytest.approx(0.5)
    assert math.isnan(M.cpt(f, np.array([0.2, 0.3, 0.4]), 0.2, 0.6, 90))


def test_quality_at_budget_interpolates():
    f = np.array([0, 0.5, 1.0])
    q = np.array([0.2, 0.6, 0.7])
    assert M.quality_at_budget(f, q, 0.25) == pytest.approx(0.4)
    assert M.quality_at_budget(f, q, 1.0) == pytest.approx(0.7)


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(scale=1.0, size=200)
    est, lo, hi = M.bootstrap_ci(M.auroc, s, y, n_boot=200, seed=1)
    assert lo <= est <= hi and hi - lo < 0.3
    assert M.bootstrap_ci(M.auroc, s, y, n_boot=200, seed=1) == (est, lo, hi)
    assert M.bootstrap_ci(np.mean, y, n_boot=50, seed=2)[1] <= y.mean()


# ---------------------------------------------------------------- typed errors


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: M.auroc([0.1, 0.2], [1, 1]), InvalidParameterError, "'labels'.*both classes"),
        (lambda: M.auroc([0.1, 0.2], [1, 2]), InvalidParameterError, "'labels'"),
        (lambda: M.auroc([0.1, np.nan], [1, 0]), InvalidParameterError, "'scores'"),
        (lambda: M.auroc([0.1, 0.2, 0.3], [1, 0]), InvalidParameterError, "same length"),
        (lambda: M.auprc([0.1, 0.2], [0, 0]), InvalidParameterError, "'labels'.*positive"),
        (lambda: M.ece([1.5, 0.2], [1, 0]), InvalidParameterError, "'p'.*\\[0, 1\\]"),
        (lambda: M.ece([0.5], [1], strategy="kmeans"), InvalidParameterError, "'strategy'"),
        (lambda: M.ece([0.5], [1], n_bins=0), InvalidParameterError, "'n_bins'"),
        (lambda: M.brier(["a"], [1]), InvalidTypeError, "'p'"),
        (lambda: M.prr([0.1, 0.2], [1, 1]), InvalidParameterError, "'quality'"),
        (lambda: M.cpt([0, 1], [0.5, 0.5], 0.5, 0.5, 50), InvalidParameterError, "'q_strong'"),
        (lambda: M.apgr([0, 1], [0.2, 0.4], 0.3, 0.3), InvalidParameterError, "'q_strong'"),
        (lambda: M.cpt([0, 1], [0.2, 0.4], 0.2, 0.4, 0), InvalidParameterError, "'x'"),
        (lambda: M.cpt([1, 0], [0.2, 0.4], 0.2, 0.4, 50), InvalidParameterError, "'fractions'"),
        (lambda: M.apgr([0, 0.5], [0.2, 0.4], 0.2, 0.4), InvalidParameterError, "'fractions'"),
        (lambda: M.quality_at_budget([0, 1], [0, 1], 1.2), InvalidParameterError, "'budget'"),
        (lambda: M.bootstrap_ci(M.auroc, [0.1], [1], alpha=1.0), InvalidParameterError,
         "'alpha'"),
        (lambda: M.bootstrap_ci("auroc", [0.1]), InvalidTypeError, "'metric_fn'"),
        (lambda: M.bootstrap_ci(M.auroc, [0.1, 0.9, 0.5], [1, 0, 0], n_boot=20),
         InvalidParameterError, "undefined"),
    ],
)
def test_bad_inputs_raise_typed_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------- figures do not move
# The hand-written formulas these metrics used before delegating to scikit-learn.


def _old_auroc(s: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(s, method="average")
    n1 = int(y.sum())
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * (len(y) - n1)))


def _old_auprc(s: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[ends].astype(float)
    precision = tp / (ends + 1)
    return float(np.sum(np.diff(np.r_[0.0, tp / y.sum()]) * precision))


@pytest.mark.parametrize("seed", range(8))
def test_sklearn_backed_metrics_equal_the_old_formulas(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    s = np.round(rng.normal(size=n), 1)  # rounding makes ties
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    y[:2] = [0, 1]
    p = rng.random(n)
    assert M.auroc(s, y) == pytest.approx(_old_auroc(s, y), abs=1e-12)
    assert M.auprc(s, y) == pytest.approx(_old_auprc(s, y), abs=1e-12)
    assert M.brier(p, y) == pytest.approx(float(np.mean((p - y) ** 2)), abs=1e-12)
    assert M.brier(p, np.zeros(n, dtype=int)) == pytest.approx(float(np.mean(p**2)), abs=1e-12)
