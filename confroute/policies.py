"""Routing policies: keep the edge answer or escalate to the cloud.

A policy receives calibrated probabilities ``p_good`` (from a
:class:`~confroute.calibration.Calibrator`) and returns, per request, ``True`` to
escalate to the cloud model and ``False`` to keep the edge answer. NaN
``p_good`` (the estimator could not score) is escalated unless
``nan_policy="edge"``.

Two families:

- **Stateless policies** (:class:`ThresholdPolicy`, :class:`RiskControlPolicy`)
  decide each request from its ``p_good`` alone.
- **Online policies** (:class:`OnlinePolicy`: :class:`BudgetPolicy`,
  :class:`CostAwarePolicy`) own a thread-safe *ledger* and, when
  :attr:`OnlinePolicy.enforced`, decide one request at a time in arrival order
  with :meth:`OnlinePolicy.admit`, so a budget is a guarantee, not an
  expectation. ``settle(ticket, spent=False)`` gives back an escalation whose
  cloud call failed; ``settle(ticket, True, cost=...)`` records the real spend.

**Budgets are guarantees by default.** ``BudgetPolicy(max_cloud_fraction=b)``
enforces ``enforce="total"``: at every prefix of the arrival order the cloud
count is at most :math:`\\lfloor b N \\rfloor`. The fitted threshold alone (a
target share on held-out data, not a promise) is available as
``enforce="none"`` or by the name ``"budget_threshold"``
(:class:`BudgetThresholdPolicy`).

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

import bisect
import math
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar, TypeVar

import numpy as np

from confroute._params import ParamCheck, ParamsMixin, read_state, validate_params
from confroute._registry import Registry
from confroute._stats import (
    budget_allowance,
    clopper_pearson,
    clopper_pearson_upper,
    exact_fraction,
)
from confroute._validation import (
    check_array,
    check_choice,
    check_float,
    check_int,
    check_labels,
    check_same_length,
    param_error,
)
from confroute.errors import InvalidParameterError, NotFittedError
from confroute.ledgers import (
    FAILURE_MODES,
    Ledger,
    LedgerSnapshot,
    LedgerSpec,
    MemoryLedger,
    RedisLedger,
    Ticket,
    check_ledger_url,
    make_ticket,
)

__all__ = [
    "BudgetPolicy",
    "BudgetThresholdPolicy",
    "CostAwarePolicy",
    "LedgerSnapshot",
    "LedgerSpec",
    "MemoryLedger",
    "OnlinePolicy",
    "Policy",
    "RedisLedger",
    "RiskControlPolicy",
    "ThresholdPolicy",
    "Ticket",
    "policy_registry",
]

_P = TypeVar("_P", bound="Policy")
_NAN_POLICIES = ("escalate", "edge")
_ENFORCE_MODES = ("none", "total", "window", "period")
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


MAX_WINDOW = 10_000_000
"""Largest ``window`` of a BudgetPolicy: its ring buffer holds one byte per request (10 MB)."""

MAX_GRID_SIZE = 1_000_000
"""Largest ``grid_size`` of a RiskControlPolicy: a few float arrays of this length (~8 MB each)."""


def _c_window(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=1, max_value=MAX_WINDOW)


def _c_grid(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=2, max_value=MAX_GRID_SIZE)


def _c_enforce(value: Any, name: str, owner: str) -> str:
    return check_choice(value, name, owner, _ENFORCE_MODES)


def _c_period(value: Any, name: str, owner: str) -> float | None:
    return check_float(value, name, owner, min_value=0.0, min_inclusive=False, allow_none=True)


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


# ---------------------------------------------------------------------------------------
# parameter checks of the ledger (shared by the online policies)
def _c_ledger(value: Any, name: str, owner: str) -> str | None:
    return check_ledger_url(value, name, owner)


def _c_ledger_key(value: Any, name: str, owner: str) -> str:
    if not isinstance(value, str) or not value:
        raise param_error(name, owner, "a non-empty str (prefix of the Redis keys)", value)
    return value


def _c_failure_mode(value: Any, name: str, owner: str) -> str:
    return check_choice(value, name, owner, FAILURE_MODES)


_ADAPT_MIN = 50  # recent scores needed before an adaptive threshold replaces the fitted one


def _c_adapt_window(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=0, max_value=1_000_000)


def _c_nonneg_int(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=0)


_LEDGER_CHECKS: Mapping[str, ParamCheck] = {
    "ledger": _c_ledger,
    "ledger_key": _c_ledger_key,
    "ledger_failure_mode": _c_failure_mode,
    "ledger_emergency_allowance": _c_nonneg_int,
}


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
        values = read_state(state, self._state_spec, type(self).__name__)
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
        return validate_params(self, self._param_checks)

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
class OnlinePolicy(Policy):
    """A policy that owns a thread-safe ledger and can decide requests one at a time.

    Subclasses supply the rule (:meth:`_wants`), the default cloud cost of a
    request (:meth:`_default_cost`), what the ledger enforces (:meth:`_ledger_spec`)
    and :attr:`enforced`; the ledger itself lives here.

    When :attr:`enforced` is true, :meth:`admit` decides one request at a time:
    it escalates only if the rule asks for it *and* the ledger's budget allows
    it after counting the request, all under one lock, so concurrent callers
    see a single arrival order and the budget holds exactly. :meth:`decide` on
    a batch then admits its requests one by one, in order; when not enforced it
    is pure (``admit`` still counts, but never refuses).

    The ledger is created on first use, at :meth:`fit`, :meth:`reset` and after
    :meth:`set_params`, from the parameters of that moment. Tickets issued
    before a reset (or before a period boundary) can no longer be settled.
    """

    # -- public API -----------------------------------------------------------------------
    @property
    @abstractmethod
    def enforced(self) -> bool:
        """True if the ledger enforces a budget (admissions may be refused)."""

    def admit(self, p_good: float, *, cost: float | None = None) -> Ticket:
        """Decide one request online, counting it in the ledger.

        Parameters
        ----------
        p_good : float
            Calibrated P(good) of the request (NaN if unscorable).
        cost : float >= 0, optional
            Cloud cost of this request, reserved in the spend ledger if it
            escalates (default: the policy's default cost, 0 for
            :class:`BudgetPolicy`, ``cloud_cost`` for :class:`CostAwarePolicy`).

        Returns
        -------
        Ticket
            ``ticket.escalate`` is the decision; pass the ticket to :meth:`settle`
            once the cloud call is done (or failed).
        """
        params = self._params()
        self._check_fitted()
        p = self._check_p([p_good], "p_good", allow_empty=False)
        c = self._costs(None if cost is None else [cost], 1, params)
        with self._lock:
            return self._admit_one(float(p[0]), float(c[0]), params)

    def settle(self, ticket: Ticket, spent: bool, *, cost: float | None = None) -> bool:
        """Record how an admitted request ended.

        ``spent=False`` (the cloud call failed) un-counts the escalation and
        refunds its reserved cost, so the ledger counts only what was spent.
        ``spent=True`` with ``cost`` replaces the reservation by the real spend
        (the difference is refunded or charged; later admissions see it).
        Settling twice, settling a kept request, or settling a ticket from before
        a reset or period boundary changes nothing.

        Parameters
        ----------
        ticket : Ticket
            What :meth:`admit` returned.
        spent : bool
            True if the cloud call happened (and may have been billed).
        cost : float >= 0, optional
            The real cloud spend of the request, when known.

        Returns
        -------
        bool
            True if the ledger changed.
        """
        owner = f"{type(self).__name__}.settle"
        if not isinstance(ticket, Ticket):
            raise InvalidParameterError(
                f"The 'ticket' parameter of {owner} must be a Ticket returned by admit(). "
                f"Got {type(ticket).__name__}."
            )
        c = check_float(cost, "cost", owner, min_value=0.0, allow_none=True)
        with self._lock:
            return self._ledger_locked(self._params()).settle(ticket, bool(spent), c)

    def reset(self) -> None:
        """Empty the ledger and re-read its parameters (budget, mode, window, period).

        Tickets issued before the reset can no longer be settled. With a shared
        ``ledger`` (Redis) this empties the counts of **every** process sharing
        ``ledger_key``.
        """
        params = self._params()
        self._check_fitted()
        led = self._build_ledger(params)
        led.reset()
        with self._lock:
            self.__dict__["_ledger_obj"] = led
            self.__dict__.pop("_recent_obj", None)

    def snapshot(self) -> LedgerSnapshot:
        """Counts of the ledger now (since the last reset or period boundary).

        With a shared ``ledger`` the counts are those of all processes;
        ``store_up`` is False while Redis is unreachable.
        """
        params = self._params()
        self._check_fitted()
        with self._lock:
            return self._ledger_locked(params).snapshot()

    def set_params(self, **params: Any) -> OnlinePolicy:
        """Set parameters (see :meth:`get_params`); the ledger starts afresh with them."""
        super().set_params(**params)
        with self._lock:
            self.__dict__.pop("_ledger_obj", None)
            self.__dict__.pop("_recent_obj", None)
        return self

    # -- hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _wants(self, p: np.ndarray, c: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """The rule alone: True where a request would escalate without a budget."""

    @abstractmethod
    def _ledger_spec(self, params: dict[str, Any]) -> LedgerSpec:
        """What the ledger enforces, from validated parameters."""

    def _default_cost(self, params: dict[str, Any]) -> float:
        return 0.0

    # -- helpers --------------------------------------------------------------------------
    def _observe(self, p: float, params: dict[str, Any]) -> None:
        """Record one arriving request's ``p_good`` before its decision (caller holds the lock).

        The base rule learns nothing from traffic; see :meth:`_stateful`.
        """

    def _stateful(self, params: dict[str, Any]) -> bool:
        """True if the rule learns from the requests it sees (see :meth:`_observe`)."""
        return False

    def _decide(self, p: np.ndarray, cost: Any, params: dict[str, Any]) -> np.ndarray:
        c = self._costs(cost, p.size, params)
        if not self.enforced and not self._stateful(params):
            return self._wants(p, c, params)
        with self._lock:
            return np.array(
                [self._admit_one(float(p[i]), float(c[i]), params).escalate
                 for i in range(p.size)],
                dtype=bool,
            )

    def _admit_one(self, p: float, c: float, params: dict[str, Any]) -> Ticket:
        """Admit one validated request; the caller holds the lock."""
        self._observe(p, params)
        wanted = bool(self._wants(np.array([p]), np.array([c]), params)[0])
        adm = self._ledger_locked(params).admit(wanted, Fraction(c))
        return make_ticket(adm, p_good=p, wanted=wanted, cost=c,
                           reason=self._explain(p, adm.escalate, c))

    def _costs(self, cost: Any, n: int, params: dict[str, Any]) -> np.ndarray:
        """Per-request cloud costs, shape (n,), from None, a float or an array."""
        if cost is None:
            return np.full(n, float(self._default_cost(params)))
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

    def _ledger_locked(self, params: dict[str, Any]) -> Ledger:
        led = self.__dict__.get("_ledger_obj")
        if led is None:
            led = self._build_ledger(params)
            self.__dict__["_ledger_obj"] = led
        return led

    def _build_ledger(self, params: dict[str, Any]) -> Ledger:
        """In-process ledger, or a connection to the shared one named by ``ledger``.

        A shared ledger is not emptied here (a starting replica joins the shared
        counts); only :meth:`reset` empties it.
        """
        spec = self._ledger_spec(params)
        url = params.get("ledger")
        if url is None:
            return MemoryLedger(spec, time.monotonic())
        return RedisLedger(url, spec=spec, key=params["ledger_key"],
                           failure_mode=params["ledger_failure_mode"],
                           emergency_allowance=params["ledger_emergency_allowance"])

    def _new_ledger(self, params: dict[str, Any]) -> None:
        led = self._build_ledger(params)
        with self._lock:
            self.__dict__["_ledger_obj"] = led

    # The lock is created lazily so the constructor only stores parameters; it is
    # dropped on copy/pickle and recreated.
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


class _RecentScores:
    """The last ``size`` finite ``p_good`` values, kept sorted (O(size) per update)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def add(self, p: float) -> None:
        if math.isnan(p):
            return
        if len(self.order) == self.size:
            old = self.order.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]
        self.order.append(p)
        bisect.insort(self.sorted, p)

    def rule(self, budget: Fraction) -> tuple[float, float]:
        """``(v, q)``: escalate ``p < v``, and ``p == v`` with probability ``q``.

        With m = floor(budget * n) of the n recent values allowed to escalate, v
        is the m-th smallest and q shares the remaining places among the values
        tied at v, so the expected share is exactly m / n even when isotonic
        calibration ties many ``p_good`` (``(-inf, 0)`` when m = 0).
        """
        n = len(self.sorted)
        m = budget_allowance(budget, n)
        if m == 0:
            return -math.inf, 0.0
        v = self.sorted[m - 1]
        below = bisect.bisect_left(self.sorted, v)
        tied = bisect.bisect_right(self.sorted, v) - below
        return v, (m - below) / tied


