r"""Routing across k models: a confidence cascade and a one-shot k-way selector.

A :class:`Cascade` runs an ordered list of :class:`Tier` s, cheapest first. A
query is answered by tier :math:`j` and moves on to tier :math:`j+1` while the
tier's calibrated :math:`p_j` (probability that its answer is good) is below the
tier's threshold :math:`t_j`; the last tier always answers (FrugalGPT's LLM
cascade, Chen et al., 2023). Optionally a query also stops at tier :math:`j \geq 1`
when tier :math:`j`'s answer agrees with tier :math:`j-1`'s (answer agreement as
a stopping signal). A query pays for every tier it reaches:

.. math::

    s(x) = \min\{j : p_j(x) \ge t_j \ \text{or}\ a_j(x)\} \cup \{k-1\}, \qquad
    \text{cost}(x) = \sum_{j \le s(x)} c_j(x), \qquad
    \text{quality}(x) = q_{s(x)}(x).

:meth:`Cascade.fit_thresholds` chooses :math:`t` on calibration data by an
exhaustive search over a grid of per-tier quantiles of :math:`p_j` (plus "never
stop here"), which is exact on the grid and affordable for :math:`k \le 4`
(``(n_grid + 1) ** (k - 1)`` simulations of the vectorised rule above).

:class:`KWaySelector` is the pre-generation counterpart (RouterBench, Hu et al.,
2024): one query-only predictor of each model's success, and the cheapest model
whose predicted success reaches a threshold, chosen on calibration data under a
cost cap.

References
----------
.. [1] L. Chen, M. Zaharia, J. Zou, "FrugalGPT: How to Use Large Language Models
   While Reducing Cost and Improving Performance", arXiv:2305.05176, 2023.
.. [2] Q. J. Hu et al., "RouterBench: A Benchmark for Multi-LLM Routing System",
   arXiv:2403.12031, 2024.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from confroute._stats import bootstrap_ci, clopper_pearson
from confroute._validation import (
    check_array,
    check_float,
    check_int,
    check_prompts,
    param_error,
)
from confroute.errors import InvalidParameterError
from confroute.models.base import LanguageModel, SampleRequest, collect_samples
from confroute.prices import estimate_tokens
from confroute.types import Prompt, Sample, Samples, prompt_text

__all__ = [
    "Cascade",
    "CascadeOutcome",
    "CascadeResponse",
    "KWaySelector",
    "OperatingPoint",
    "Tier",
    "fit_cascade_thresholds",
    "fit_selector_threshold",
    "measure",
    "nominal_cost",
    "select_models",
    "simulate_cascade",
]

#: Reference call used to order per-token tiers by cost (1,000 input, 100 output tokens).
REFERENCE_CALL = (1000, 100)
_MAX_COMBOS = 250_000


# --------------------------------------------------------------------------- tiers


def nominal_cost(cost_per_call: float | None, price_in: float | None = None,
                 price_out: float | None = None) -> float:
    """The cost that orders tiers: one call, or the reference call :data:`REFERENCE_CALL`.

    Parameters
    ----------
    cost_per_call : float or None
        Fixed cost of one call; when None, ``price_in`` and ``price_out`` (per
        million tokens) price a call of ``REFERENCE_CALL`` = (1,000 input, 100
        output) tokens.
    """
    if cost_per_call is not None:
        return float(cost_per_call)
    return (float(price_in or 0.0) * REFERENCE_CALL[0]
            + float(price_out or 0.0) * REFERENCE_CALL[1]) / 1e6


@dataclass(frozen=True)
class Tier:
    """One model of a cascade with its confidence signal and its price.

    Parameters
    ----------
    model : LanguageModel or None
        The model that answers at this tier (default: ``router.edge``).
    estimator : UncertaintyEstimator, optional
        Scores the tier's answer (higher = more uncertain). Needed on every tier
        but the last, unless ``router`` is given.
    calibrator : Calibrator, optional
        A fitted calibrator mapping the estimator's score to ``p_good``.
    name : str
        Shown in every response.
    cost_per_call : float >= 0, optional
        Fixed cost of one call. Give this or ``price_in`` and ``price_out``.
    price_in, price_out : float >= 0, optional
        Price per million input / output tokens. Token counts come from the
        model's report (``Sample.prompt_tokens``, generated tokens) or, when
        unknown, ``ceil(chars / 4)`` (:func:`confroute.prices.estimate_tokens`).
    router : Router, optional
        A calibrated :class:`~confroute.router.Router` for this tier's model; its
        ``predict_proba`` gives ``p_good`` (instead of estimator + calibrator).
    policy : OnlinePolicy, optional
        A budget for entering this tier: a fitted
        :class:`~confroute.policies.OnlinePolicy` such as
        :class:`~confroute.policies.BudgetPolicy` (anything with ``admit(p_good)
        -> ticket``, ``ticket.escalate`` and ``settle(ticket, spent)``). It is
        asked for every query that reaches the previous tier, with that tier's
        ``p_good``, so its budget caps the share of those queries that enter
        this tier; a query enters only if the previous tier's threshold sends it
        on **and** the ticket escalates (a ticket for a query that stops anyway
        is settled unspent). Not allowed on the first tier.
    max_new_tokens : int >= 1, default 64
        Length of the tier's answer.
    """

    model: LanguageModel | None
    estimator: Any = None
    calibrator: Any = None
    name: str = ""
    cost_per_call: float | None = None
    price_in: float | None = None
    price_out: float | None = None
    router: Any = None
    policy: Any = None
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        owner = "Tier"
        if not isinstance(self.name, str) or not self.name:
            raise param_error("name", owner, "a non-empty str", self.name, type_error=True)
        if self.model is None and self.router is not None:
            object.__setattr__(self, "model", getattr(self.router, "edge", None))
        if self.model is None or not callable(getattr(self.model, "generate", None)):
            raise param_error("model", owner, "a LanguageModel (or a router with an edge)",
                              self.model, type_error=True)
        per_token = self.price_in is not None or self.price_out is not None
        if (self.cost_per_call is not None and per_token) or (
                self.cost_per_call is None and (self.price_in is None or self.price_out is None)):
            raise InvalidParameterError(
                f"Tier {self.name!r} must have one kind of cost: 'cost_per_call', or both "
                f"'price_in' and 'price_out'. Got cost_per_call={self.cost_per_call!r}, "
                f"price_in={self.price_in!r}, price_out={self.price_out!r}."
            )
        for key in ("cost_per_call", "price_in", "price_out"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, check_float(
                    getattr(self, key), key, f"Tier {self.name!r}", min_value=0.0))
        check_int(self.max_new_tokens, "max_new_tokens", owner, min_value=1)
        if self.router is None and (self.estimator is None) != (self.calibrator is None):
            raise InvalidParameterError(
                f"Tier {self.name!r} needs both 'estimator' and 'calibrator' (or a 'router'). "
                f"Got estimator={self.estimator!r}, calibrator={self.calibrator!r}."
            )

    @property
    def scored(self) -> bool:
        """True when the tier has a confidence signal (router, or estimator + calibrator)."""
        return self.router is not None or self.estimator is not None

    @property
    def nominal_cost(self) -> float:
        """Cost of one call (per-token tiers: of the reference call :data:`REFERENCE_CALL`)."""
        return nominal_cost(self.cost_per_call, self.price_in, self.price_out)

    def call_cost(self, prompt: Prompt, samples: Samples) -> float:
        """Cost of what this tier generated for one prompt (greedy answer and any draws)."""
        if self.cost_per_call is not None:
            return float(self.cost_per_call)
        assert self.price_in is not None and self.price_out is not None
        generated: list[Sample] = [] if samples.greedy is None else [samples.greedy]
        for draws in samples.draws.values():
            generated.extend(draws)
        t_in = next((s.prompt_tokens for s in generated if s.prompt_tokens), None)
        if t_in is None:
            t_in = estimate_tokens(prompt_text(prompt))
        t_out = sum(s.n_tokens or estimate_tokens(s.text) for s in generated)
        return (self.price_in * t_in + self.price_out * t_out) / 1e6


@dataclass(frozen=True)
class CascadeResponse:
    """The answer served for one prompt by a cascade.

    Attributes
    ----------
    prompt : Prompt
    text : str or None
        The answer (None only if the first tier produced nothing).
    tier : int
        Index of the tier that answered.
    tier_name : str
    cost : float
        Total cost: every tier the query reached was called.
    tier_costs : tuple of float
        Cost of each tier reached, in order (length ``tier + 1``).
    p_good : tuple of float
        ``p_good`` of each tier reached (NaN where the tier has no signal).
    reason : str
        Why the query stopped where it did.
    degraded : bool
        True if a later tier failed and this earlier answer was served instead.
    error : str or None
    """

    prompt: Prompt
    text: str | None
    tier: int
    tier_name: str
    cost: float
    tier_costs: tuple[float, ...]
    p_good: tuple[float, ...]
    reason: str
    degraded: bool = False
    error: str | None = None


# --------------------------------------------------------------------------- offline rule


@dataclass(frozen=True)
class CascadeOutcome:
    """Where each query stops and what it gets, from :func:`simulate_cascade`.

    Attributes
    ----------
    stop : ndarray of int of shape (n,)
        Index of the answering tier.
    quality : ndarray of shape (n,)
        Quality (e.g. correctness) of the answer served.
    cost : ndarray of shape (n,)
        Cost paid (sum over the tiers reached).
    """

    stop: np.ndarray
    quality: np.ndarray
    cost: np.ndarray

    def tier_shares(self, k: int) -> np.ndarray:
        """Share of queries answered by each tier, shape (k,)."""
        return np.bincount(self.stop, minlength=k) / max(len(self.stop), 1)


def _offline_inputs(
    p_good: Any, correct: Any, costs: Any, agree: Any, owner: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (p (n, k-1), q (n, k), cumulative cost (n, k), agree (n, k-1) or None)."""
    q = check_array(correct, "correct_per_tier", owner, ndim=2)
    n, k = q.shape
    if k < 2:
        raise param_error("correct_per_tier", owner, "an (n, k) array with k >= 2 tiers",
                          f"shape {q.shape}")
    p = check_array(p_good, "p_good_per_tier", owner, ndim=2, allow_nan=True)
    if p.shape[0] != n or p.shape[1] not in (k - 1, k):
        raise param_error("p_good_per_tier", owner,
                          f"of shape ({n}, {k - 1}) or ({n}, {k})", f"shape {p.shape}")
    c = check_array(costs, "costs", owner, ndim=(1, 2))
    if c.shape not in ((k,), (n, k)):
        raise param_error("costs", owner, f"of shape ({k},) or ({n}, {k})", f"shape {c.shape}")
    if (c < 0).any():
        raise param_error("costs", owner, "non-negative", float(c.min()))
    cum = np.cumsum(np.broadcast_to(c, (n, k)), axis=1)
    a = None
    if agree is not None:
        a = check_array(agree, "agree", owner, ndim=2, dtype=bool)
        if a.shape != (n, k - 1):
            raise param_error("agree", owner, f"of shape ({n}, {k - 1})", f"shape {a.shape}")
    return p[:, : k - 1], q, cum, a


