"""Routing policies: keep the edge answer or escalate to the cloud.

A policy receives calibrated probabilities ``p_good`` (from a
:class:`~confroute.calibration.Calibrator`) and returns, per request, ``True`` to
escalate to the cloud model and ``False`` to keep the edge answer. NaN
``p_good`` (the estimator could not score) is escalated unless
``nan_policy="edge"``.

Budgeted policies can enforce their budget *exactly* online through a
thread-safe ledger: :meth:`BudgetPolicy.admit` / :meth:`CostAwarePolicy.admit`
decide one request at a time, and ``settle(ticket, spent=False)`` gives back an
escalation whose cloud call failed.

References
----------
.. [1] A. N. Angelopoulos, S. Bates, E. J. Candès, M. I. Jordan and L. Lei,
   "Learn then Test: Calibrating predictive algorithms to achieve risk control",
   arXiv:2110.01052, 2021.
.. [2] C. J. Clopper and E. S. Pearson, "The use of confidence or fiducial limits
   illustrated in the case of the binomial", Biometrika 26(4), 1934.
.. [3] J. Zhang et al., "Leveraging uncertainty estimation for efficient LLM
   routing", arXiv:2502.11021, 2025.
"""

from __future__ import annotations

import math
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from confroute._params import ParamsMixin
from confroute._registry import Registry
from confroute._validation import (
    check_array,
    check_choice,
    check_float,
    check_int,
    check_labels,
    check_same_length,
)
from confroute.calibration import ParamCheck, _read_state, _validate_params
from confroute.errors import InvalidParameterError, NotFittedError

__all__ = [
    "BudgetPolicy",
    "CostAwarePolicy",
    "LedgerSnapshot",
    "Policy",
    "RiskControlPolicy",
    "ThresholdPolicy",
    "Ticket",
    "policy_registry",
]

_P = TypeVar("_P", bound="Policy")
_NAN_POLICIES = ("escalate", "edge")
_INIT_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------
# parameter checks (one declared table per class)
def _c_nan_policy(value: Any, name: str, owner: str) -> str:
    return check_choice(value, name, owner, _NAN_POLICIES)


def _c_unit(value: Any, name: str, owner: str) -> float:
    return check_float(value, name, owner, min_value=0.0, max_value=1.0)


def _c_open_unit(value: Any, name: str, owner: str) -> float:
    return check_float(value, name, owner, min_value=0.0, max_value=1.0, min_inclusive=False,
                       max_inclusive=False)


def _c_nonneg(value: Any, name: str, owner: str) -> float:
    return check_float(value, name, owner, min_value=0.0)


def _c_nonneg_or_none(value: Any, name: str, owner: str) -> float | None:
    return check_float(value, name, owner, min_value=0.0, allow_none=True)


def _c_pos_int(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=1)


def _c_grid(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=2)


def _c_enforce(value: Any, name: str, owner: str) -> str:
    return check_choice(value, name, owner, ("none", "total", "window"))


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


def _allowance(budget: Fraction, n: int) -> int:
    """floor(budget * n) in exact rational arithmetic."""
    return (budget.numerator * n) // budget.denominator


def _exact_fraction(x: float) -> Fraction:
    """The decimal the user wrote (0.29 -> 29/100), not its binary approximation."""
    return Fraction(repr(float(x)))


# ---------------------------------------------------------------------------------------
# online ledger
@dataclass(eq=False)
class Ticket:
    """One online decision made by :meth:`BudgetPolicy.admit` or :meth:`CostAwarePolicy.admit`.

    Attributes
    ----------
    seq : int
        Arrival index in the ledger (0-based, assigned under the lock).
    p_good : float
        The probability the decision was made on (NaN if unscorable).
    escalate : bool
        True if the request goes to the cloud.
    wanted : bool
        True if the policy's rule alone asked to escalate.
    denied_by_budget : bool
        True if the rule asked to escalate but the budget refused.
    cost : float
        Cloud cost reserved in the spend ledger (0 for :class:`BudgetPolicy`).
    reason : str
        Short human-readable reason.
    settled : bool
        True once :meth:`settle` was called for this ticket.
    """

    seq: int
    p_good: float
    escalate: bool
    wanted: bool
    denied_by_budget: bool
    cost: float
    reason: str
    settled: bool = False
    _token: object = field(default=None, repr=False)


class LedgerSnapshot(NamedTuple):
    """Counts of an online ledger at one instant."""

    requests: int
    """Requests admitted since the last reset."""
    cloud: int
    """Escalations counted (failed cloud calls given back by ``settle`` are not)."""
    window_cloud: int
    """Escalations among the last ``window`` requests (BudgetPolicy with enforce="window")."""
    spent: float
    """Cloud spend counted (CostAwarePolicy)."""