# ---------------------------------------------------------------------------------------
@policy_registry.register("budget")
class BudgetPolicy(OnlinePolicy):
    r"""Escalate the least confident requests, never more than a share of the traffic.

    **Guarantee (default).** With ``enforce="total"`` (the default) requests are
    admitted one at a time through an exact, thread-safe ledger: a request
    escalates only if the fitted rule says so *and* after it the number of
    escalations counted so far is at most :math:`\lfloor b N \rfloor`, where
    :math:`N` counts every request since the last :meth:`reset` and :math:`b` =
    ``max_cloud_fraction``. So the realised cloud share never exceeds :math:`b`
    at **any prefix** of the arrival order, whatever the traffic, its drift or
    the calibration quality. Failed cloud calls given back with
    ``settle(ticket, spent=False)`` are not counted, which keeps the bound on
    what was really spent.

    **Why all-time is the default.** It is the only mode whose promise holds at
    every prefix of the traffic: a sliding window bounds each window but lets
    the all-time share drift (a request that escalates when an old escalation
    leaves the window), and a period mode restarts its count at each boundary,
    so the first requests of a period may all escalate. Both are useful (a
    per-minute rate, a daily quota) and are opt-in:

    - ``enforce="window"``: at most :math:`\lfloor b \min(N, W) \rfloor`
      escalations among the last :math:`W` = ``window`` requests;
    - ``enforce="period"``: the ledger's counts restart every ``period``
      seconds (boundaries at ``start + k * period`` on :func:`time.monotonic`,
      ``start`` being the fit, reset or first use); within a period the all-time
      rule holds for the requests of that period;
    - ``enforce="none"``: no ledger limit, only the fitted threshold below,
      which aims at a share :math:`b` on traffic like the held-out set but
      **is not a guarantee** (also registered as ``"budget_threshold"``,
      :class:`BudgetThresholdPolicy`).

    With enforcement on, :meth:`decide` on a batch admits its requests one by
    one, in order (it changes the ledger); with ``enforce="none"`` it is pure.
    :math:`b` is taken as the decimal written (0.29 is 29/100), in exact
    arithmetic.

    **Threshold.** :meth:`fit` learns the largest threshold :math:`t` such that
    the share of held-out requests that escalate (:math:`p_i < t`, or NaN) is at
    most :math:`b`: with :math:`k = \lfloor b n \rfloor` escalations allowed and
    :math:`n_{\mathrm{NaN}}` NaN values, the :math:`m = k - n_{\mathrm{NaN}}`
    smallest finite values escalate; ``t`` is the midpoint between the m-th and
    (m+1)-th smallest finite values (or the (m+1)-th itself when they tie, so
    ties never push the share over :math:`b`; 0 when m = 0; 1 when every finite
    value may escalate, so ``p_good == 1`` is never escalated). The ledger then
    refuses escalations the threshold asks for beyond the budget.

    **Interval.** ``cloud_fraction_interval_`` is the two-sided Clopper–Pearson
    interval [2]_ at level ``confidence`` for the cloud share that new traffic
    drawn like the held-out set will see under the threshold alone, computed
    from the :math:`x` held-out escalations out of :math:`n`:

    .. math::

        \Bigl[\,B^{-1}_{x,\,n-x+1}\bigl(\tfrac{1-c}{2}\bigr),\;
        B^{-1}_{x+1,\,n-x}\bigl(\tfrac{1+c}{2}\bigr)\Bigr].

    Although :math:`t` is chosen from the same data, this is exact (conservative)
    for continuous ``p_good`` without NaN: :math:`t` lies between the m-th and
    (m+1)-th order statistics, whose population CDF values are
    :math:`\mathrm{Beta}(m, n-m+1)` and :math:`\mathrm{Beta}(m+1, n-m)`
    distributed, and these are exactly the two Clopper–Pearson limits with
    :math:`x = m`. With ties or NaN it is the usual binomial approximation.

    Parameters
    ----------
    max_cloud_fraction : float in [0, 1]
        Budget :math:`b`: the largest share of requests sent to the cloud.
    enforce : {"total", "window", "period", "none"}, default="total"
        Online enforcement mode (see above).
    window : int in [1, 10_000_000], default=1000
        Sliding-window length for ``enforce="window"``. Bounded because the
        ledger keeps one byte per request of the window (at most 10 MB).
    period : float > 0 or None, default=None
        Seconds per period for ``enforce="period"`` (required there).
    confidence : float in (0, 1), default=0.95
        Level of ``cloud_fraction_interval_``.
    nan_policy : {"escalate", "edge"}, default="escalate"
    ledger : str or None, default=None
        None: the in-process ledger (exact inside this process). A Redis URL
        (``"redis://127.0.0.1:6379/0"``): the shared :class:`RedisLedger`, so
        every process using the same URL and ``ledger_key`` enforces one exact
        budget. The budget parameters are stored with it; a policy with other
        ones on the same key gets an error naming ``ledger``. Unreachable at
        the first use (fit, reset): :class:`~confroute.errors.LedgerUnavailableError`.
    ledger_key : str, default="confroute:ledger"
        Prefix of the Redis keys of the shared ledger.
    ledger_failure_mode : {"fail_closed", "fail_open"}, default="fail_closed"
        While Redis is unreachable later: keep every answer on the edge, or let
        up to ``ledger_emergency_allowance`` escalations through (counted locally).
    ledger_emergency_allowance : int >= 0, default=0
        Escalations this process may make while Redis is unreachable (``fail_open``).
    adapt_window : int in [0, 1_000_000], default=0
        0: the fitted ``threshold_`` decides which requests want the cloud. W > 0:
        the threshold **follows the traffic**: it is refitted, by the same rule as
        :meth:`fit`, on the ``p_good`` of the last W requests seen by
        :meth:`admit` / :meth:`decide` (the current one included), as soon as
        ``min(W, 50)`` of them are known (``threshold_`` before). A request then
        wants the cloud when it is among the least confident ``max_cloud_fraction``
        of recent traffic, so after a shift that lowers every ``p_good`` the
        budget goes to the least confident requests instead of to whichever
        arrive first. The ledger's guarantee is unchanged. The window lives in
        this process (each replica adapts to the traffic it sees); :meth:`reset`
        empties it. See :meth:`current_threshold`.

    Attributes
    ----------
    threshold_ : float
        The fitted rule: escalate when ``p_good < threshold_`` (if the budget
        allows; with ``adapt_window`` only until the window has filled).
    calibration_cloud_fraction_ : float
        Share of held-out requests that escalate at ``threshold_`` (<= budget).
    cloud_fraction_interval_ : ndarray of shape (2,)
        Confidence interval for the cloud share of the threshold on similar traffic.
    n_calibration_ : int

    Examples
    --------
    >>> pol = BudgetPolicy(max_cloud_fraction=0.2).fit(held_out_p_good)  # doctest: +SKIP
    >>> ticket = pol.admit(0.1)  # doctest: +SKIP
    >>> pol.settle(ticket, spent=not cloud_call_failed)  # doctest: +SKIP
    """

    requires_fit: ClassVar[bool] = True
    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "max_cloud_fraction": _c_unit,
        "enforce": _c_enforce,
        "window": _c_window,
        "period": _c_period,
        "confidence": _c_open_unit,
        "nan_policy": _c_nan_policy,
        **_LEDGER_CHECKS,
        "adapt_window": _c_adapt_window,
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
        enforce: str = "total",
        window: int = 1000,
        period: float | None = None,
        confidence: float = 0.95,
        nan_policy: str = "escalate",
        ledger: str | None = None,
        ledger_key: str = "confroute:ledger",
        ledger_failure_mode: str = "fail_closed",
        ledger_emergency_allowance: int = 0,
        adapt_window: int = 0,
    ) -> None:
        self.max_cloud_fraction = max_cloud_fraction
        self.adapt_window = adapt_window
        self.enforce = enforce
        self.window = window
        self.period = period
        self.confidence = confidence
        self.nan_policy = nan_policy
        self.ledger = ledger
        self.ledger_key = ledger_key
        self.ledger_failure_mode = ledger_failure_mode
        self.ledger_emergency_allowance = ledger_emergency_allowance

    @property
    def enforced(self) -> bool:
        """True unless ``enforce="none"``."""
        return bool(self.enforce != "none")

    # -- fit ------------------------------------------------------------------------------
    def _fit(self, p: np.ndarray, labels: np.ndarray | None, params: dict[str, Any]) -> None:


        n = p.size
        budget = exact_fraction(params["max_cloud_fraction"])
        k = budget_allowance(budget, n)
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
            t = _budget_threshold(finite, k - n_nan)
        x = int(np.count_nonzero(finite < t)) + n_nan
        c = params["confidence"]
        lo, hi = clopper_pearson(x, n, c)
        self.threshold_ = t
        self.calibration_cloud_fraction_ = x / n
        self.cloud_fraction_interval_ = np.array([lo, hi])
        self.n_calibration_ = n
        self._new_ledger(params)

    def _set_state(self, values: dict[str, Any]) -> None:
        super()._set_state(values)
        self._new_ledger(self._params())

    def _params(self) -> dict[str, Any]:
        params = super()._params()
        if params["enforce"] == "period" and params["period"] is None:
            raise InvalidParameterError(
                f"The 'period' parameter of {type(self).__name__} must be a float > 0 (seconds "
                "per period) when enforce='period'. Got None."
            )
        return params

    # -- online hooks ---------------------------------------------------------------------
    def _ledger_spec(self, params: dict[str, Any]) -> LedgerSpec:
        mode = params["enforce"]
        return LedgerSpec(
            share=None if mode == "none" else exact_fraction(params["max_cloud_fraction"]),
            window=params["window"] if mode == "window" else None,
            period=params["period"] if mode == "period" else None,
        )

    def current_threshold(self) -> float:
        """The threshold deciding now: ``threshold_``, or the one adapted to recent traffic.

        Returns
        -------
        float
            ``threshold_`` unless ``adapt_window`` > 0 and the window holds at
            least ``min(adapt_window, 50)`` finite ``p_good`` values.
        """
        rule = self._adaptive_rule()
        return float(self.threshold_) if rule is None else rule[0]

    def _adaptive_rule(self) -> tuple[float, float] | None:
        """``(v, q)`` of the window (see :class:`_RecentScores`), or None before it fills."""
        self._check_fitted()
        recent = self.__dict__.get("_recent_obj")
        w = int(self.adapt_window)
        if not w or recent is None or len(recent.sorted) < min(w, _ADAPT_MIN):
            return None
        return recent.rule(exact_fraction(self.max_cloud_fraction))

    def _stateful(self, params: dict[str, Any]) -> bool:
        return bool(params["adapt_window"])

    def _observe(self, p: float, params: dict[str, Any]) -> None:
        w = params["adapt_window"]
        if not w:
            return
        recent = self.__dict__.get("_recent_obj")
        if recent is None or recent.size != w:
            recent = self.__dict__["_recent_obj"] = _RecentScores(w)
        recent.add(p)

    def _wants(self, p: np.ndarray, c: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        out = np.zeros(p.shape, dtype=bool)
        nan = np.isnan(p)
        rule = self._adaptive_rule()
        if rule is None:
            out[~nan] = p[~nan] < self.threshold_
        else:
            v, q = rule
            rng = self.__dict__.setdefault("_tie_rng", np.random.default_rng(0))
            tied = p == v
            out = (p < v) | (tied & (rng.random(p.shape) < q))
        out[nan] = params["nan_policy"] == "escalate"
        return out

    def _explain(self, p: float, escalate: bool, cost: float | None) -> str:
        t = self.current_threshold()
        adaptive = self._adaptive_rule() is not None
        tie = adaptive and p == t  # tied requests share the last places at random
        wanted = self._nan_escalates() if math.isnan(p) else (escalate if tie else p < t)
        limit = _pct(float(self.max_cloud_fraction))
        adapted = " (adapted to recent traffic)" if adaptive else ""
        base = self._nan_reason(wanted) if math.isnan(p) else (
            f"p_good {p:.2f} {'<' if p < t else '>='} threshold {t:.2f}{adapted}"
            + (", tied: drawn at random for the budget's last places" if tie else "")
        )
        if not self.enforced:
            return (f"{base} (a threshold fitted to a {limit} cloud share on held-out data, "
                    "not a guarantee)")
        if wanted and not escalate:
            where = {"window": "in the window", "period": "in this period"}.get(
                str(self.enforce), "so far")
            return f"budget: cloud share at limit {limit} {where}, kept on edge ({base})"
        return base


def _budget_threshold(finite: np.ndarray, m: int) -> float:
    """Threshold letting the ``m`` smallest of the sorted ``finite`` values escalate."""
    if m == 0:
        return 0.0
    if m >= finite.size:
        return 1.0
    if finite[m - 1] < finite[m]:
        return float((finite[m - 1] + finite[m]) / 2.0)
    return float(finite[m])


@policy_registry.register("budget_threshold")
class BudgetThresholdPolicy(BudgetPolicy):
    """A :class:`BudgetPolicy` threshold with no ledger: a target share, **not a guarantee**.

    The threshold is fitted so that a share ``max_cloud_fraction`` of held-out
    requests escalates; new traffic that differs from the held-out set (drift,
    bursts of hard queries) can escalate more. Use :class:`BudgetPolicy` (its
    default ``enforce="total"``) for a budget that holds at every prefix of the
    traffic. Equivalent to ``BudgetPolicy(..., enforce="none")``; :meth:`decide`
    is pure.

    Parameters
    ----------
    max_cloud_fraction : float in [0, 1]
        Target share of requests sent to the cloud on traffic like the held-out set.
    confidence : float in (0, 1), default=0.95
        Level of ``cloud_fraction_interval_``.
    nan_policy : {"escalate", "edge"}, default="escalate"
    """

    def __init__(
        self,
        *,
        max_cloud_fraction: float,
        confidence: float = 0.95,
        nan_policy: str = "escalate",
    ) -> None:
        super().__init__(max_cloud_fraction=max_cloud_fraction, enforce="none",
                         confidence=confidence, nan_policy=nan_policy)


# ---------------------------------------------------------------------------------------
@policy_registry.register("cost_aware")
class CostAwarePolicy(OnlinePolicy):
    r"""Escalate when the expected quality gain is worth the extra cost.

    .. math::

        \text{escalate}_i = \bigl[(q_c - p_i)\,V > c_i - c_e\bigr],

    with :math:`q_c` = ``p_cloud_good`` (probability the cloud answer is good),
    :math:`V` = ``quality_value`` (value of a good rather than a bad answer),
    :math:`c_i` the cloud cost of request i (``cloud_cost``, or ``cost[i]`` when
    passed to :meth:`decide`) and :math:`c_e` = ``edge_cost``. **Units:** all of
    ``edge_cost``, ``cloud_cost``, ``cost``, ``quality_value`` and
    ``spend_budget`` share one unit of your choice (dollars, tokens, ...).

    **Spend cap.** With ``spend_budget`` set the policy is :attr:`enforced`:
    requests are admitted one at a time through the thread-safe ledger of
    :class:`OnlinePolicy`; an escalation happens only if the cloud spend
    counted so far plus :math:`c_i` stays <= ``spend_budget`` (exact rational
    arithmetic), so the counted spend never exceeds the budget.
    ``settle(ticket, spent=False)`` refunds a failed cloud call;
    ``settle(ticket, True, cost=real)`` replaces the reservation by the real
    spend (a real spend above the reservation can push the counted spend over
    the cap by that difference; later requests are then refused). Only cloud
    spend is counted. :meth:`decide` is pure without ``spend_budget``.

    **Period.** With ``period`` (seconds) the spend count restarts at every
    period boundary (``start + k * period`` on :func:`time.monotonic`, ``start``
    being the first use or :meth:`reset`): ``spend_budget`` is then a budget
    per period, e.g. ``period=86400`` for a daily budget.

    Parameters
    ----------
    edge_cost, cloud_cost : float >= 0, defaults 0 and 1
    quality_value : float >= 0, default=10.0
    p_cloud_good : float in [0, 1], default=1.0
    spend_budget : float >= 0 or None, default=None
    period : float > 0 or None, default=None
        Seconds per spend period (None: one period for the ledger's whole life).
    nan_policy : {"escalate", "edge"}, default="escalate"
    ledger : str or None, default=None
        None: the in-process ledger (exact inside this process). A Redis URL
        (``"redis://127.0.0.1:6379/0"``): the shared :class:`RedisLedger`, so
        every process using the same URL and ``ledger_key`` enforces one exact
        budget. The budget parameters are stored with it; a policy with other
        ones on the same key gets an error naming ``ledger``. Unreachable at
        the first use (fit, reset): :class:`~confroute.errors.LedgerUnavailableError`.
    ledger_key : str, default="confroute:ledger"
        Prefix of the Redis keys of the shared ledger.
    ledger_failure_mode : {"fail_closed", "fail_open"}, default="fail_closed"
        While Redis is unreachable later: keep every answer on the edge, or let
        up to ``ledger_emergency_allowance`` escalations through (counted locally).
    ledger_emergency_allowance : int >= 0, default=0
        Escalations this process may make while Redis is unreachable (``fail_open``).
    """

    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "edge_cost": _c_nonneg,
        "cloud_cost": _c_nonneg,
        "quality_value": _c_nonneg,
        "p_cloud_good": _c_unit,
        "spend_budget": _c_nonneg_or_none,
        "period": _c_period,
        "nan_policy": _c_nan_policy,
        **_LEDGER_CHECKS,
    }

    def __init__(
        self,
        *,
        edge_cost: float = 0.0,
        cloud_cost: float = 1.0,
        quality_value: float = 10.0,
        p_cloud_good: float = 1.0,
        spend_budget: float | None = None,
        period: float | None = None,
        nan_policy: str = "escalate",
        ledger: str | None = None,
        ledger_key: str = "confroute:ledger",
        ledger_failure_mode: str = "fail_closed",
        ledger_emergency_allowance: int = 0,
    ) -> None:
        self.edge_cost = edge_cost
        self.cloud_cost = cloud_cost
        self.quality_value = quality_value
        self.p_cloud_good = p_cloud_good
        self.spend_budget = spend_budget
        self.period = period
        self.nan_policy = nan_policy
        self.ledger = ledger
        self.ledger_key = ledger_key
        self.ledger_failure_mode = ledger_failure_mode
        self.ledger_emergency_allowance = ledger_emergency_allowance

    @property
    def enforced(self) -> bool:
        """True when ``spend_budget`` is set."""
        return self.spend_budget is not None

    def _default_cost(self, params: dict[str, Any]) -> float:
        return float(params["cloud_cost"])

    def _ledger_spec(self, params: dict[str, Any]) -> LedgerSpec:
        budget = params["spend_budget"]
        return LedgerSpec(spend_cap=None if budget is None else Fraction(budget),
                           period=params["period"])

    def _wants(self, p: np.ndarray, c: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        gain = (params["p_cloud_good"] - p) * params["quality_value"]
        out = gain > c - params["edge_cost"]
        out[np.isnan(p)] = params["nan_policy"] == "escalate"
        return np.asarray(out, dtype=bool)

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
    grid_size : int in [2, 1_000_000], default=1001
        Number of candidate thresholds (spacing 1 / (grid_size - 1)). Bounded
        because fitting holds a few float arrays of this length (about 8 MB each).
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
        from scipy.stats import binom

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
        self.edge_error_upper_bound_ = clopper_pearson_upper(ej, mj, 1 - delta)
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