def _stop_masks(p: np.ndarray, thresholds: Sequence[float], agree: np.ndarray | None
                ) -> np.ndarray:
    n, km1 = p.shape
    stop = np.ones((n, km1 + 1), dtype=bool)
    with np.errstate(invalid="ignore"):
        stop[:, :km1] = p >= np.asarray(thresholds, dtype=np.float64)[None, :]  # NaN moves on
    if agree is not None:
        stop[:, 1:km1 + 1] |= agree
    return stop


def simulate_cascade(
    p_good_per_tier: Any, correct_per_tier: Any, costs: Any, thresholds: Sequence[float], *,
    agree: Any = None,
) -> CascadeOutcome:
    """Apply the cascade rule offline (see the module formula).

    Parameters
    ----------
    p_good_per_tier : array-like of shape (n, k - 1) or (n, k)
        Calibrated P(good) of each tier's answer (the last column, if given, is
        not used: the last tier always answers). NaN never stops.
    correct_per_tier : array-like of shape (n, k)
        Quality of each tier's answer (1 = correct).
    costs : array-like of shape (k,) or (n, k)
        Cost of calling each tier (per query when 2-D).
    thresholds : sequence of float, length k - 1
    agree : array-like of bool of shape (n, k - 1), optional
        ``agree[i, j]``: tier ``j + 1``'s answer agrees with tier ``j``'s; the query
        then stops at tier ``j + 1``.

    Returns
    -------
    CascadeOutcome
    """
    owner = "simulate_cascade"
    p, q, cum, a = _offline_inputs(p_good_per_tier, correct_per_tier, costs, agree, owner)
    t = _check_thresholds(thresholds, q.shape[1], owner)
    stop = np.argmax(_stop_masks(p, t, a), axis=1)
    rows = np.arange(q.shape[0])
    return CascadeOutcome(stop=stop, quality=q[rows, stop], cost=cum[rows, stop])