class _Ledger:
    """Mutable counts; only touched while holding the owning policy's lock."""

    def __init__(self, window: int | None) -> None:
        self.token = object()
        self.requests = 0
        self.cloud = 0
        self.window = window
        self.ring = np.zeros(window, dtype=bool) if window else None
        self.window_cloud = 0
        self.spent = Fraction(0)

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(self.requests, self.cloud, self.window_cloud, float(self.spent))


# ---------------------------------------------------------------------------------------
class Policy(ParamsMixin, ABC):
    """Decides, per request, whether to escalate to the cloud model.

    ``decide`` is vectorised over a batch of calibrated probabilities and returns
    a boolean array (True = escalate). NaN probabilities are escalated unless the
    policy's ``nan_policy`` is ``"edge"``.

    Subclasses declare their parameters in ``_param_checks`` (validated at
    :meth:`fit` or first use) and their learned state in ``_state_spec``.
    """

    #: True if :meth:`fit` must be called before :meth:`decide`.
    requires_fit: ClassVar[bool] = False
    #: How to call fit, for the NotFittedError message.
    _fit_call: ClassVar[str] = "fit(p_good)"
    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {"nan_policy": _c_nan_policy}
    _state_spec: ClassVar[Mapping[str, str]] = {}

    nan_policy: str

    @property
    def name(self) -> str:
        """Registered name (class name when unregistered)."""
        return str(getattr(type(self), "_registry_name", type(self).__name__))

    # -- public API -----------------------------------------------------------------------
    def fit(self: _P, p_good: Any, labels: Any = None) -> _P:
        """Learn what the policy needs from held-out calibrated probabilities.

        Parameters
        ----------
        p_good : array-like of shape (n,)
            Calibrated P(edge answer good) in [0, 1] on held-out prompts; NaN allowed.
        labels : array-like of shape (n,), optional
            1 if the edge answer was good; only policies that control a risk use it.

        Returns
        -------
        self
        """
        params = self._params()
        p = self._check_p(p_good, "p_good", allow_empty=False)
        y = None
        if labels is not None:
            y = check_labels(labels, "labels", type(self).__name__, require_both=False)
            check_same_length(f"{type(self).__name__}.fit", p_good=p, labels=y)
        self._fit(p, y, params)
        self._fitted = True
        return self

    def decide(self, p_good: Any, *, cost: Any = None) -> np.ndarray:
        """Escalation decisions for a batch.

        Parameters
        ----------
        p_good : array-like of shape (n,)
            Calibrated P(edge answer good) in [0, 1]; NaN where unscorable.
        cost : float or array-like of shape (n,), optional
            Per-request cloud cost (used by :class:`CostAwarePolicy`).

        Returns
        -------
        ndarray of bool, shape (n,)
            True = escalate to the cloud.
        """
        params = self._params()
        self._check_fitted()
        p = self._check_p(p_good, "p_good", allow_empty=True)
        return self._decide(p, cost, params)

    def explain(self, p_good_i: float, escalate_i: bool, *, cost: float | None = None) -> str:
        """Short human-readable reason for one decision (for ``Decision.reason``).

        Parameters
        ----------
        p_good_i : float
            The request's calibrated P(good) (NaN if unscorable).
        escalate_i : bool
            The decision that was made for it.
        cost : float, optional
            The request's cloud cost, if one was passed to :meth:`decide`.
        """
        self._check_fitted()
        return self._explain(float(p_good_i), bool(escalate_i), cost)

    def get_state(self) -> dict[str, Any]:
        """Learned values for safe JSON persistence (not the live ledger)."""
        self._check_fitted()
        return {key: getattr(self, key) for key in self._state_spec}

    def set_state(self: _P, state: Mapping[str, Any]) -> _P:
        """Restore what :meth:`get_state` returned; the policy is then fitted."""
        values = _read_state(state, self._state_spec, type(self).__name__)
        self._set_state(values)
        self._fitted = True
        return self

    # -- hooks ----------------------------------------------------------------------------
    def _fit(self, p: np.ndarray, labels: np.ndarray | None, params: dict[str, Any]) -> None:
        """Default: nothing to learn."""

    @abstractmethod
    def _decide(self, p: np.ndarray, cost: Any, params: dict[str, Any]) -> np.ndarray:
        """Decisions for validated ``p`` of shape (n,)."""

    @abstractmethod
    def _explain(self, p: float, escalate: bool, cost: float | None) -> str:
        """Reason for one decision."""

    def _set_state(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            setattr(self, key, value)

    # -- helpers --------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return _validate_params(self, self._param_checks)

    def _check_fitted(self) -> None:
        if self.requires_fit and not getattr(self, "_fitted", False):
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet: call {self._fit_call} first."
            )

    def _check_p(self, p_good: Any, name: str, *, allow_empty: bool) -> np.ndarray:
        owner = type(self).__name__
        p = check_array(p_good, name, owner, ndim=1, allow_nan=True, allow_empty=allow_empty)
        finite = p[~np.isnan(p)]
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
            bad = finite[(finite < 0.0) | (finite > 1.0)][0]
            raise InvalidParameterError(
                f"The '{name}' parameter of {owner} must contain probabilities in [0, 1] "
                f"(or NaN). Got {bad!r}."
            )
        return p

    def _nan_escalates(self) -> bool:
        return bool(self.nan_policy == "escalate")

    def _nan_reason(self, escalate: bool) -> str:
        return "p_good is NaN (unscorable): " + ("escalated" if escalate else "kept on edge")

    # Ledger plumbing shared by the online policies. The lock is created lazily so the
    # constructor only stores parameters; it is dropped on copy/pickle and recreated.
    @property
    def _lock(self) -> threading.Lock:
        lock = self.__dict__.get("_lock_obj")
        if lock is None:
            with _INIT_LOCK:
                lock = self.__dict__.get("_lock_obj")
                if lock is None:
                    lock = threading.Lock()
                    self.__dict__["_lock_obj"] = lock
        return lock

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock_obj", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


