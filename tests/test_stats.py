"""confroute._stats against the hand-written maths it replaced (kept here as references)."""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta

from confroute._stats import (
    bootstrap_ci,
    budget_allowance,
    clopper_pearson,
    clopper_pearson_upper,
    exact_fraction,
    id_split,
    unit_hash,
)
from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.evaluation import metrics as M
from confroute.evaluation.datasets import Example, split
from confroute.predictive.routers import threshold_for_cloud_share

# ---------------------------------------------------------------- references (old code)


def ref_clopper_pearson(k: int, n: int, c: float) -> tuple[float, float]:
    a = 1.0 - c
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def ref_bootstrap(fn, *arrays, n_boot: int, seed: int, alpha: float = 0.05):
    arrs = [np.asarray(x) for x in arrays]
    n = len(arrs[0])
    rng = np.random.default_rng(seed)
    values = []
    failures = 0
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            values.append(float(fn(*(x[idx] for x in arrs))))
        except InvalidParameterError:
            failures += 1
    if failures * 2 > n_boot:
        raise InvalidParameterError("undefined")
    lo, hi = np.quantile(np.asarray(values), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(fn(*arrs)), float(lo), float(hi)


def ref_unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# ---------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (17, 250),
                                  (250, 250), (1, 1000)])
@pytest.mark.parametrize("c", [0.8, 0.95, 0.99])
def test_clopper_pearson_matches_beta_quantiles(k, n, c):
    lo, hi = clopper_pearson(k, n, c)
    rlo, rhi = ref_clopper_pearson(k, n, c)
    assert lo == pytest.approx(rlo, rel=1e-7, abs=1e-12)
    assert hi == pytest.approx(rhi, rel=1e-7, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    upper = clopper_pearson_upper(k, n, c)
    assert upper == pytest.approx(1.0 if k == n else beta.ppf(c, k + 1, n - k), rel=1e-7)


def test_threshold_for_cloud_share_uses_the_exact_interval_and_allowance():
    s = np.linspace(0.0, 1.0, 10)
    thr, (lo, hi) = threshold_for_cloud_share(s, 0.3)
    assert (s > thr).sum() == 3  # floor(0.3 * 10) = 3 exactly
    assert (lo, hi) == pytest.approx(ref_clopper_pearson(3, 10, 0.95), rel=1e-7)


# ---------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("n", [5, 20, 51])
@pytest.mark.parametrize("seed", [0, 3])
def test_percentile_bootstrap_reproduces_the_old_loop(n, seed):
    rng = np.random.default_rng(100 + n)
    s = rng.normal(size=n)
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = [0, 1]
    got = bootstrap_ci(M.auroc, s, y, n_resamples=200, seed=seed)  # some resamples fail
    ref = ref_bootstrap(M.auroc, s, y, n_boot=200, seed=seed)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert bootstrap_ci(np.mean, y, n_resamples=99, seed=seed, confidence=0.9) == \
        pytest.approx(ref_bootstrap(np.mean, y, n_boot=99, seed=seed, alpha=0.1), abs=1e-12)
    assert M.bootstrap_ci(M.auroc, s, y, n_boot=200, seed=seed) == got


def test_bca_is_offered_and_brackets_the_estimate():
    x = np.random.default_rng(0).exponential(size=60)
    est, lo, hi = bootstrap_ci(np.mean, x, method="BCa", n_resamples=500, seed=1)
    p_est, p_lo, p_hi = bootstrap_ci(np.mean, x, n_resamples=500, seed=1)
    assert est == p_est and lo < est < hi
    assert (lo, hi) != (p_lo, p_hi)


def test_bootstrap_of_one_row_is_the_row_and_mostly_undefined_raises():
    assert bootstrap_ci(np.mean, [3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(InvalidParameterError, match=r"undefined on .* resamples"):
        bootstrap_ci(M.auroc, [0.1, 0.9, 0.5], [1, 0, 0], n_resamples=20)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: bootstrap_ci("mean", [1.0, 2.0]), InvalidTypeError, "'statistic'"),
        (lambda: bootstrap_ci(np.mean), InvalidParameterError, "'data'"),
        (lambda: bootstrap_ci(np.mean, [1.0, 2.0], method="bca"), InvalidParameterError,
         "'method'.*'BCa'"),
        (lambda: bootstrap_ci(np.mean, [1.0, 2.0], n_resamples=0), InvalidParameterError,
         "'n_resamples'"),
        (lambda: bootstrap_ci(np.mean, [1.0, 2.0], confidence=1.0), InvalidParameterError,
         "'confidence'"),
        (lambda: bootstrap_ci(np.mean, [1.0, 2.0], [1.0]), InvalidParameterError,
         "same length"),
        (lambda: clopper_pearson(4, 3), InvalidParameterError, "'k' parameter of clopper"),
        (lambda: clopper_pearson(0, 0), InvalidParameterError, "'n'"),
        (lambda: clopper_pearson_upper(1, 3, confidence=0.0), InvalidParameterError,
         "'confidence'"),
        (lambda: budget_allowance(1.5, 10), InvalidParameterError, "'budget'.*1.5"),
        (lambda: budget_allowance(0.5, -1), InvalidParameterError, "'n'"),
        (lambda: exact_fraction("0.3"), InvalidTypeError, "'x'"),
        (lambda: id_split("abc", 0.5, 0), InvalidTypeError, "'ids'"),
        (lambda: id_split(["a"], 1.5, 0), InvalidParameterError, "'fraction'"),
        (lambda: split([], 0.5, seed=-1), InvalidParameterError, "'seed' parameter of split"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------- budget allowance


def test_exact_fraction_reads_the_written_decimal():
    assert exact_fraction(0.29) == Fraction(29, 100)
    assert exact_fraction(Fraction(1, 3)) == Fraction(1, 3)
    assert budget_allowance(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert budget_allowance(0.3, 10) == 3
    assert budget_allowance(Fraction(1, 3), 7) == 2
    assert budget_allowance(0.0, 5) == 0 and budget_allowance(1.0, 5) == 5


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 10_000))
def test_allowance_is_floor_of_the_decimal_budget(per_mille, n):
    b = per_mille / 1000
    k = budget_allowance(b, n)
    assert k == math.floor(Fraction(per_mille, 1000) * n)
    assert 0 <= k <= n and Fraction(k) <= Fraction(per_mille, 1000) * n


# ---------------------------------------------------------------- id split


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=30),
       st.floats(0.0, 1.0), st.integers(0, 5))
def test_id_split_is_the_published_hash_split(ids, fraction, seed):
    mask = id_split(ids, fraction, seed)
    assert mask.dtype == bool and mask.shape == (len(ids),)
    assert mask.tolist() == [ref_unit_hash(seed, i) < fraction for i in ids]
    assert id_split(ids[::-1], fraction, seed).tolist() == mask.tolist()[::-1]
    assert all(unit_hash(seed, i) == ref_unit_hash(seed, i) for i in ids)
    examples = [Example(id=i, prompt="p", gold=("a",), kind="short") for i in ids]
    dev, test = split(examples, fraction, seed)
    assert [e.id for e in dev] == [i for i, m in zip(ids, mask) if m]
    assert [e.id for e in test] == [i for i, m in zip(ids, mask) if not m]


def test_id_split_extremes():
    ids = [f"q{i}" for i in range(50)]
    assert not id_split(ids, 0.0).any() and id_split(ids, 1.0).all()
    assert 10 < id_split(ids, 0.5, 7).sum() < 40