def _check_thresholds(thresholds: Any, k: int, owner: str) -> list[float]:
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise param_error("thresholds", owner, f"a sequence of {k - 1} floats (one per tier "
                          "but the last)", thresholds, type_error=True)
    if len(thresholds) != k - 1:
        raise param_error("thresholds", owner, f"a sequence of length {k - 1} (k - 1 for "
                          f"{k} tiers)", list(thresholds))
    out = []
    for i, t in enumerate(thresholds):
        if isinstance(t, (float, np.floating)) and math.isinf(t) and t > 0:
            out.append(math.inf)  # "never stop at this tier"
        else:
            out.append(float(check_float(t, f"thresholds[{i}]", owner, min_value=0.0,
                                         max_value=1.0)))
    return out


# --------------------------------------------------------------------------- operating point


@dataclass(frozen=True)
class OperatingPoint:
    """A chosen operating point with 95% intervals.

    Attributes
    ----------
    params : tuple of float
        The thresholds (cascade) or ``(threshold,)`` (selector).
    quality, cost : float
        Mean quality and mean cost per query on the data it was measured on.
    quality_ci, cost_ci : tuple of float
        Clopper–Pearson interval of the quality (binary quality; else a
        percentile bootstrap) and a percentile bootstrap interval of the cost.
        On the data the point was chosen on, they ignore the selection: measure
        on held-out data for an honest interval.
    shares : tuple of float
        Share of queries answered by each tier / model.
    n : int
    """

    params: tuple[float, ...]
    quality: float
    cost: float
    quality_ci: tuple[float, float]
    cost_ci: tuple[float, float]
    shares: tuple[float, ...]
    n: int
    constraint: str = ""