policy_registry: Registry[Policy] = Registry("policy", Policy)  # type: ignore[type-abstract]


# ---------------------------------------------------------------------------------------
@policy_registry.register("threshold")
class ThresholdPolicy(Policy):
    r"""Escalate when the edge answer is not likely enough to be good.

    .. math:: \text{escalate}_i = [\,p_i < \tau\,], \qquad \tau = \texttt{min\_p\_good}.

    Needs no fit.

    Parameters
    ----------
    min_p_good : float in [0, 1], default=0.5
        Keep the edge answer when ``p_good >= min_p_good``.
    nan_policy : {"escalate", "edge"}, default="escalate"
        What to do with NaN ``p_good``.
    """

    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "min_p_good": _c_unit,
        "nan_policy": _c_nan_policy,
    }

    def __init__(self, *, min_p_good: float = 0.5, nan_policy: str = "escalate") -> None:
        self.min_p_good = min_p_good
        self.nan_policy = nan_policy

    def _decide(self, p: np.ndarray, cost: Any, params: dict[str, Any]) -> np.ndarray:
        nan = np.isnan(p)
        out = np.zeros(p.shape, dtype=bool)
        out[~nan] = p[~nan] < params["min_p_good"]
        out[nan] = params["nan_policy"] == "escalate"
        return out

    def _explain(self, p: float, escalate: bool, cost: float | None) -> str:
        t = float(self.min_p_good)
        if math.isnan(p):
            return self._nan_reason(escalate)
        return f"p_good {p:.2f} {'<' if p < t else '>='} threshold {t:.2f}"


