"""Metrics for confidence estimators and routers.

AUROC, AUPRC and the Brier score are scikit-learn's (``sklearn.metrics``);
the bootstrap is scipy's (through :func:`confroute._stats.bootstrap_ci`); the
routing-specific metrics (PRR, ECE and its reliability bins, routing curves,
CPT, APGR) are written here.

Sign convention: every function here takes **confidences** ``p_good`` (higher =
the edge answer is more likely good), the opposite of the estimator scores
(higher = more uncertain). Pass ``-score`` or a calibrated ``p_good``.

Two families:

* *Discrimination / calibration* of ``p_good`` against binary labels
  (label 1 = the edge answer is good): :func:`auroc`, :func:`auprc`,
  :func:`ece`, :func:`brier`, :func:`reliability_curve`, and :func:`prr`
  against a graded quality.
* *Routing curves*: mean quality as a function of the fraction of queries sent
  to the cloud (:func:`quality_vs_cloud_fraction`, :func:`oracle_curve`,
  :func:`random_curve`) and their summaries :func:`cpt`, :func:`apgr`,
  :func:`quality_at_budget`, as in RouteLLM (Ong et al., 2024).

References
----------
.. [1] Malinin, A., Gales, M. "Uncertainty Estimation in Autoregressive
   Structured Prediction." ICLR 2021 (prediction-rejection ratio).
.. [2] Naeini, M. P., Cooper, G., Hauskrecht, M. "Obtaining Well Calibrated
   Probabilities Using Bayesian Binning." AAAI 2015 (ECE).
.. [3] Ong, I., et al. "RouteLLM: Learning to Route LLMs with Preference Data."
   arXiv:2406.18665, 2024 (CPT, APGR).
.. [4] Efron, B., Tibshirani, R. "An Introduction to the Bootstrap." 1993.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from confroute._stats import bootstrap_ci as stats_bootstrap_ci
from confroute._validation import (
    check_array,
    check_choice,
    check_float,
    check_int,
    check_labels,
    check_same_length,
)
from confroute.errors import InvalidParameterError

__all__ = [
    "apgr",
    "auprc",
    "auroc",
    "bootstrap_ci",
    "brier",
    "cpt",
    "ece",
    "oracle_curve",
    "pgr",
    "prr",
    "quality_at_budget",
    "quality_vs_cloud_fraction",
    "random_curve",
    "reliability_curve",
]


def _scores_labels(scores: Any, labels: Any, owner: str, name: str = "scores"
                   ) -> tuple[np.ndarray, np.ndarray]:
    s = check_array(scores, name, owner)
    y = check_labels(labels, "labels", owner, require_both=False)
    check_same_length(owner, **{name: s, "labels": y})
    return s, y


def _require_both_classes(y: np.ndarray, owner: str) -> None:
    if y.min() == y.max():
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must contain both classes (0 and 1); the "
            f"metric is undefined otherwise. Got only class {int(y[0])} in {len(y)} labels."
        )


def _probabilities(p: Any, owner: str) -> np.ndarray:
    arr = check_array(p, "p", owner)
    if arr.min() < 0.0 or arr.max() > 1.0:
        bad = arr[(arr < 0.0) | (arr > 1.0)][0]
        raise InvalidParameterError(
            f"The 'p' parameter of {owner} must contain probabilities in [0, 1]. Got {bad!r}."
        )
    return arr


def auroc(scores: Any, labels: Any) -> float:
    r"""Area under the ROC curve of ``scores`` for separating good from bad answers.

    Convention: a **higher score means the positive class is more likely**
    (label 1 = the edge answer is good), so pass confidences, not uncertainties.
    Computed exactly with the Mann-Whitney statistic, ties receiving average ranks
    (a tie between a positive and a negative counts 1/2):

    .. math::

        \mathrm{AUROC} = \frac{\sum_{i: y_i=1} R_i - n_1 (n_1 + 1)/2}{n_1 n_0}

    where :math:`R_i` is the (average) rank of :math:`s_i` among all scores
    (``sklearn.metrics.roc_auc_score``, the same area).

    Parameters
    ----------
    scores : array-like of shape (n,)
    labels : array-like of shape (n,)
        0/1 labels; both classes must occur.

    Returns
    -------
    float in [0, 1]; 0.5 is chance.
    """
    from sklearn.metrics import roc_auc_score

    s, y = _scores_labels(scores, labels, "auroc")
    _require_both_classes(y, "auroc")
    return float(roc_auc_score(y, s))


def auprc(scores: Any, labels: Any) -> float:
    r"""Area under the precision-recall curve (average precision), positives = label 1.

    Step-wise, without interpolation: thresholds are the distinct scores in
    decreasing order (tied scores enter together),

    .. math::

        \mathrm{AP} = \sum_k (R_k - R_{k-1})\, P_k

    with precision :math:`P_k` and recall :math:`R_k` at the k-th threshold,
    :math:`R_0 = 0` (scikit-learn's ``average_precision_score``).

    Parameters
    ----------
    scores : array-like of shape (n,)
        Higher = more likely positive.
    labels : array-like of shape (n,)
        0/1 labels with at least one positive.

    Returns
    -------
    float in [0, 1]; chance level is the positive rate.
    """
    s, y = _scores_labels(scores, labels, "auprc")
    if y.sum() == 0:
        raise InvalidParameterError(
            "The 'labels' parameter of auprc must contain at least one positive (1) label. "
            f"Got {len(y)} negatives."
        )
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


def _retained_mean_curve(order: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Mean quality of the kept items after rejecting the first k of ``order``, k=0..n-1."""
    q = quality[order]
    tail_sums = np.cumsum(q[::-1])[::-1]  # sum of q[k:]
    kept = np.arange(len(q), 0, -1)
    return tail_sums / kept


def prr(p_good: Any, quality: Any) -> float:
    r"""Prediction-rejection ratio (Malinin & Gales, 2021) of a confidence.

    Reject the fraction :math:`r = k/n` (k = 0..n-1) of inputs with the lowest
    ``p_good`` and measure the mean quality :math:`Q(r)` of the retained ones.
    With :math:`Q_{rnd}` the constant mean quality of random rejection and
    :math:`Q_{orc}` the curve that rejects the lowest quality first,

    .. math::

        \mathrm{PRR} = \frac{\int (Q_{est}(r) - Q_{rnd})\,dr}
                            {\int (Q_{orc}(r) - Q_{rnd})\,dr}

    (areas as means over the n rejection levels). 1 is oracle, 0 is random,
    negative is worse than random. Tied confidences are rejected in input order
    (stable sort); shuffle the inputs if that matters. This is the retained-mean
    form used by LM-Polygraph (Fadeeva et al., 2023).

    Parameters
    ----------
    p_good : array-like of shape (n,)
        Confidence (higher = better answer expected).
    quality : array-like of shape (n,)
        Quality of each answer (e.g. 0/1 correctness or a judge score).

    Raises
    ------
    InvalidParameterError
        If all qualities are equal (the oracle is no better than random).
    """
    p = check_array(p_good, "p_good", "prr")
    q = check_array(quality, "quality", "prr")
    check_same_length("prr", p_good=p, quality=q)
    est = _retained_mean_curve(np.argsort(p, kind="stable"), q)
    orc = _retained_mean_curve(np.argsort(q, kind="stable"), q)
    rnd = q.mean()
    denom = float(np.mean(orc - rnd))
    if denom <= 0.0:
        raise InvalidParameterError(
            "The 'quality' parameter of prr must vary across inputs; with all qualities "
            "equal the oracle and random rejection coincide and PRR is undefined."
        )
    return float(np.mean(est - rnd) / denom)


def _bin_ids(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
        edges[0], edges[-1] = 0.0, 1.0
        if len(edges) < 2:
            edges = np.array([0.0, 1.0])
    # bins are [e_i, e_{i+1}) except the last, which includes 1.0
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)


def reliability_curve(
    p: Any, labels: Any, n_bins: int = 10, strategy: str = "uniform"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram data: per non-empty bin, mean confidence and accuracy.

    Bins are ``[e_i, e_{i+1})``, the last one closed. Not
    ``sklearn.calibration.calibration_curve``: that puts a value lying on an
    edge in the lower bin, stretches quantile edges to the data's range instead
    of [0, 1] and returns no counts, which :func:`ece` needs; keeping this
    binning keeps published ECE figures.

    Parameters
    ----------
    p : array-like of shape (n,)
        Predicted P(good) in [0, 1].
    labels : array-like of shape (n,)
        0/1 labels.
    n_bins : int, default 10
    strategy : {"uniform", "quantile"}
        Equal-width bins on [0, 1], or bins holding about the same number of points.

    Returns
    -------
    mean_p : ndarray of shape (n_nonempty_bins,)
    frac_good : ndarray of shape (n_nonempty_bins,)
    counts : ndarray of shape (n_nonempty_bins,)
    """
    owner = "reliability_curve"
    arr = _probabilities(p, owner)
    y = check_labels(labels, "labels", owner, require_both=False)
    check_same_length(owner, p=arr, labels=y)
    n_bins = int(check_int(n_bins, "n_bins", owner, min_value=1) or 1)
    strategy = check_choice(strategy, "strategy", owner, ("uniform", "quantile"))
    ids = _bin_ids(arr, n_bins, strategy)
    nb = int(ids.max()) + 1
    counts = np.bincount(ids, minlength=nb)
    sum_p = np.bincount(ids, weights=arr, minlength=nb)
    sum_y = np.bincount(ids, weights=y.astype(float), minlength=nb)
    keep = counts > 0
    return sum_p[keep] / counts[keep], sum_y[keep] / counts[keep], counts[keep]


def ece(p: Any, labels: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    r"""Expected calibration error (Naeini et al., 2015).

    .. math::

        \mathrm{ECE} = \sum_{b=1}^{B} \frac{n_b}{n}\,
                       \bigl|\bar{y}_b - \bar{p}_b\bigr|

    over the bins of :func:`reliability_curve` (``strategy`` "uniform" or
    "quantile").

    Parameters
    ----------
    p : array-like of shape (n,)
        Predicted P(good) in [0, 1].
    labels : array-like of shape (n,)
    n_bins : int, default 10
    strategy : {"uniform", "quantile"}

    Returns
    -------
    float in [0, 1]
    """
    mean_p, frac, counts = reliability_curve(p, labels, n_bins=n_bins, strategy=strategy)
    return float(np.sum(counts * np.abs(frac - mean_p)) / counts.sum())


def brier(p: Any, labels: Any) -> float:
    r"""Brier score :math:`\frac{1}{n}\sum_i (p_i - y_i)^2` (lower is better).

    ``sklearn.metrics.brier_score_loss`` with label 1 the positive class.

    Parameters
    ----------
    p : array-like of shape (n,)
        Predicted P(good) in [0, 1].
    labels : array-like of shape (n,)
    """
    from sklearn.metrics import brier_score_loss

    arr = _probabilities(p, "brier")
    y = check_labels(labels, "labels", "brier", require_both=False)
    check_same_length("brier", p=arr, labels=y)
    return float(brier_score_loss(y, arr, labels=[0, 1], pos_label=1))


# ---------------------------------------------------------------- routing curves


def _qualities(edge_quality: Any, cloud_quality: Any, owner: str
               ) -> tuple[np.ndarray, np.ndarray]:
    e = check_array(edge_quality, "edge_quality", owner)
    c = check_array(cloud_quality, "cloud_quality", owner)
    check_same_length(owner, edge_quality=e, cloud_quality=c)
    return e, c


def _curve_from_order(order: np.ndarray, e: np.ndarray, c: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    n = len(e)
    gains = (c - e)[order]
    quality = e.mean() + np.r_[0.0, np.cumsum(gains)] / n
    return np.arange(n + 1) / n, quality


def quality_vs_cloud_fraction(
    p_good: Any, edge_quality: Any, cloud_quality: Any
) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean served quality as the cloud budget grows, escalating lowest ``p_good`` first.

    With queries sorted by increasing ``p_good`` (permutation :math:`\pi`), sending
    the first k to the cloud gives

    .. math::

        q(k/n) = \frac{1}{n}\Bigl(\sum_{i} e_i + \sum_{j \le k} (c_{\pi_j} - e_{\pi_j})\Bigr).

    Ties in ``p_good`` are broken stably: among equal confidences the query that
    comes first in the input is escalated first.

    Parameters
    ----------
    p_good : array-like of shape (n,)
    edge_quality, cloud_quality : array-like of shape (n,)
        Quality of each model's answer per query (0/1 correctness, judge score, ...).

    Returns
    -------
    fractions : ndarray of shape (n + 1,)
        ``0, 1/n, ..., 1``.
    quality : ndarray of shape (n + 1,)
        Mean quality at each fraction; ``quality[0]`` is the edge mean and
        ``quality[-1]`` the cloud mean.
    """
    owner = "quality_vs_cloud_fraction"
    p = check_array(p_good, "p_good", owner)
    e, c = _qualities(edge_quality, cloud_quality, owner)
    check_same_length(owner, p_good=p, edge_quality=e)
    return _curve_from_order(np.argsort(p, kind="stable"), e, c)


def oracle_curve(edge_quality: Any, cloud_quality: Any) -> tuple[np.ndarray, np.ndarray]:
    """Routing curve of the oracle: escalate the queries with the largest cloud gain first.

    Queries are escalated by decreasing ``cloud_quality - edge_quality`` (stable),
    so those where the cloud beats the edge come first, then ties, then the ones
    where escalation hurts.

    Parameters
    ----------
    edge_quality, cloud_quality : array-like of shape (n,)

    Returns
    -------
    fractions, quality : ndarray of shape (n + 1,)
    """
    e, c = _qualities(edge_quality, cloud_quality, "oracle_curve")
    return _curve_from_order(np.argsort(-(c - e), kind="stable"), e, c)


def random_curve(edge_quality: Any, cloud_quality: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Expected routing curve of uniformly random escalation (analytic, linear).

    .. math::

        \mathbb{E}[q(f)] = \bar{e} + f\,(\bar{c} - \bar{e})

    Parameters
    ----------
    edge_quality, cloud_quality : array-like of shape (n,)

    Returns
    -------
    fractions, quality : ndarray of shape (n + 1,)
    """
    e, c = _qualities(edge_quality, cloud_quality, "random_curve")
    f = np.arange(len(e) + 1) / len(e)
    return f, e.mean() + f * (c.mean() - e.mean())


def _check_curve(fractions: Any, quality: Any, owner: str, *, full: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    f = check_array(fractions, "fractions", owner)
    q = check_array(quality, "quality", owner)
    check_same_length(owner, fractions=f, quality=q)
    if f.min() < 0.0 or f.max() > 1.0 or np.any(np.diff(f) < 0):
        raise InvalidParameterError(
            f"The 'fractions' parameter of {owner} must be non-decreasing values in [0, 1]. "
            f"Got values from {f.min()!r} to {f.max()!r}"
            + (" out of order." if np.any(np.diff(f) < 0) else ".")
        )
    if full and (f[0] != 0.0 or f[-1] != 1.0):
        raise InvalidParameterError(
            f"The 'fractions' parameter of {owner} must start at 0 and end at 1 (the whole "
            f"cloud-fraction range). Got {f[0]!r} to {f[-1]!r}."
        )
    return f, q


def _gap(q_weak: Any, q_strong: Any, owner: str) -> tuple[float, float]:
    w = float(check_float(q_weak, "q_weak", owner) or 0.0)
    s = float(check_float(q_strong, "q_strong", owner) or 0.0)
    if s == w:
        raise InvalidParameterError(
            f"The 'q_strong' parameter of {owner} must differ from 'q_weak' (the performance "
            f"gap is zero, so the recovered fraction is undefined). Got {s!r} == {w!r}."
        )
    return w, s


def pgr(quality: Any, q_weak: float, q_strong: float) -> np.ndarray:
    r"""Performance gap recovered, :math:`\mathrm{PGR} = (q - q_{weak}) / (q_{strong} - q_{weak})`.

    Parameters
    ----------
    quality : array-like of shape (n,)
    q_weak, q_strong : float
        Quality of the edge-only and cloud-only systems (must differ).

    Returns
    -------
    ndarray of shape (n,)
    """
    q = check_array(quality, "quality", "pgr")
    w, s = _gap(q_weak, q_strong, "pgr")
    return (q - w) / (s - w)


def cpt(fractions: Any, quality: Any, q_weak: float, q_strong: float, x: float) -> float:
    r"""Call-performance threshold CPT(x%) (Ong et al., 2024).

    The smallest cloud-call fraction at which the routing curve recovers ``x``
    percent of the gap between the weak and the strong model,
    :math:`\min\{c : \mathrm{PGR}(c) \ge x/100\}`, with :math:`\mathrm{PGR}`
    linearly interpolated between consecutive curve points (the first crossing).

    Parameters
    ----------
    fractions : array-like of shape (m,)
        Non-decreasing cloud-call fractions in [0, 1].
    quality : array-like of shape (m,)
        Mean quality at each fraction.
    q_weak, q_strong : float
        Edge-only and cloud-only quality (must differ).
    x : float in (0, 100]
        Percentage of the gap to recover.

    Returns
    -------
    float
        The fraction, or NaN if the curve never recovers ``x`` percent.
    """
    owner = "cpt"
    f, q = _check_curve(fractions, quality, owner)
    xv = float(check_float(x, "x", owner, min_value=0.0, max_value=100.0,
                           min_inclusive=False) or 0.0)
    w, s = _gap(q_weak, q_strong, owner)
    # compare in quality space, with a rounding tolerance so that a point lying exactly
    # on the target (e.g. k/n qualities) counts as reached
    target = w + xv / 100.0 * (s - w)
    sign = 1.0 if s > w else -1.0
    tol = 1e-12 * max(1.0, abs(s), abs(w))
    hits = np.flatnonzero(sign * (q - target) >= -tol)
    if len(hits) == 0:
        return float("nan")
    i = int(hits[0])
    if i == 0 or sign * (q[i] - target) <= tol:
        return float(f[i])
    # q[i-1] is short of the target and q[i] beyond it: interpolate linearly
    t = (target - q[i - 1]) / (q[i] - q[i - 1])
    return float(f[i - 1] + t * (f[i] - f[i - 1]))


def apgr(fractions: Any, quality: Any, q_weak: float, q_strong: float) -> float:
    r"""Average performance gap recovered (Ong et al., 2024).

    .. math::

        \mathrm{APGR} = \int_0^1 \mathrm{PGR}(c)\,dc

    by the trapezoid rule over the given curve points, which must span [0, 1].

    Parameters
    ----------
    fractions : array-like of shape (m,)
        Non-decreasing cloud-call fractions, first 0 and last 1.
    quality : array-like of shape (m,)
    q_weak, q_strong : float
        Edge-only and cloud-only quality (must differ).

    Returns
    -------
    float (0.5 for the random router with ``q_weak``/``q_strong`` at its ends)
    """
    owner = "apgr"
    f, q = _check_curve(fractions, quality, owner, full=True)
    w, s = _gap(q_weak, q_strong, owner)
    return float(np.trapezoid((q - w) / (s - w), f))


def quality_at_budget(fractions: Any, quality: Any, budget: float) -> float:
    """Mean quality when a fraction ``budget`` of the queries may go to the cloud.

    Linear interpolation of the curve at ``budget``: between two discrete points
    this is the expected quality of escalating the marginal query with the
    remaining probability.

    Parameters
    ----------
    fractions : array-like of shape (m,)
        Non-decreasing cloud-call fractions in [0, 1].
    quality : array-like of shape (m,)
    budget : float in [0, 1]

    Returns
    -------
    float
    """
    owner = "quality_at_budget"
    f, q = _check_curve(fractions, quality, owner)
    b = float(check_float(budget, "budget", owner, min_value=0.0, max_value=1.0) or 0.0)
    if b < f[0] or b > f[-1]:
        raise InvalidParameterError(
            f"The 'budget' parameter of {owner} must lie within the curve's fractions "
            f"[{f[0]!r}, {f[-1]!r}]. Got {b!r}."
        )
    return float(np.interp(b, f, q))


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    method: str = "percentile",
) -> tuple[float, float, float]:
    r"""Bootstrap confidence interval of a metric (Efron & Tibshirani, 1993).

    The rows of all ``arrays`` are resampled jointly with replacement ``n_boot``
    times (``scipy.stats.bootstrap`` through :func:`confroute._stats.bootstrap_ci`).
    With ``method="percentile"`` (default) the interval is the
    :math:`(\alpha/2, 1-\alpha/2)` quantiles of the resampled metric; resamples
    on which the metric is undefined (it raises
    :class:`~confroute.errors.InvalidParameterError`, e.g. a single class for
    AUROC) are skipped; if more than half are, the error is raised.
    ``method="BCa"`` gives the bias-corrected and accelerated interval.

    Parameters
    ----------
    metric_fn : callable
        ``metric_fn(*arrays) -> float``.
    *arrays : array-like of shape (n, ...)
        Same first dimension.
    n_boot : int, default 1000
    seed : int, default 0
    alpha : float in (0, 1), default 0.05
    method : {"percentile", "BCa"}, default "percentile"

    Returns
    -------
    (estimate, low, high) : tuple of float
        The metric on the full data and the interval bounds.
    """
    owner = "bootstrap_ci"
    if not callable(metric_fn):
        from confroute._validation import param_error

        raise param_error("metric_fn", owner, "a callable", metric_fn, type_error=True)
    check_int(n_boot, "n_boot", owner, min_value=1)
    check_int(seed, "seed", owner, min_value=0)
    a = check_float(alpha, "alpha", owner, min_value=0.0, max_value=1.0,
                    min_inclusive=False, max_inclusive=False)
    if not arrays:
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} must hold at least one array. Got none."
        )
    arrs = [np.asarray(x) for x in arrays]
    check_same_length(owner, **{f"arrays[{i}]": x for i, x in enumerate(arrs)})
    return stats_bootstrap_ci(metric_fn, *arrs, method=method, n_resamples=n_boot, seed=seed,
                               confidence=1.0 - a)