def measure(params: Sequence[float], quality: Any, cost: Any, shares: Any, *,
            constraint: str = "", seed: int = 0) -> OperatingPoint:
    """Build an :class:`OperatingPoint` from per-query quality and cost (shape (n,))."""
    qv = check_array(quality, "quality", "measure")
    cv = check_array(cost, "cost", "measure")
    n = len(qv)
    if np.isin(qv, (0.0, 1.0)).all():
        q_ci = clopper_pearson(int(qv.sum()), n)
    else:
        q_ci = bootstrap_ci(np.mean, qv, seed=seed)[1:]
    c_ci = bootstrap_ci(np.mean, cv, seed=seed)[1:] if np.ptp(cv) > 0 else (cv[0], cv[0])
    return OperatingPoint(
        params=tuple(float(x) for x in params), quality=float(qv.mean()), cost=float(cv.mean()),
        quality_ci=(float(q_ci[0]), float(q_ci[1])), cost_ci=(float(c_ci[0]), float(c_ci[1])),
        shares=tuple(float(s) for s in shares), n=n, constraint=constraint,
    )


def _constraint(max_cost: Any, min_quality: Any, owner: str) -> tuple[str, float]:
    if (max_cost is None) == (min_quality is None):
        raise InvalidParameterError(
            f"{owner} needs exactly one of 'max_cost' and 'min_quality'. "
            f"Got max_cost={max_cost!r}, min_quality={min_quality!r}."
        )
    if max_cost is not None:
        return "max_cost", float(check_float(max_cost, "max_cost", owner, min_value=0.0))
    return "min_quality", float(check_float(min_quality, "min_quality", owner,
                                            min_value=0.0, max_value=1.0))


def _best(qualities: np.ndarray, costs: np.ndarray, kind: str, bound: float, owner: str) -> int:
    """Index of the best candidate under the constraint (ties: the cheaper / better one)."""
    eps = 1e-12
    if kind == "max_cost":
        ok = costs <= bound + eps
        if not ok.any():
            raise InvalidParameterError(
                f"The 'max_cost' parameter of {owner} is below every reachable cost. Got "
                f"{bound!r}; the cheapest operating point costs {float(costs.min())!r}."
            )
        order = np.lexsort((costs, -qualities))
    else:
        ok = qualities >= bound - eps
        if not ok.any():
            raise InvalidParameterError(
                f"The 'min_quality' parameter of {owner} is above every reachable quality. "
                f"Got {bound!r}; the best operating point reaches {float(qualities.max())!r}."
            )
        order = np.lexsort((-qualities, costs))
    return int(next(i for i in order if ok[i]))


def _grid(p: np.ndarray, n_grid: int) -> list[np.ndarray]:
    levels = np.linspace(0.0, 1.0, n_grid)
    out = []
    for j in range(p.shape[1]):
        col = p[:, j][np.isfinite(p[:, j])]
        cand = np.unique(np.quantile(col, levels)) if len(col) else np.array([])
        out.append(np.concatenate([cand, [np.inf]]))
    return out


def fit_cascade_thresholds(
    p_good_per_tier: Any, correct_per_tier: Any, costs: Any, *, max_cost: float | None = None,
    min_quality: float | None = None, agree: Any = None, n_grid: int = 21, seed: int = 0,
) -> OperatingPoint:
    """Thresholds maximising quality under ``max_cost`` (or minimising cost above ``min_quality``).

    Exhaustive search over ``n_grid`` quantiles of each tier's ``p_good`` plus
    "never stop" (``inf``); see the module docstring. Raises
    :class:`~confroute.errors.InvalidParameterError` when the grid has more than
    250,000 combinations (lower ``n_grid``) or the constraint cannot be met.
    """
    owner = "Cascade.fit_thresholds"
    kind, bound = _constraint(max_cost, min_quality, owner)
    g = int(check_int(n_grid, "n_grid", owner, min_value=2))
    p, q, cum, a = _offline_inputs(p_good_per_tier, correct_per_tier, costs, agree, owner)
    grids = _grid(p, g)
    combos = math.prod(len(x) for x in grids)
    if combos > _MAX_COMBOS:
        raise param_error("n_grid", owner, f"small enough for at most {_MAX_COMBOS} threshold "
                          f"combinations over {q.shape[1]} tiers ({combos} now)", n_grid)
    rows = np.arange(q.shape[0])
    cands = list(itertools.product(*grids))
    qual = np.empty(len(cands))
    cost = np.empty(len(cands))
    for i, t in enumerate(cands):
        stop = np.argmax(_stop_masks(p, t, a), axis=1)
        qual[i], cost[i] = q[rows, stop].mean(), cum[rows, stop].mean()
    best = cands[_best(qual, cost, kind, bound, owner)]
    stop = np.argmax(_stop_masks(p, best, a), axis=1)
    shares = np.bincount(stop, minlength=q.shape[1]) / q.shape[0]
    return measure(best, q[rows, stop], cum[rows, stop], shares,
                   constraint=f"{kind} {bound:g}", seed=seed)