# ---------------------------------------------------------------------------------------
@policy_registry.register("budget")
class BudgetPolicy(Policy):
    r"""Escalate the least confident requests within a cloud budget.

    **Threshold.** :meth:`fit` learns the largest threshold :math:`t` such that
    the share of held-out requests that escalate (:math:`p_i < t`, or NaN) is at
    most :math:`b` = ``max_cloud_fraction``: with :math:`k = \lfloor b n \rfloor`
    escalations allowed and :math:`n_{\mathrm{NaN}}` NaN values, the
    :math:`m = k - n_{\mathrm{NaN}}` smallest finite values escalate; ``t`` is the
    midpoint between the m-th and (m+1)-th smallest finite values (or the
    (m+1)-th itself when they tie, so ties never push the share over :math:`b`;
    0 when m = 0; 1 when every finite value may escalate, so ``p_good == 1`` is
    never escalated).

    **Interval.** ``cloud_fraction_interval_`` is the two-sided Clopper–Pearson
    interval [2]_ at level ``confidence`` for the cloud share that new traffic
    drawn like the held-out set will see, computed from the :math:`x` held-out
    escalations out of :math:`n`:

    .. math::

        \Bigl[\,B^{-1}_{x,\,n-x+1}\bigl(\tfrac{1-c}{2}\bigr),\;
        B^{-1}_{x+1,\,n-x}\bigl(\tfrac{1+c}{2}\bigr)\Bigr].

    Although :math:`t` is chosen from the same data, this is exact (conservative)
    for continuous ``p_good`` without NaN: :math:`t` lies between the m-th and
    (m+1)-th order statistics, whose population CDF values are
    :math:`\mathrm{Beta}(m, n-m+1)` and :math:`\mathrm{Beta}(m+1, n-m)`
    distributed, and these are exactly the two Clopper–Pearson limits with
    :math:`x = m`. With ties or NaN it is the usual binomial approximation.

    **Online exact enforcement.** With ``enforce="total"`` a request escalates
    only if the rule says so *and* after it the number of escalations is at most
    :math:`\lfloor b N \rfloor`, where :math:`N` counts requests so far, so the
    realised cloud share never exceeds :math:`b` at any prefix of the arrival
    order. With ``enforce="window"`` the same holds within the last ``window``
    requests (the whole prefix while fewer have arrived). The ledger is
    protected by a lock, so concurrent :meth:`admit` calls see a single arrival
    order; :meth:`decide` on a batch admits its requests one by one, in order,
    when enforcement is on (and is pure when ``enforce="none"``). :math:`b` is
    taken as the decimal written (0.29 is 29/100), in exact arithmetic.

    Parameters
    ----------
    max_cloud_fraction : float in [0, 1]
        Budget :math:`b`: the largest share of requests sent to the cloud.
    enforce : {"none", "total", "window"}, default="none"
        Online enforcement mode (see above).
    window : int >= 1, default=1000
        Sliding-window length for ``enforce="window"``.
    confidence : float in (0, 1), default=0.95
        Level of ``cloud_fraction_interval_``.
    nan_policy : {"escalate", "edge"}, default="escalate"

    Attributes
    ----------
    threshold_ : float
        Escalate when ``p_good < threshold_``.
    calibration_cloud_fraction_ : float
        Share of held-out requests that escalate at ``threshold_`` (<= budget).
    cloud_fraction_interval_ : ndarray of shape (2,)
        Confidence interval for the cloud share on similar traffic.
    n_calibration_ : int
    """

    requires_fit: ClassVar[bool] = True
    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "max_cloud_fraction": _c_unit,
        "enforce": _c_enforce,
        "window": _c_pos_int,
        "confidence": _c_open_unit,
        "nan_policy": _c_nan_policy,
    }
    _state_spec: ClassVar[Mapping[str, str]] = {
        "threshold_": "float",
        "calibration_cloud_fraction_": "float",
        "cloud_fraction_interval_": "array",
        "n_calibration_": "int",
    }

    def __init__(
        self,
        *,
        max_cloud_fraction: float,
        enforce: str = "none",
        window: int = 1000,
        confidence: float = 0.95,
        nan_policy: str = "escalate",
    ) -> None:
        self.max_cloud_fraction = max_cloud_fraction
        self.enforce = enforce
        self.window = window
        self.confidence = confidence
        self.nan_policy = nan_policy

    # -- fit ------------------------------------------------------------------------------
    def _fit(self, p: np.ndarray, labels: np.ndarray | None, params: dict[str, Any]) -> None:
        from scipy.stats import beta

        n = p.size
        budget = _exact_fraction(params["max_cloud_fraction"])
        k = _allowance(budget, n)
        nan = np.isnan(p)
        n_nan = int(nan.sum()) if params["nan_policy"] == "escalate" else 0
        finite = np.sort(p[~nan])
        if n_nan > k:
            warnings.warn(
                f"BudgetPolicy: {n_nan} of {n} held-out p_good are NaN and escalate, more than "
                f"the budget {_pct(float(budget))} allows; the threshold is set to 0 so only "
                "NaN escalate. Use enforce='total' to cap them, or nan_policy='edge'.",
                UserWarning,
                stacklevel=3,
            )
            t = 0.0
        else:
            m = k - n_nan
            if m == 0:
                t = 0.0
            elif m >= finite.size:
                t = 1.0
            elif finite[m - 1] < finite[m]:
                t = float((finite[m - 1] + finite[m]) / 2.0)
            else:
                t = float(finite[m])
        x = int(np.count_nonzero(finite < t)) + n_nan
        c = params["confidence"]
        lo = 0.0 if x == 0 else float(beta.ppf((1 - c) / 2, x, n - x + 1))
        hi = 1.0 if x == n else float(beta.ppf((1 + c) / 2, x + 1, n - x))
        self.threshold_ = t
        self.calibration_cloud_fraction_ = x / n
        self.cloud_fraction_interval_ = np.array([lo, hi])
        self.n_calibration_ = n
        self._reset_ledger(params)

    def _set_state(self, values: dict[str, Any]) -> None:
        super()._set_state(values)
        self._reset_ledger(self._params())

    # -- ledger ---------------------------------------------------------------------------
    def _reset_ledger(self, params: dict[str, Any]) -> None:
        with self._lock:
            self._budget = _exact_fraction(params["max_cloud_fraction"])
            self._enforce = params["enforce"]
            self._ledger = _Ledger(params["window"] if params["enforce"] == "window" else None)

    def reset(self) -> None:
        """Empty the ledger (and re-read ``enforce``, ``window`` and the budget).

        Tickets issued before the reset can no longer be settled.
        """
        self._check_fitted()
        self._reset_ledger(self._params())

    def ledger(self) -> LedgerSnapshot:
        """Snapshot of the online counts."""
        self._check_fitted()
        with self._lock:
            return self._ledger.snapshot()

    def _wants(self, p: float) -> bool:
        if math.isnan(p):
            return self._nan_escalates()
        return p < self.threshold_

    def _admit_locked(self, p: float) -> Ticket:
        led = self._ledger
        seq = led.requests
        led.requests += 1
        wanted = self._wants(p)
        if self._enforce == "total":
            allowed = led.cloud + 1 <= _allowance(self._budget, led.requests)
        elif self._enforce == "window":
            assert led.ring is not None and led.window is not None
            w = led.window
            if seq >= w and led.ring[seq % w]:  # the request leaving the window
                led.window_cloud -= 1
            led.ring[seq % w] = False
            allowed = led.window_cloud + 1 <= _allowance(self._budget, min(led.requests, w))
        else:
            allowed = True
        escalate = wanted and allowed
        if escalate:
            led.cloud += 1
            if led.ring is not None and led.window is not None:
                led.ring[seq % led.window] = True
                led.window_cloud += 1
        denied = wanted and not allowed
        return Ticket(seq=seq, p_good=p, escalate=escalate, wanted=wanted,
                      denied_by_budget=denied, cost=0.0,
                      reason=self._explain(p, escalate, None), _token=led.token)

    def admit(self, p_good: float) -> Ticket:
        """Decide one request online, counting it in the ledger.

        Parameters
        ----------
        p_good : float
            Calibrated P(good) of the request (NaN if unscorable).

        Returns
        -------
        Ticket
            ``ticket.escalate`` is the decision; pass the ticket to :meth:`settle`
            if the cloud call then fails.
        """
        self._check_fitted()
        p = float(self._check_p([p_good], "p_good", allow_empty=False)[0])
        with self._lock:
            return self._admit_locked(p)

    def settle(self, ticket: Ticket, spent: bool) -> bool:
        """Record whether an escalation was really spent.

        ``spent=False`` (the cloud call failed) un-counts the escalation, so the
        ledger counts only what was spent. Settling twice, settling a kept
        request, or settling a ticket from before :meth:`reset` changes nothing.

        Returns
        -------
        bool
            True if the ledger changed.
        """
        self._check_fitted()
        with self._lock:
            led = self._ledger
            if ticket._token is not led.token or ticket.settled:
                return False
            ticket.settled = True
            if spent or not ticket.escalate:
                return False
            led.cloud -= 1
            if led.ring is not None and led.window is not None:
                in_window = ticket.seq >= led.requests - led.window
                if in_window and led.ring[ticket.seq % led.window]:
                    led.ring[ticket.seq % led.window] = False
                    led.window_cloud -= 1
            return True

    # -- decide / explain -----------------------------------------------------------------
    def _decide(self, p: np.ndarray, cost: Any, params: dict[str, Any]) -> np.ndarray:
        if self._enforce == "none":
            out = np.zeros(p.shape, dtype=bool)
            nan = np.isnan(p)
            out[~nan] = p[~nan] < self.threshold_
            out[nan] = self._nan_escalates()
            return out
        with self._lock:
            return np.array([self._admit_locked(float(v)).escalate for v in p], dtype=bool)

    def _explain(self, p: float, escalate: bool, cost: float | None) -> str:
        t = self.threshold_
        wanted = self._wants(p)
        base = self._nan_reason(wanted) if math.isnan(p) else (
            f"p_good {p:.2f} {'<' if p < t else '>='} threshold {t:.2f}"
        )
        if wanted and not escalate:
            limit = _pct(float(self.max_cloud_fraction))
            where = "in the window" if self._enforce == "window" else "so far"
            return f"budget: cloud share at limit {limit} {where}, kept on edge ({base})"
        return base


