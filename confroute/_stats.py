"""Shared statistics: exact binomial intervals, bootstrap intervals, budget allowance, id split.

Private to the package: the one place where the library's recurring maths is
written, each piece backed by scipy where scipy has it.

* :func:`clopper_pearson` / :func:`clopper_pearson_upper`: exact binomial
  confidence limits [1]_ (``scipy.stats.binomtest(...).proportion_ci(method="exact")``).
* :func:`bootstrap_ci`: paired bootstrap interval of a statistic
  (``scipy.stats.bootstrap``), percentile [2]_ by default, BCa [3]_ on request.
* :func:`exact_fraction` and :func:`budget_allowance`: :math:`\\lfloor b n \\rfloor`
  in exact rational arithmetic, with :math:`b` the decimal the user wrote.
* :func:`id_split`: the seeded, order-independent split by a hash of each id.

References
----------
.. [1] C. J. Clopper, E. S. Pearson, "The use of confidence or fiducial limits
   illustrated in the case of the binomial", Biometrika 26(4), 1934.
.. [2] B. Efron, R. Tibshirani, "An Introduction to the Bootstrap", 1993.
.. [3] B. Efron, "Better bootstrap confidence intervals", JASA 82(397), 1987.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from confroute._validation import check_choice, check_float, check_int, param_error
from confroute.errors import InvalidParameterError

__all__ = [
    "bootstrap_ci",
    "budget_allowance",
    "clopper_pearson",
    "clopper_pearson_upper",
    "exact_fraction",
    "id_split",
    "unit_hash",
]


def _check_counts(k: Any, n: Any, confidence: Any, owner: str) -> tuple[int, int, float]:
    nv = check_int(n, "n", owner, min_value=1)
    kv = check_int(k, "k", owner, min_value=0, max_value=nv)
    cv = check_float(confidence, "confidence", owner, min_value=0.0, max_value=1.0,
                     min_inclusive=False, max_inclusive=False)
    return kv, nv, cv


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    r"""Two-sided Clopper–Pearson (exact) interval for a binomial proportion.

    .. math::

        \text{lo} = B^{-1}\!\left(\tfrac{1-c}{2};\, k,\, n - k + 1\right), \qquad
        \text{hi} = B^{-1}\!\left(\tfrac{1+c}{2};\, k + 1,\, n - k\right)

    with :math:`B^{-1}` the Beta quantile, lo = 0 when k = 0 and hi = 1 when
    k = n. Computed by ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``.

    Parameters
    ----------
    k : int in [0, n]
        Successes.
    n : int >= 1
        Trials.
    confidence : float in (0, 1), default 0.95

    Returns
    -------
    (low, high) : tuple of float
    """
    from scipy.stats import binomtest

    kv, nv, cv = _check_counts(k, n, confidence, "clopper_pearson")
    ci = binomtest(kv, nv).proportion_ci(confidence_level=cv, method="exact")
    return float(ci.low), float(ci.high)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    r"""One-sided Clopper–Pearson upper limit :math:`B^{-1}(c;\, k + 1,\, n - k)` (1 if k = n).

    The probability that the true proportion exceeds the limit is at most
    :math:`1 - c`. Computed by ``scipy.stats.binomtest(k, n,
    alternative="less").proportion_ci(method="exact")``.

    Parameters
    ----------
    k : int in [0, n]
    n : int >= 1
    confidence : float in (0, 1), default 0.95

    Returns
    -------
    float in (0, 1]
    """
    from scipy.stats import binomtest

    kv, nv, cv = _check_counts(k, n, confidence, "clopper_pearson_upper")
    ci = binomtest(kv, nv, alternative="less").proportion_ci(confidence_level=cv,
                                                             method="exact")
    return float(ci.high)


def exact_fraction(x: float | Fraction) -> Fraction:
    """The decimal the user wrote (0.29 -> 29/100), not its binary approximation.

    Parameters
    ----------
    x : float or Fraction
        A finite number; a Fraction is returned unchanged.

    Returns
    -------
    Fraction
    """
    if isinstance(x, Fraction):
        return x
    v = check_float(x, "x", "exact_fraction")
    return Fraction(repr(v))


def budget_allowance(budget: float | Fraction, n: int) -> int:
    r"""How many of ``n`` requests a budget share allows: :math:`\lfloor b n \rfloor`, exactly.

    ``budget`` is read as the decimal it was written as (:func:`exact_fraction`),
    so ``budget_allowance(0.29, 100) == 29`` although ``0.29 * 100 < 29`` in
    binary floating point.

    Parameters
    ----------
    budget : float in [0, 1] or Fraction
    n : int >= 0

    Returns
    -------
    int in [0, n]
    """
    owner = "budget_allowance"
    if not isinstance(budget, Fraction):
        check_float(budget, "budget", owner, min_value=0.0, max_value=1.0)
    b = exact_fraction(budget)
    if not 0 <= b <= 1:
        raise param_error("budget", owner, "a float in [0, 1]", float(b))
    nv = check_int(n, "n", owner, min_value=0)
    return (b.numerator * nv) // b.denominator


def unit_hash(seed: int, key: str) -> float:
    """``sha256(seed, key)`` mapped to [0, 1): the first 8 bytes over 2**64."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def id_split(ids: Sequence[Any], fraction: float, seed: int = 0, *, owner: str = "id_split"
             ) -> np.ndarray:
    """Seeded split by id hash: True for ids with ``unit_hash(seed, str(id)) < fraction``.

    Membership depends only on the seed and the id, not on the order or on the
    other ids, so adding rows never moves existing ones across the split.

    Parameters
    ----------
    ids : sequence of shape (n,)
        Identifiers (formatted with ``str``).
    fraction : float in [0, 1]
        Expected share of True.
    seed : int >= 0
    owner : str
        Who asks, for error messages.

    Returns
    -------
    mask : ndarray of bool, shape (n,)
    """
    frac = check_float(fraction, "fraction", owner, min_value=0.0, max_value=1.0)
    s = check_int(seed, "seed", owner, min_value=0)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise param_error("ids", owner, "a sequence of ids", ids, type_error=True)
    return np.array([unit_hash(s, f"{i}") < frac for i in ids], dtype=bool)