# --------------------------------------------------------------------------- cascade


def _agreement(value: Any, owner: str) -> Callable[[str, str], bool] | None:
    if value is None or value is False:
        return None
    if value is True or value == "answers_agree":
        from confroute.labeling import answers_agree

        return answers_agree
    if callable(value):
        return value
    raise param_error("agreement", owner, "None, True, 'answers_agree' or a callable "
                      "(answer_a, answer_b) -> bool", value, type_error=True)


class Cascade:
    """Answer with the cheapest tier whose answer is likely good (see the module docstring).

    Parameters
    ----------
    tiers : sequence of Tier
        At least two, ordered by non-decreasing cost (:attr:`Tier.nominal_cost`);
        every tier but the last needs a confidence signal.
    thresholds : sequence of float, optional
        One per tier but the last: a query stops at tier ``j`` when its
        ``p_good >= thresholds[j]``. Default: 0.5 each, or set them with
        :meth:`fit_thresholds`.
    agreement : None, True, "answers_agree" or callable, optional
        Also stop at tier ``j >= 1`` when its answer agrees with tier ``j - 1``'s.
        True uses :func:`confroute.labeling.answers_agree`; a callable gets the
        two answer texts.

    Examples
    --------
    >>> cascade = Cascade([Tier(small, est, cal, name="small", cost_per_call=0.0),
    ...                    Tier(big, name="big", price_in=5, price_out=15)])  # doctest: +SKIP
    >>> [r.tier_name for r in cascade(["What is 2 + 2?"])]  # doctest: +SKIP
    """

    def __init__(self, tiers: Sequence[Tier], *, thresholds: Sequence[float] | None = None,
                 agreement: Any = None) -> None:
        owner = "Cascade"
        if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Sequence):
            raise param_error("tiers", owner, "a sequence of Tier", tiers, type_error=True)
        if len(tiers) < 2:
            raise param_error("tiers", owner, "a sequence of at least two Tier", list(tiers))
        for i, t in enumerate(tiers):
            if not isinstance(t, Tier):
                raise param_error(f"tiers[{i}]", owner, "a Tier", t, type_error=True)
            if i < len(tiers) - 1 and not t.scored:
                raise param_error(f"tiers[{i}]", owner, "a Tier with a confidence signal "
                                  "(estimator + calibrator, or router)", t.name)
        if tiers[0].policy is not None:
            raise param_error("tiers[0].policy", owner, "None (every query enters the first "
                              "tier)", tiers[0].policy)
        costs = [t.nominal_cost for t in tiers]
        if any(b < a for a, b in itertools.pairwise(costs)):
            raise param_error("tiers", owner, "ordered by non-decreasing cost (cost of one call "
                              "or of a reference 1000-in/100-out call)", costs)
        self.tiers = list(tiers)
        k = len(tiers)
        self.thresholds = _check_thresholds(
            [0.5] * (k - 1) if thresholds is None else thresholds, k, owner)
        self.agreement = agreement
        self._agree = _agreement(agreement, owner)
        self.operating_point_: OperatingPoint | None = None

    def fit_thresholds(
        self, p_good_per_tier: Any, correct_per_tier: Any, costs: Any = None, *,
        max_cost: float | None = None, min_quality: float | None = None, agree: Any = None,
        n_grid: int = 21,
    ) -> OperatingPoint:
        """Choose and set :attr:`thresholds` on calibration data.

        Parameters
        ----------
        p_good_per_tier : array-like of shape (n, k - 1) or (n, k)
        correct_per_tier : array-like of shape (n, k)
        costs : array-like of shape (k,) or (n, k), optional
            Default: each tier's :attr:`Tier.nominal_cost`.
        max_cost, min_quality : float
            Exactly one: the mean cost cap or the quality floor.
        agree : array-like of bool of shape (n, k - 1), optional
            Observed answer agreement, used when the cascade has ``agreement``.
        n_grid : int, default 21

        Returns
        -------
        OperatingPoint
            Also stored as ``operating_point_``.
        """
        q = check_array(correct_per_tier, "correct_per_tier", "Cascade.fit_thresholds", ndim=2)
        if q.shape[1] != len(self.tiers):
            raise param_error("correct_per_tier", "Cascade.fit_thresholds",
                              f"an array with {len(self.tiers)} columns (one per tier)",
                              f"shape {q.shape}")
        c = [t.nominal_cost for t in self.tiers] if costs is None else costs
        point = fit_cascade_thresholds(
            p_good_per_tier, q, c, max_cost=max_cost, min_quality=min_quality,
            agree=agree if self._agree is not None else None, n_grid=n_grid)
        self.thresholds = list(point.params)
        self.operating_point_ = point
        return point

    def __call__(self, prompts: Sequence[Prompt]) -> list[CascadeResponse]:
        """Same as :meth:`answer`."""
        return self.answer(prompts)

    def answer(self, prompts: Sequence[Prompt]) -> list[CascadeResponse]:
        """Answer each prompt, tier by tier (one batched call per tier).

        Returns
        -------
        list of CascadeResponse
            One per prompt, in order, with the answering tier and the cost.
        """
        plist = check_prompts(prompts, "Cascade.answer")
        states = [_State(prompt=p) for p in plist]
        active = list(range(len(plist)))
        for j, tier in enumerate(self.tiers):
            if not active:
                break
            ok = self._run_tier(j, tier, [states[i] for i in active])
            active = [i for i, good in zip(active, ok) if good and states[i].stopped is None]
        return [s.response(self.tiers) for s in states]

    def _run_tier(self, j: int, tier: Tier, states: list[_State]) -> list[bool]:
        """Call ``tier`` for ``states``; mark which stop here. False = the call failed."""
        prompts = [s.prompt for s in states]
        try:
            samples, p = _tier_answers(tier, prompts)
        except Exception as exc:
            if j == 0:
                raise
            for s in states:
                s.fail(f"tier {tier.name!r} failed: {exc}")
            return [False] * len(states)
        last = j == len(self.tiers) - 1
        for s, sm, pi in zip(states, samples, p):
            text = None if sm.greedy is None else sm.greedy.text
            prev = s.texts[-1] if s.texts else None
            agreed = (self._agree is not None and prev is not None and text is not None
                      and bool(self._agree(prev, text)))
            s.record(text, tier.call_cost(s.prompt, sm), float(pi))
            if last:
                s.stop(j, "last tier answers")
                continue
            if agreed:
                reason: str | None = f"answer agrees with tier {j - 1}"
            elif pi >= self.thresholds[j]:
                reason = f"p_good {pi:.2f} >= threshold {self.thresholds[j]:.2f}"
            else:  # below the threshold, or NaN
                reason = None
            self._next_tier(j, s, float(pi), reason)
        return [True] * len(states)

    def _next_tier(self, j: int, s: _State, p: float, reason: str | None) -> None:
        """Stop ``s`` at tier ``j`` with ``reason``, or send it on (within the next tier's budget).

        The next tier's policy sees every query that reached tier ``j`` (so its
        budget is the share of them that may go on); a ticket that would escalate
        a query stopping here anyway is given back at once.
        """
        nxt = self.tiers[j + 1]
        ticket = None if nxt.policy is None else nxt.policy.admit(p)
        admitted = ticket is None or bool(getattr(ticket, "escalate", ticket))
        if reason is not None:
            if ticket is not None and admitted:
                nxt.policy.settle(ticket, spent=False)
            s.stop(j, reason)
        elif not admitted:
            s.stop(j, f"p_good {p:.2f} < threshold {self.thresholds[j]:.2f} but tier "
                   f"{nxt.name!r} budget refused")
        elif ticket is not None:
            s.tickets.append((nxt.policy, ticket))

    def __repr__(self) -> str:
        names = ", ".join(t.name for t in self.tiers)
        return f"Cascade(tiers=[{names}], thresholds={self.thresholds})"