# ---------------------------------------------------------------------------------------
@policy_registry.register("cost_aware")
class CostAwarePolicy(Policy):
    r"""Escalate when the expected quality gain is worth the extra cost.

    .. math::

        \text{escalate}_i = \bigl[(q_c - p_i)\,V > c_i - c_e\bigr],

    with :math:`q_c` = ``p_cloud_good`` (probability the cloud answer is good),
    :math:`V` = ``quality_value`` (value of a good rather than a bad answer),
    :math:`c_i` the cloud cost of request i (``cloud_cost``, or ``cost[i]`` when
    passed to :meth:`decide`) and :math:`c_e` = ``edge_cost``. **Units:** all of
    ``edge_cost``, ``cloud_cost``, ``cost``, ``quality_value`` and
    ``spend_budget`` share one unit of your choice (dollars, tokens, ...).

    **Spend cap.** With ``spend_budget`` set, requests are admitted one at a
    time through a thread-safe ledger: an escalation happens only if the cloud
    spend counted so far plus :math:`c_i` stays <= ``spend_budget`` (exact
    rational arithmetic), so the counted spend never exceeds the budget.
    ``settle(ticket, spent=False)`` refunds a failed cloud call. Only cloud
    spend is counted. :meth:`decide` is pure without ``spend_budget``.

    Parameters
    ----------
    edge_cost, cloud_cost : float >= 0, defaults 0 and 1
    quality_value : float >= 0, default=10.0
    p_cloud_good : float in [0, 1], default=1.0
    spend_budget : float >= 0 or None, default=None
    nan_policy : {"escalate", "edge"}, default="escalate"
    """

    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "edge_cost": _c_nonneg,
        "cloud_cost": _c_nonneg,
        "quality_value": _c_nonneg,
        "p_cloud_good": _c_unit,
        "spend_budget": _c_nonneg_or_none,
        "nan_policy": _c_nan_policy,
    }

    def __init__(
        self,
        *,
        edge_cost: float = 0.0,
        cloud_cost: float = 1.0,
        quality_value: float = 10.0,
        p_cloud_good: float = 1.0,
        spend_budget: float | None = None,
        nan_policy: str = "escalate",
    ) -> None:
        self.edge_cost = edge_cost
        self.cloud_cost = cloud_cost
        self.quality_value = quality_value
        self.p_cloud_good = p_cloud_good
        self.spend_budget = spend_budget
        self.nan_policy = nan_policy

    def _costs(self, cost: Any, n: int, params: dict[str, Any]) -> np.ndarray:
        if cost is None:
            return np.full(n, params["cloud_cost"])
        owner = type(self).__name__
        c = check_array(cost, "cost", owner, ndim=(0, 1), allow_empty=True)
        if c.ndim == 0:
            c = np.full(n, float(c))
        elif c.shape != (n,):
            raise InvalidParameterError(
                f"The 'cost' parameter of {owner} must be a float or have shape ({n},), one cost "
                f"per request. Got shape {c.shape}."
            )
        if c.size and c.min() < 0:
            raise InvalidParameterError(
                f"The 'cost' parameter of {owner} must contain costs >= 0. Got {c.min()!r}."
            )
        return c

    def _wants(self, p: np.ndarray, c: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        gain = (params["p_cloud_good"] - p) * params["quality_value"]
        out = gain > c - params["edge_cost"]
        out[np.isnan(p)] = params["nan_policy"] == "escalate"
        return np.asarray(out, dtype=bool)

    def _ledger_obj(self) -> _Ledger:
        led = self.__dict__.get("_ledger")
        if led is None:
            led = _Ledger(None)
            self.__dict__["_ledger"] = led
        return led

    def _admit_locked(self, p: float, c: float, wanted: bool, budget: float | None) -> Ticket:
        led = self._ledger_obj()
        seq = led.requests
        led.requests += 1
        allowed = budget is None or led.spent + Fraction(c) <= Fraction(budget)
        escalate = wanted and allowed
        if escalate:
            led.cloud += 1
            led.spent += Fraction(c)
        return Ticket(seq=seq, p_good=p, escalate=escalate, wanted=wanted,
                      denied_by_budget=wanted and not allowed, cost=c if escalate else 0.0,
                      reason=self._explain(p, escalate, c), _token=led.token)

    def admit(self, p_good: float, *, cost: float | None = None) -> Ticket:
        """Decide one request online, counting its cloud cost in the spend ledger.

        Parameters
        ----------
        p_good : float
            Calibrated P(good) (NaN if unscorable).
        cost : float, optional
            Cloud cost of this request (default ``cloud_cost``).
        """
        params = self._params()
        p = self._check_p([p_good], "p_good", allow_empty=False)
        c = self._costs(None if cost is None else [cost], 1, params)
        wanted = bool(self._wants(p, c, params)[0])
        with self._lock:
            return self._admit_locked(float(p[0]), float(c[0]), wanted, params["spend_budget"])

    def settle(self, ticket: Ticket, spent: bool) -> bool:
        """``spent=False`` refunds a failed escalation's cost; see :meth:`BudgetPolicy.settle`."""
        with self._lock:
            led = self._ledger_obj()
            if ticket._token is not led.token or ticket.settled:
                return False
            ticket.settled = True
            if spent or not ticket.escalate:
                return False
            led.cloud -= 1
            led.spent -= Fraction(ticket.cost)
            return True

    def reset(self) -> None:
        """Empty the spend ledger; older tickets can no longer be settled."""
        with self._lock:
            self.__dict__["_ledger"] = _Ledger(None)

    def ledger(self) -> LedgerSnapshot:
        """Snapshot of the online counts (``spent`` in the cost unit)."""
        with self._lock:
            return self._ledger_obj().snapshot()

    def _decide(self, p: np.ndarray, cost: Any, params: dict[str, Any]) -> np.ndarray:
        c = self._costs(cost, p.size, params)
        wanted = self._wants(p, c, params)
        budget = params["spend_budget"]
        if budget is None:
            return wanted
        with self._lock:
            return np.array(
                [self._admit_locked(float(p[i]), float(c[i]), bool(wanted[i]), budget).escalate
                 for i in range(p.size)],
                dtype=bool,
            )

    def _explain(self, p: float, escalate: bool, cost: float | None) -> str:
        c = float(self.cloud_cost if cost is None else cost)
        extra = c - float(self.edge_cost)
        if math.isnan(p):
            wanted = self._nan_escalates()
            base = self._nan_reason(wanted)
        else:
            gain = (float(self.p_cloud_good) - p) * float(self.quality_value)
            wanted = gain > extra
            base = f"expected gain {gain:.3g} {'>' if wanted else '<='} extra cost {extra:.3g}"
        if wanted and not escalate:
            return (f"spend budget: cloud cost {c:.3g} would exceed spend_budget "
                    f"{float(self.spend_budget or 0.0):.3g}, kept on edge ({base})")
        return base


# ---------------------------------------------------------------------------------------
@policy_registry.register("risk_control")
class RiskControlPolicy(Policy):
    r"""Keep as many answers on the edge as possible with a certified edge error rate.

    Let :math:`R(t) = P(\text{edge bad} \mid p \ge t)` be the **conditional** error
    rate of the answers kept on the edge by threshold :math:`t` (kept iff
    :math:`p \ge t`). :meth:`fit` returns the loosest threshold :math:`\hat t`
    such that

    .. math:: P_{\text{calibration}}\bigl(R(\hat t) \le \alpha\bigr) \ge 1 - \delta,

    with :math:`\alpha` = ``max_edge_error``, by Learn then Test [1]_ with
    fixed-sequence testing:

    1. A data-independent grid :math:`1 = t_0 > t_1 > \dots > t_{G-1} = 0`
       (``grid_size`` = G evenly spaced points) is ordered from strict (few kept)
       to loose.
    2. For each :math:`t_j` with :math:`m_j` kept calibration answers of which
       :math:`e_j` are bad, the p-value of :math:`H_j : R(t_j) > \alpha` is the
       exact binomial tail

       .. math:: \pi_j = P\bigl(\mathrm{Bin}(m_j, \alpha) \le e_j\bigr)
          \quad(\pi_j = 1 \text{ if } m_j = 0).

    3. Thresholds that keep too few answers for any rejection to be possible,
       :math:`(1-\alpha)^{m_j} > \delta`, are passed over; from the first testable
       one, :math:`H_j` is rejected while :math:`\pi_j \le \delta` and testing
       stops at the first non-rejection. :math:`\hat t` is the last rejected
       threshold. If none is rejected every request is escalated
       (``guarantee_met_ = False``, with a warning).

    **Why it is valid.** Assume the calibration pairs (p_good, label) and the
    future requests are i.i.d. For a *fixed* t, conditional on :math:`m_t` the
    kept answers are i.i.d. draws from the law given :math:`p \ge t`, so
    :math:`e_t \sim \mathrm{Bin}(m_t, R(t))`, stochastically larger than
    :math:`\mathrm{Bin}(m_t, \alpha)` under :math:`H_t`; hence
    :math:`P(\pi_t \le \delta) \le \delta` conditionally on :math:`m_t` and so
    unconditionally. Fixed-sequence testing along an order fixed in advance
    rejects a true null only if it rejects the *first* true null, which happens
    with probability at most :math:`\delta`: the family-wise error rate, and so
    :math:`P(R(\hat t) > \alpha)`, is at most :math:`\delta`. Because
    :math:`m_t` grows as t loosens, the passed-over thresholds are a prefix of
    the order; passing over them keeps the bound when the error rate
    :math:`r(p) = P(\text{bad} \mid p)` is non-increasing in p (calibrated
    probabilities ordered correctly, which is what the calibrator fits): then the
    first tested null :math:`t` and the preceding null :math:`t'` both have error
    above :math:`\alpha` on :math:`[t', 1]` and on the band :math:`[t, t')`, so
    :math:`\pi_t` stays valid conditionally on :math:`(m_t, m_{t'})`, and the events
    "the count first reaches the testable size between two consecutive nulls"
    are disjoint. NaN ``p_good`` follow ``nan_policy``: escalated (never kept),
    or with ``"edge"`` kept at every threshold and counted in :math:`m_j, e_j`.
    The guarantee is on the error rate among kept answers, over the draw of the
    calibration set; it says nothing about a single request.

    Parameters
    ----------
    max_edge_error : float in (0, 1)
        :math:`\alpha`, the largest acceptable error rate among kept answers.
    delta : float in (0, 1), default=0.1
        :math:`\delta`, the allowed probability that the calibration draw misleads.
    grid_size : int >= 2, default=1001
        Number of candidate thresholds (spacing 1 / (grid_size - 1)).
    nan_policy : {"escalate", "edge"}, default="escalate"

    Attributes
    ----------
    threshold_ : float
        Keep on edge iff ``p_good >= threshold_`` (when ``guarantee_met_``).
    guarantee_met_ : bool
        False if no threshold could be certified (everything escalates).
    edge_error_upper_bound_ : float
        One-sided Clopper–Pearson :math:`1-\delta` upper bound on :math:`R` at
        ``threshold_`` (<= ``max_edge_error`` when ``guarantee_met_``; 0 when
        nothing is kept).
    empirical_edge_error_ : float
        Error rate among held-out answers kept at ``threshold_`` (0 if none kept).
    expected_cloud_fraction_ : float
        Share of held-out requests escalated at ``threshold_``.
    n_kept_ : int
        Held-out answers kept at ``threshold_``.
    """

    requires_fit: ClassVar[bool] = True
    _fit_call: ClassVar[str] = "fit(p_good, labels)"
    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "max_edge_error": _c_open_unit,
        "delta": _c_open_unit,
        "grid_size": _c_grid,
        "nan_policy": _c_nan_policy,
    }
    _state_spec: ClassVar[Mapping[str, str]] = {
        "threshold_": "float",
        "guarantee_met_": "bool",
        "edge_error_upper_bound_": "float",
        "empirical_edge_error_": "float",
        "expected_cloud_fraction_": "float",
        "n_kept_": "int",
    }

    def __init__(
        self,
        *,
        max_edge_error: float,
        delta: float = 0.1,
        grid_size: int = 1001,
        nan_policy: str = "escalate",
    ) -> None:
        self.max_edge_error = max_edge_error
        self.delta = delta
        self.grid_size = grid_size
        self.nan_policy = nan_policy

    def _fit(self, p: np.ndarray, labels: np.ndarray | None, params: dict[str, Any]) -> None:
        from scipy.stats import beta, binom

        owner = type(self).__name__
        if labels is None:
            raise InvalidParameterError(
                f"The 'labels' parameter of {owner}.fit is required: call fit(p_good, labels) "
                "with 1 where the edge answer was good."
            )
        alpha, delta = params["max_edge_error"], params["delta"]
        n = p.size
        bad = labels == 0
        nan = np.isnan(p)
        base_m = base_e = 0
        if params["nan_policy"] == "edge":
            base_m, base_e = int(nan.sum()), int(bad[nan].sum())
        order = np.argsort(p[~nan], kind="stable")
        sorted_p = p[~nan][order]
        bad_before = np.concatenate([[0], np.cumsum(bad[~nan][order])])
        grid = np.linspace(1.0, 0.0, params["grid_size"])
        idx = np.searchsorted(sorted_p, grid, side="left")
        m = (sorted_p.size - idx) + base_m
        e = (bad_before[-1] - bad_before[idx]) + base_e
        pvals = np.where(m > 0, binom.cdf(e, np.maximum(m, 1), alpha), 1.0)
        # Smallest kept count for which zero errors could reject: (1 - alpha)^m <= delta.
        m_min = math.ceil(math.log(delta) / math.log1p(-alpha))
        chosen = -1
        testable = np.flatnonzero(m >= m_min)
        if testable.size:
            for j in range(int(testable[0]), grid.size):
                if pvals[j] > delta:
                    break
                chosen = j
        if chosen < 0:
            warnings.warn(
                f"RiskControlPolicy: no threshold certifies an edge error <= {_pct(alpha)} with "
                f"probability >= {1 - delta:.3g} on these {n} held-out answers; every request "
                "will be escalated. Use more calibration data, a larger max_edge_error or delta.",
                UserWarning,
                stacklevel=3,
            )
            self.threshold_ = 1.0
            self.guarantee_met_ = False
            self.edge_error_upper_bound_ = 0.0
            self.empirical_edge_error_ = 0.0
            self.expected_cloud_fraction_ = 1.0
            self.n_kept_ = 0
            return
        mj, ej = int(m[chosen]), int(e[chosen])
        self.threshold_ = float(grid[chosen])
        self.guarantee_met_ = True
        self.edge_error_upper_bound_ = float(beta.ppf(1 - delta, ej + 1, mj - ej))
        self.empirical_edge_error_ = ej / mj
        self.expected_cloud_fraction_ = 1.0 - mj / n
        self.n_kept_ = mj

    def _decide(self, p: np.ndarray, cost: Any, params: dict[str, Any]) -> np.ndarray:
        if not self.guarantee_met_:
            return np.ones(p.shape, dtype=bool)
        nan = np.isnan(p)
        out = np.zeros(p.shape, dtype=bool)
        out[~nan] = p[~nan] < self.threshold_
        out[nan] = params["nan_policy"] == "escalate"
        return out

    def _explain(self, p: float, escalate: bool, cost: float | None) -> str:
        alpha = float(self.max_edge_error)
        if not self.guarantee_met_:
            return (f"risk control: no threshold certifies edge error <= {_pct(alpha)} at delta "
                    f"{float(self.delta):.3g}; escalated")
        if math.isnan(p):
            return self._nan_reason(escalate)
        t = self.threshold_
        if p >= t:
            return (f"p_good {p:.2f} >= risk-controlled threshold {t:.3f} (edge error <= "
                    f"{_pct(alpha)} w.p. >= {1 - float(self.delta):.3g})")
        return f"p_good {p:.2f} < risk-controlled threshold {t:.3f}"
