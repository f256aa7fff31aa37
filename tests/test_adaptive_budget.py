"""BudgetPolicy(adapt_window=W): the threshold follows recent traffic (issue 12).

After a shift that lowers every p_good, a fixed threshold makes every request
want the cloud and the ledger admits them first come, first served; with an
adaptive window the budget goes to the least confident share of recent traffic.
The ledger's cap holds in both cases at every prefix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.policies import BudgetPolicy

CAL = np.linspace(0.3, 1.0, 200)  # calibration: threshold near 0.51 for a 30% share


def _shifted(n: int, seed: int = 0) -> np.ndarray:
    """Shifted traffic: every p_good under the fitted threshold, heavily tied (isotonic)."""
    return np.round(np.random.default_rng(seed).uniform(0.0, 0.4, n), 1)


def _route(policy: BudgetPolicy, traffic: np.ndarray) -> np.ndarray:
    return np.array([policy.admit(float(p)).escalate for p in traffic])


def _max_prefix_excess(esc: np.ndarray, b: float) -> int:
    k = np.cumsum(esc)
    n = np.arange(1, esc.size + 1)
    return int(np.max(k - np.floor(b * n + 1e-12)))


def test_adaptive_threshold_spends_the_budget_on_the_least_confident() -> None:
    traffic = _shifted(1000)
    fixed = BudgetPolicy(max_cloud_fraction=0.3).fit(CAL)
    adaptive = BudgetPolicy(max_cloud_fraction=0.3, adapt_window=200).fit(CAL)
    esc_fixed, esc_adapt = _route(fixed, traffic), _route(adaptive, traffic)
    for esc in (esc_fixed, esc_adapt):
        assert _max_prefix_excess(esc, 0.3) <= 0
    # fixed: first come, first served -> escalated and kept look alike
    assert abs(traffic[esc_fixed].mean() - traffic[~esc_fixed].mean()) < 0.03
    # adaptive: the escalated are the least confident, and the budget is (nearly) used
    assert traffic[esc_adapt].mean() < traffic[~esc_adapt].mean() - 0.15
    assert traffic[50:][esc_adapt[50:]].max() <= 0.1  # once the window holds 50 scores
    assert esc_adapt.mean() > 0.25


def test_ties_share_the_last_places_so_the_budget_is_used() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.3, adapt_window=100).fit(CAL)
    esc = _route(pol, np.full(2000, 0.2))  # every request tied
    assert _max_prefix_excess(esc, 0.3) <= 0
    assert 0.25 < esc.mean() <= 0.3


def test_fitted_threshold_until_the_window_has_enough_scores() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.3, adapt_window=500).fit(CAL)
    t = pol.threshold_
    for _ in range(49):
        pol.admit(0.2)
    assert pol.current_threshold() == t  # 49 < min(500, 50)
    pol.admit(0.2)
    assert pol.current_threshold() == pytest.approx(0.2)
    assert "adapted to recent traffic" in pol.admit(0.1).reason
    pol.reset()
    assert pol.current_threshold() == t


def test_nan_scores_do_not_enter_the_window() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.5, adapt_window=60, nan_policy="edge").fit(CAL)
    for _ in range(100):
        pol.admit(math.nan)
    assert pol.current_threshold() == pol.threshold_


def test_window_without_adaptation_is_the_old_behaviour() -> None:
    traffic = _shifted(300, seed=3)
    a = _route(BudgetPolicy(max_cloud_fraction=0.3).fit(CAL), traffic)
    b = _route(BudgetPolicy(max_cloud_fraction=0.3, adapt_window=0).fit(CAL), traffic)
    assert np.array_equal(a, b)


def test_adapt_window_round_trips_through_params_and_state() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.3, adapt_window=256).fit(CAL)
    clone = BudgetPolicy(**pol.get_params()).set_state(pol.get_state())
    assert clone.adapt_window == 256
    assert clone.threshold_ == pol.threshold_


@pytest.mark.parametrize("bad", [-1, 1_000_001, 2.5, "10", True])
def test_bad_adapt_window_is_a_typed_error(bad: object) -> None:
    with pytest.raises((InvalidParameterError, InvalidTypeError), match="adapt_window"):
        BudgetPolicy(max_cloud_fraction=0.3, adapt_window=bad).fit(CAL)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=300),
       st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0]), st.integers(1, 120))
def test_cap_holds_at_every_prefix_for_any_traffic(scores: list[float], b: float,
                                                   window: int) -> None:
    pol = BudgetPolicy(max_cloud_fraction=b, adapt_window=window).fit(CAL)
    esc = _route(pol, np.round(np.array(scores), 2))
    assert _max_prefix_excess(esc, b) <= 0