def _tier_answers(tier: Tier, prompts: list[Prompt]) -> tuple[list[Samples], np.ndarray]:
    """The tier's samples (greedy answer included) and p_good (NaN when unscored), shape (n,)."""
    requests = [SampleRequest(greedy=True, max_new_tokens=tier.max_new_tokens)]
    if tier.estimator is not None:
        requests += list(tier.estimator.sample_requests())
    samples = collect_samples(tier.model, prompts, requests)
    if tier.router is not None:
        p = np.asarray(tier.router.predict_proba(prompts, samples=samples), dtype=np.float64)
    elif tier.estimator is not None:
        est = tier.estimator.estimate(prompts, tier.model, samples=samples)
        p = np.asarray(tier.calibrator.p_good(est.scores), dtype=np.float64)
    else:
        p = np.full(len(prompts), np.nan)
    return samples, p


@dataclass
class _State:
    """What one prompt has collected so far while it moves through the tiers."""

    prompt: Prompt
    texts: list[str | None] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    tickets: list[tuple[Any, Any]] = field(default_factory=list)
    stopped: int | None = None
    reason: str = ""
    error: str | None = None

    def record(self, text: str | None, cost: float, p: float) -> None:
        self.texts.append(text)
        self.costs.append(cost)
        self.p.append(p)
        for policy, ticket in self.tickets:  # the tier this ticket admitted was called
            policy.settle(ticket, spent=True)
        self.tickets.clear()

    def stop(self, j: int, reason: str) -> None:
        self.stopped, self.reason = j, reason

    def fail(self, error: str) -> None:
        for policy, ticket in self.tickets:
            policy.settle(ticket, spent=False)
        self.tickets.clear()
        self.stopped = len(self.texts) - 1
        self.error = error
        self.reason = "later tier failed; earlier answer served"

    def response(self, tiers: Sequence[Tier]) -> CascadeResponse:
        j = len(self.texts) - 1 if self.stopped is None else self.stopped
        return CascadeResponse(
            prompt=self.prompt, text=self.texts[j], tier=j, tier_name=tiers[j].name,
            cost=float(sum(self.costs)), tier_costs=tuple(self.costs), p_good=tuple(self.p),
            reason=self.reason, degraded=self.error is not None, error=self.error,
        )