class _Undefined:
    """Wraps a statistic: NaN where it is undefined, counting failures and keeping the last."""

    def __init__(self, statistic: Callable[..., float], arrays: Sequence[np.ndarray]) -> None:
        self.statistic = statistic
        self.arrays = arrays
        self.failures = 0
        self.last_error: InvalidParameterError | None = None

    def __call__(self, idx: np.ndarray) -> float:
        try:
            return float(self.statistic(*(x[idx] for x in self.arrays)))
        except InvalidParameterError as err:
            self.failures += 1
            self.last_error = err
            return math.nan


def _check_bootstrap(statistic: Any, data: Sequence[Any], n_resamples: Any, seed: Any,
                     confidence: Any, method: Any) -> tuple[list[np.ndarray], int, int, float, str]:
    owner = "bootstrap_ci"
    if not callable(statistic):
        raise param_error("statistic", owner, "a callable", statistic, type_error=True)
    if not data:
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must hold at least one array. Got none.")
    nr = check_int(n_resamples, "n_resamples", owner, min_value=1)
    sd = check_int(seed, "seed", owner, min_value=0)
    cl = check_float(confidence, "confidence", owner, min_value=0.0, max_value=1.0,
                     min_inclusive=False, max_inclusive=False)
    m = check_choice(method, "method", owner, ("percentile", "BCa"))
    arrs = [np.asarray(x) for x in data]
    lengths = {len(x) for x in arrs}
    if len(lengths) > 1:
        raise InvalidParameterError(
            f"The inputs of {owner} must have the same length. Got lengths {sorted(lengths)}.")
    return arrs, nr, sd, cl, m


def bootstrap_ci(
    statistic: Callable[..., float],
    *data: Any,
    method: str = "percentile",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    r"""Paired bootstrap confidence interval of a statistic, via ``scipy.stats.bootstrap``.

    The rows of all ``data`` arrays are resampled jointly with replacement
    ``n_resamples`` times from ``numpy.random.default_rng(seed)``.

    * ``"percentile"`` (default): the :math:`(\alpha/2, 1-\alpha/2)` quantiles
      (linear interpolation) of the resampled statistic, :math:`\alpha = 1 - c`.
      Resamples on which the statistic is undefined (it raises
      :class:`~confroute.errors.InvalidParameterError`, e.g. one class for AUROC)
      are skipped; if more than half are, the error is raised.
    * ``"BCa"``: bias-corrected and accelerated interval (scipy's); it needs the
      statistic defined on every resample and jackknife sample, else NaN bounds.

    Parameters
    ----------
    statistic : callable
        ``statistic(*arrays) -> float``.
    *data : array-like of shape (n, ...)
        Same first dimension.
    method : {"percentile", "BCa"}, default "percentile"
    n_resamples : int >= 1, default 1000
    seed : int >= 0, default 0
    confidence : float in (0, 1), default 0.95

    Returns
    -------
    (estimate, low, high) : tuple of float
        The statistic on the full data and the interval bounds.
    """
    from scipy.stats import bootstrap

    arrs, nr, sd, cl, m = _check_bootstrap(statistic, data, n_resamples, seed, confidence,
                                           method)
    estimate = float(statistic(*arrs))
    if len(arrs[0]) < 2:  # every resample is the data itself
        return estimate, estimate, estimate
    stat = _Undefined(statistic, arrs)
    # resample row indices (one sample), so arrays of any trailing shape stay paired
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap((np.arange(len(arrs[0])),), stat, n_resamples=nr, vectorized=False,
                        confidence_level=cl, method=m, rng=np.random.default_rng(sd))
    if m == "BCa":
        return estimate, float(res.confidence_interval.low), float(res.confidence_interval.high)
    values = np.asarray(res.bootstrap_distribution, dtype=float)
    failures = int(np.isnan(values).sum())
    if failures * 2 > nr:
        raise InvalidParameterError(
            f"The statistic of bootstrap_ci was undefined on {failures} of {nr} resamples; "
            f"last error: {stat.last_error}")
    alpha = 1.0 - cl
    lo, hi = np.quantile(values[~np.isnan(values)], [alpha / 2.0, 1.0 - alpha / 2.0])
    return estimate, float(lo), float(hi)