# --------------------------------------------------------------------------- k-way selector


def _success_probability(predictor: Any, X: np.ndarray) -> np.ndarray:
    """P(success) from a query router (``p_strong``) or a scikit-learn classifier."""
    if callable(getattr(predictor, "p_strong", None)):
        return np.asarray(predictor.p_strong(X), dtype=np.float64)
    proba = np.asarray(predictor.predict_proba(X), dtype=np.float64)
    classes = list(getattr(predictor, "classes_", [0, 1]))
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(X))


def select_models(p_success: np.ndarray, costs: np.ndarray, rule: str, value: float
                  ) -> np.ndarray:
    r"""Model index per query, shape (n,).

    ``rule="threshold"``: the cheapest model with :math:`\hat p_m(x) \ge` ``value``,
    else the model with the highest :math:`\hat p_m(x)`. ``rule="utility"``:
    :math:`\arg\max_m \hat p_m(x) - \lambda c_m` with :math:`\lambda` = ``value``.
    Ties go to the cheaper model (columns are in cost order).
    """
    if rule == "utility":
        return np.asarray(np.argmax(p_success - value * costs[None, :], axis=1))
    ok = p_success >= value
    fallback = np.argmax(p_success, axis=1)
    return np.where(ok.any(axis=1), np.argmax(ok, axis=1), fallback)


class KWaySelector:
    r"""Pick one of k models per query before any generation.

    One query-only predictor per model estimates :math:`\hat p_m(x)`, the
    probability that model :math:`m` answers query :math:`x` correctly; the
    selector picks the cheapest model with :math:`\hat p_m(x) \ge \tau` (else
    the most likely one), or, with ``rule="utility"``, maximises
    :math:`\hat p_m(x) - \lambda c_m`. :meth:`fit_threshold` chooses
    :math:`\tau` (or :math:`\lambda`) on calibration data under a cost cap.

    Parameters
    ----------
    predictors : estimator or sequence of k estimators
        Binary classifiers of "the model is right" on query embeddings: the
        query routers of :mod:`confroute.predictive.routers` (their
        ``p_strong`` is read as P(success)) or any scikit-learn classifier with
        ``predict_proba``. A single estimator is cloned once per model.
    costs : array-like of shape (k,)
        Cost of one call of each model, non-decreasing (models in cost order).
    rule : {"threshold", "utility"}, default "threshold"
    value : float, default 0.5
        :math:`\tau` (in [0, 1]) or :math:`\lambda` (>= 0).

    Attributes
    ----------
    predictors_ : list
        The fitted predictors, one per model.
    operating_point_ : OperatingPoint or None
    """

    def __init__(self, predictors: Any, *, costs: Any, rule: str = "threshold",
                 value: float = 0.5) -> None:
        self.predictors = predictors
        self.costs = costs
        self.rule = rule
        self.value = value
        self.operating_point_: OperatingPoint | None = None

    def _checked(self, owner: str) -> tuple[np.ndarray, str, float]:
        from confroute._validation import check_choice

        c = check_array(self.costs, "costs", owner)
        if (c < 0).any() or (np.diff(c) < 0).any():
            raise param_error("costs", owner, "non-negative and non-decreasing (models in cost "
                              "order)", c.tolist())
        rule = check_choice(self.rule, "rule", owner, ("threshold", "utility"))
        hi = 1.0 if rule == "threshold" else None
        v = float(check_float(self.value, "value", owner, min_value=0.0, max_value=hi))
        return c, rule, v

    def fit(self, embeddings: Any, correct: Any) -> KWaySelector:
        """Fit one predictor per model on its 0/1 correctness labels.

        Parameters
        ----------
        embeddings : array-like of shape (n, d)
        correct : array-like of shape (n, k)
            1 where the model answered the query correctly.
        """
        from sklearn.base import clone

        owner = "KWaySelector.fit"
        c, _, _ = self._checked(owner)
        X = check_array(embeddings, "embeddings", owner, ndim=2)
        y = check_array(correct, "correct", owner, ndim=2)
        if y.shape != (X.shape[0], len(c)):
            raise param_error("correct", owner, f"of shape ({X.shape[0]}, {len(c)})",
                              f"shape {y.shape}")
        if not np.isin(y, (0.0, 1.0)).all():
            raise param_error("correct", owner, "0/1 labels", "other values")
        preds = self.predictors
        if isinstance(preds, Sequence):
            if len(preds) != len(c):
                raise param_error("predictors", owner, f"one estimator or {len(c)} (one per "
                                  "model)", f"{len(preds)} estimators")
            preds = [clone(p) for p in preds]
        else:
            preds = [clone(preds) for _ in range(len(c))]
        self.predictors_ = [p.fit(X, y[:, m].astype(np.int64)) for m, p in enumerate(preds)]
        return self

    def p_success(self, embeddings: Any) -> np.ndarray:
        """Predicted P(correct) of each model, shape (n, k)."""
        if not hasattr(self, "predictors_"):
            from confroute.errors import NotFittedError

            raise NotFittedError("This KWaySelector is not fitted yet; call "
                                 "fit(embeddings, correct) first.")
        X = check_array(embeddings, "embeddings", "KWaySelector.p_success", ndim=2)
        return np.column_stack([_success_probability(p, X) for p in self.predictors_])

    def select(self, embeddings: Any) -> np.ndarray:
        """Index of the chosen model for each query, shape (n,)."""
        c, rule, v = self._checked("KWaySelector.select")
        return select_models(self.p_success(embeddings), c, rule, v)

    def fit_threshold(
        self, embeddings: Any, correct: Any, costs: Any = None, *, max_cost: float,
        n_grid: int = 101,
    ) -> OperatingPoint:
        """Choose and set ``value`` maximising mean quality with mean cost <= ``max_cost``.

        A grid of ``n_grid`` quantiles of the predicted probabilities
        (``rule="threshold"``) or of :math:`\\lambda` values spanning the
        predicted-gain-per-cost ratios (``rule="utility"``) is searched exhaustively.

        Parameters
        ----------
        embeddings : array-like of shape (n, d)
            Calibration queries (not the ones the predictors were fitted on).
        correct : array-like of shape (n, k)
        costs : array-like of shape (k,) or (n, k), optional
            Per-query costs for the evaluation (default: ``self.costs``).
        max_cost : float >= 0
        """
        owner = "KWaySelector.fit_threshold"
        c, rule, _ = self._checked(owner)
        point = fit_selector_threshold(
            self.p_success(embeddings), correct, c if costs is None else costs, rule=rule,
            max_cost=max_cost, n_grid=n_grid, owner=owner)
        self.value = point.params[0]
        self.operating_point_ = point
        return point


def fit_selector_threshold(
    p_success: Any, correct: Any, costs: Any, *, max_cost: float, rule: str = "threshold",
    n_grid: int = 101, owner: str = "fit_selector_threshold",
) -> OperatingPoint:
    """The threshold (or lambda) of :func:`select_models` maximising quality under a cost cap.

    Parameters
    ----------
    p_success : array-like of shape (n, k)
        Predicted P(correct) per model, columns in non-decreasing cost order.
    correct : array-like of shape (n, k)
    costs : array-like of shape (k,) or (n, k)
    max_cost : float >= 0
    rule : {"threshold", "utility"}
    n_grid : int >= 2

    Returns
    -------
    OperatingPoint
        ``params == (value,)``.
    """
    from confroute._validation import check_choice

    rule = check_choice(rule, "rule", owner, ("threshold", "utility"))
    cap = float(check_float(max_cost, "max_cost", owner, min_value=0.0))
    P = check_array(p_success, "p_success", owner, ndim=2)
    q = check_array(correct, "correct", owner, ndim=2)
    if q.shape != P.shape:
        raise param_error("correct", owner, f"of shape {P.shape}", f"shape {q.shape}")
    cq = np.broadcast_to(check_array(costs, "costs", owner, ndim=(1, 2)), q.shape)
    c = cq.mean(axis=0)
    g = int(check_int(n_grid, "n_grid", owner, min_value=2))
    if rule == "threshold":
        grid = np.unique(np.concatenate([np.quantile(P, np.linspace(0, 1, g)), [0.0, 1.0]]))
    else:
        span = float(np.ptp(c)) or 1.0
        grid = np.concatenate([[0.0], np.geomspace(1e-4 / span, 1e2 / span, g)])
    rows = np.arange(len(q))
    picks = [select_models(P, c, rule, float(v)) for v in grid]
    qual = np.array([q[rows, m].mean() for m in picks])
    cost = np.array([cq[rows, m].mean() for m in picks])
    best = _best(qual, cost, "max_cost", cap, owner)
    m = picks[best]
    shares = np.bincount(m, minlength=q.shape[1]) / len(m)
    return measure((float(grid[best]),), q[rows, m], cq[rows, m], shares,
                   constraint=f"max_cost {cap:g}")
