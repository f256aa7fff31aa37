"""Tests of confroute.policies: contract suite, exact budgets, risk control, bad input."""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from confroute import _serialization
from confroute.errors import (
    InvalidParameterError,
    InvalidTypeError,
    NotFittedError,
    SerializationError,
)
from confroute.policies import (
    BudgetPolicy,
    BudgetThresholdPolicy,
    CostAwarePolicy,
    LedgerSnapshot,
    OnlinePolicy,
    Policy,
    RiskControlPolicy,
    ThresholdPolicy,
    Ticket,
    policy_registry,
)


def held_out(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Perfectly calibrated p_good ~ U(0, 1) with labels ~ Bernoulli(p_good)."""
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    return p, (rng.random(n) < p).astype(int)


FACTORIES: dict[str, Callable[[], Policy]] = {
    "threshold": lambda: ThresholdPolicy(min_p_good=0.6),
    "budget": lambda: BudgetPolicy(max_cloud_fraction=0.3, enforce="none"),
    "budget_threshold": lambda: BudgetThresholdPolicy(max_cloud_fraction=0.3),
    "cost_aware": lambda: CostAwarePolicy(cloud_cost=2.0, quality_value=5.0),
    "risk_control": lambda: RiskControlPolicy(max_edge_error=0.15, delta=0.1),
}


def test_registry_names() -> None:
    assert policy_registry.names() == sorted(FACTORIES)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_contract(name: str) -> None:
    p, y = held_out(0)
    pol = FACTORIES[name]()
    assert policy_registry.name_of(pol) == name
    assert pol.fit(p, y) is pol
    q = np.array([0.0, 0.2, 0.5, 0.97, 1.0, np.nan])
    out = pol.decide(q)
    assert out.dtype == np.bool_ and out.shape == (6,)
    assert out[-1]  # NaN escalates by default
    assert out[0] and not out[4]  # hopeless edge answers escalate, certain ones stay
    assert pol.decide(np.zeros(0)).shape == (0,)
    for v, e in zip(q, out, strict=True):
        assert isinstance(pol.explain(v, e), str) and pol.explain(v, e)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_clone_params_and_nan_policy_edge(name: str) -> None:
    p, y = held_out(1)
    pol = FACTORIES[name]()
    c = clone(pol.fit(p, y))
    assert type(c) is type(pol) and c.get_params() == pol.get_params()
    assert c.set_params(nan_policy="edge") is c
    c.fit(p, y)
    assert not c.decide([np.nan])[0]
    with pytest.raises(InvalidParameterError, match="nope"):
        c.set_params(nope=1)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_round_trip_through_json(name: str, tmp_path) -> None:
    p, y = held_out(2)
    pol = FACTORIES[name]().fit(p, y)
    path = tmp_path / "policy.json"
    _serialization.write_file(path, "policy", {
        "name": policy_registry.name_of(pol), "params": pol.get_params(deep=False),
        "state": pol.get_state(),
    })
    doc = _serialization.read_file(path, "policy")
    new = policy_registry.get_class(doc["name"])(**doc["params"]).set_state(doc["state"])
    q = np.random.default_rng(3).random(500)
    np.testing.assert_array_equal(new.decide(q), FACTORIES[name]().fit(p, y).decide(q))


@pytest.mark.parametrize(
    ("pol", "call"),
    [
        (BudgetPolicy(max_cloud_fraction=0.2), r"call fit\(p_good\) first"),
        (RiskControlPolicy(max_edge_error=0.1), r"call fit\(p_good, labels\) first"),
    ],
)
def test_unfitted(pol: Policy, call: str) -> None:
    assert pol.requires_fit
    with pytest.raises(NotFittedError, match=call):
        pol.decide([0.5])
    with pytest.raises(NotFittedError, match=call):
        pol.get_state()
    with pytest.raises(NotFittedError, match=call):
        pol.explain(0.5, True)


def test_unfitted_admit() -> None:
    with pytest.raises(NotFittedError, match="fit"):
        BudgetPolicy(max_cloud_fraction=0.2).admit(0.5)


@pytest.mark.parametrize("cls", [ThresholdPolicy, CostAwarePolicy])
def test_no_fit_needed(cls: type[Policy]) -> None:
    assert not cls.requires_fit
    assert cls().decide([0.1, 0.99]).tolist() == [True, False]


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pol", "exc", "match"),
    [
        (BudgetPolicy(max_cloud_fraction=1.5), InvalidParameterError,
         r"The 'max_cloud_fraction' parameter of BudgetPolicy must be a float in \[0, 1\]"),
        (BudgetPolicy(max_cloud_fraction=-0.1), InvalidParameterError, "'max_cloud_fraction'"),
        (BudgetPolicy(max_cloud_fraction="half"), InvalidTypeError, "'max_cloud_fraction'"),
        (BudgetPolicy(max_cloud_fraction=0.2, enforce="hard"), InvalidParameterError,
         "'enforce'"),
        (BudgetPolicy(max_cloud_fraction=0.2, window=0), InvalidParameterError, "'window'"),
        (BudgetPolicy(max_cloud_fraction=0.2, confidence=1.0), InvalidParameterError,
         "'confidence'"),
        (ThresholdPolicy(min_p_good=2.0), InvalidParameterError, "'min_p_good'"),
        (ThresholdPolicy(nan_policy="drop"), InvalidParameterError, "'nan_policy'"),
        (CostAwarePolicy(cloud_cost=-1.0), InvalidParameterError, "'cloud_cost'"),
        (CostAwarePolicy(p_cloud_good=1.2), InvalidParameterError, "'p_cloud_good'"),
        (CostAwarePolicy(spend_budget=-3.0), InvalidParameterError, "'spend_budget'"),
        (RiskControlPolicy(max_edge_error=0.0), InvalidParameterError, "'max_edge_error'"),
        (RiskControlPolicy(max_edge_error=0.1, delta=1.0), InvalidParameterError, "'delta'"),
        (RiskControlPolicy(max_edge_error=0.1, grid_size=1), InvalidParameterError,
         "'grid_size'"),
    ],
)
def test_bad_params(pol: Policy, exc: type[Exception], match: str) -> None:
    p, y = held_out(4, n=100)
    with pytest.raises(exc, match=match):
        pol.fit(p, y)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize(
    ("p_good", "labels", "match"),
    [
        ([0.2, np.inf, 0.9], [1, 0, 1], "'p_good'"),
        ([0.2, 1.5, 0.9], [1, 0, 1], r"'p_good'.*\[0, 1\]"),
        ([0.2, -0.1, 0.9], [1, 0, 1], "'p_good'"),
        ([[0.2, 0.3]], [1], "'p_good'"),
        ([0.2, 0.5, 0.9], [1, 0], "same length"),
        ([0.2, 0.5, 0.9], [1, 0, 3], "'labels'"),
    ],
)
def test_bad_fit_input(name: str, p_good, labels, match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        FACTORIES[name]().fit(p_good, labels)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bad_decide_input(name: str) -> None:
    p, y = held_out(5, n=300)
    pol = FACTORIES[name]().fit(p, y)
    with pytest.raises(InvalidParameterError, match="'p_good'"):
        pol.decide([0.5, np.inf])
    with pytest.raises(InvalidParameterError, match="'p_good'"):
        pol.decide([1.01])


def test_risk_control_needs_labels() -> None:
    p, _ = held_out(6, n=50)
    with pytest.raises(InvalidParameterError, match=r"'labels'.*fit\(p_good, labels\)"):
        RiskControlPolicy(max_edge_error=0.1).fit(p)


@pytest.mark.parametrize(
    "state",
    [{"threshold_": 0.5}, {"threshold_": "x", "calibration_cloud_fraction_": 0.1,
                           "cloud_fraction_interval_": [0.0, 1.0], "n_calibration_": 3}],
)
def test_bad_state(state) -> None:
    with pytest.raises(SerializationError, match="'state'"):
        BudgetPolicy(max_cloud_fraction=0.2).set_state(state)


# -- threshold ------------------------------------------------------------------------------
def test_threshold_rule_and_explain() -> None:
    pol = ThresholdPolicy(min_p_good=0.6)
    assert pol.decide([0.59, 0.6, 0.82, np.nan]).tolist() == [True, False, False, True]
    assert pol.explain(0.82, False) == "p_good 0.82 >= threshold 0.60"
    assert pol.explain(0.3, True) == "p_good 0.30 < threshold 0.60"
    assert "NaN" in pol.explain(float("nan"), True)


# -- budget: offline threshold --------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0, math.nan]),
                              st.floats(0, 1)), min_size=1, max_size=60),
    budget=st.floats(0, 1),
)
def test_budget_fit_never_exceeds_target_on_held_out(values, budget) -> None:
    p = np.array(values)
    pol = BudgetPolicy(max_cloud_fraction=budget, enforce="none")
    n_nan = int(np.isnan(p).sum())
    if n_nan > math.floor(Fraction(repr(budget)) * p.size):
        with pytest.warns(UserWarning, match="NaN"):
            pol.fit(p)
        assert pol.threshold_ == 0.0
        return
    pol.fit(p)
    frac = pol.decide(p).mean()
    assert frac <= budget + 1e-12
    assert frac == pol.calibration_cloud_fraction_
    lo, hi = pol.cloud_fraction_interval_
    assert 0.0 <= lo <= frac <= hi <= 1.0


def test_budget_uses_the_whole_budget_and_zero_budget_never_escalates() -> None:
    p, _ = held_out(7, n=1000)
    pol = BudgetPolicy(max_cloud_fraction=0.3, enforce="none").fit(p)
    assert pol.calibration_cloud_fraction_ == 0.3
    zero = BudgetPolicy(max_cloud_fraction=0.0, enforce="none").fit(p)
    assert not zero.decide(np.random.default_rng(0).random(1000)).any()


def test_budget_interval_covers_new_traffic() -> None:
    # The Clopper-Pearson interval should cover the cloud share of fresh traffic at its level.
    rng = np.random.default_rng(8)
    covered = 0
    n_draws = 200
    for _ in range(n_draws):
        pol = BudgetPolicy(max_cloud_fraction=0.25, confidence=0.9).fit(rng.random(200))
        true_share = pol.threshold_  # P(U < t) for U ~ U(0, 1)
        lo, hi = pol.cloud_fraction_interval_
        covered += lo <= true_share <= hi
    assert covered / n_draws >= 0.9 - 3 * math.sqrt(0.09 / n_draws)


# -- budget: online exact enforcement ---------------------------------------------------------
def _check_prefixes(escalated: list[bool], budget: float, enforce: str, window: int) -> None:
    b = Fraction(repr(budget))
    e = np.asarray(escalated, dtype=int)
    cum = np.cumsum(e)
    for n in range(1, len(e) + 1):
        if enforce == "total":
            assert cum[n - 1] <= math.floor(b * n), (n, cum[n - 1])
        else:
            lo = max(0, n - window)
            in_win = cum[n - 1] - (cum[lo - 1] if lo > 0 else 0)
            assert in_win <= math.floor(b * (n - lo)), (n, in_win)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    values=st.lists(st.floats(0, 1), min_size=1, max_size=120),
    budget=st.sampled_from([0.0, 0.05, 0.1, 0.29, 0.3, 0.5, 0.7, 1.0]),
    enforce=st.sampled_from(["total", "window"]),
    window=st.integers(1, 25),
)
def test_enforced_budget_never_exceeded_at_any_prefix(data, values, budget, enforce, window):
    p_fit, _ = held_out(9, n=200)
    pol = BudgetPolicy(max_cloud_fraction=0.6, enforce=enforce, window=window)
    pol.fit(p_fit)  # the threshold wants to escalate 60%: the ledger must cut it
    pol.set_params(max_cloud_fraction=budget)
    pol.reset()
    order = data.draw(st.permutations(values))
    out = pol.decide(order)
    _check_prefixes(out.tolist(), budget, enforce, window)
    assert pol.snapshot().requests == len(order) and pol.snapshot().cloud == int(out.sum())
    # admitted only what the threshold wanted
    wanted = np.asarray(order) < pol.threshold_
    assert not (out & ~wanted).any()


@pytest.mark.parametrize(("enforce", "window"), [("total", 1000), ("window", 50)])
def test_enforced_budget_under_threads(enforce: str, window: int) -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.2, enforce=enforce, window=window)
    pol.fit(np.linspace(0, 1, 101))
    tickets: list[Ticket] = []
    sink = threading.Lock()
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = []
        start.wait()
        # Scores in [0, 0.5): the threshold (about 0.2) wants ~40% of them escalated,
        # twice what the budget allows, so the ledger must deny in any interleaving.
        for v in 0.5 * rng.random(400):
            mine.append(pol.admit(float(v)))
        with sink:
            tickets.extend(mine)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tickets.sort(key=lambda t: t.seq)
    assert [t.seq for t in tickets] == list(range(3200))  # one total order, nothing lost
    _check_prefixes([t.escalate for t in tickets], 0.2, enforce, window)
    snap = pol.snapshot()
    assert snap.requests == 3200 and snap.cloud == sum(t.escalate for t in tickets)
    wanted = sum(t.escalate or t.denied_by_budget for t in tickets)
    assert wanted > 0.3 * 3200  # the threshold asked for more than the budget
    assert sum(t.denied_by_budget for t in tickets) >= wanted - int(0.2 * 3200)


def test_settle_uncounts_failed_calls() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.5, enforce="total").fit(np.linspace(0, 1, 11))
    first = pol.admit(0.0)
    assert not first.escalate and first.denied_by_budget  # floor(0.5 * 1) = 0
    a = pol.admit(0.0)  # floor(0.5 * 2) = 1
    b = pol.admit(0.0)  # floor(0.5 * 3) = 1, already used
    assert a.escalate and not b.escalate and b.denied_by_budget
    assert pol.snapshot().cloud == 1
    assert pol.settle(a, spent=False) is True
    assert pol.snapshot().cloud == 0
    assert pol.settle(a, spent=False) is False  # twice: no effect
    assert pol.settle(b, spent=False) is False  # kept on edge: nothing to give back
    c = pol.admit(0.0)  # N=4: 1 <= 2
    d = pol.admit(0.0)  # N=5: 2 <= 2, possible only because a was given back
    assert c.escalate and d.escalate
    assert pol.settle(c, spent=True) is False and pol.snapshot().cloud == 2
    pol.reset()
    assert pol.snapshot()[:4] == (0, 0, 0, 0.0)
    e = pol.admit(0.0)
    assert pol.settle(c, spent=False) is False  # ticket from before reset
    assert pol.snapshot().cloud == int(e.escalate)


def test_settle_in_window_mode() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.5, enforce="window", window=4)
    pol.fit(np.linspace(0, 1, 11))
    pol.admit(0.9)
    first = pol.admit(0.0)
    assert first.escalate and pol.snapshot().window_cloud == 1
    pol.settle(first, spent=False)
    assert pol.snapshot().window_cloud == 0 and pol.snapshot().cloud == 0


def test_budget_denial_is_explained() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.3, enforce="total").fit(np.linspace(0, 1, 101))
    out = pol.decide([0.01, 0.01, 0.01, 0.01, 0.9])
    assert out.tolist() == [False, False, False, True, False]  # floor(0.3 * n) = 0,0,0,1,1
    text = pol.explain(0.01, False)
    assert text.startswith("budget: cloud share at limit 30%") and "0.01 < threshold" in text
    assert pol.explain(0.9, False).startswith("p_good 0.90 >= threshold")
    t = pol.admit(0.01)
    assert t.reason.startswith("budget") or t.escalate


def test_budget_decide_is_pure_without_enforcement() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.3, enforce="none").fit(np.linspace(0, 1, 101))
    q = np.zeros(10)
    assert pol.decide(q).all() and pol.decide(q).all()
    assert pol.snapshot().requests == 0


# -- cost-aware -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("p", "cost", "expect"),
    [
        (0.5, None, True),    # gain 5 > 2
        (0.7, None, True),    # gain 3 > 2
        (0.8, None, False),   # gain 2 == 2: not strictly better
        (0.9, None, False),
        (0.5, 6.0, False),    # per-request cost 6 > gain 5
        (0.5, 4.0, True),
    ],
)
def test_cost_aware_rule(p: float, cost, expect: bool) -> None:
    pol = CostAwarePolicy(edge_cost=0.0, cloud_cost=2.0, quality_value=10.0)
    got = pol.decide([p], cost=None if cost is None else [cost])[0]
    assert got is np.True_ if expect else got is np.False_
    assert ("gain" in pol.explain(p, got, cost=cost))


def test_cost_aware_cost_shape_checked() -> None:
    pol = CostAwarePolicy()
    with pytest.raises(InvalidParameterError, match=r"'cost'.*shape"):
        pol.decide([0.1, 0.2], cost=[1.0, 2.0, 3.0])
    with pytest.raises(InvalidParameterError, match="'cost'"):
        pol.decide([0.1, 0.2], cost=[1.0, -2.0])
    assert pol.decide([0.1, 0.2], cost=0.5).tolist() == [True, True]


@settings(max_examples=60, deadline=None)
@given(
    p=st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)), min_size=1, max_size=80),
    costs=st.lists(st.floats(0, 5), min_size=80, max_size=80),
    budget=st.floats(0, 20),
    fail=st.lists(st.booleans(), min_size=80, max_size=80),
)
def test_cost_aware_spend_never_exceeds_budget(p, costs, budget, fail) -> None:
    pol = CostAwarePolicy(cloud_cost=1.0, quality_value=10.0, spend_budget=budget)
    c = np.array(costs[: len(p)])
    half = len(p) // 2
    out = pol.decide(p[:half], cost=c[:half]).tolist()
    spent = sum((Fraction(x) for x, e in zip(c[:half], out, strict=True) if e), Fraction(0))
    assert spent <= Fraction(budget)
    for i in range(half, len(p)):
        t = pol.admit(p[i], cost=float(c[i]))
        if t.escalate:
            spent += Fraction(t.cost)
            assert spent <= Fraction(budget)
            if fail[i]:
                assert pol.settle(t, spent=False)
                spent -= Fraction(t.cost)
    assert pol.snapshot().spent == float(spent)


def test_cost_aware_spend_cap_under_threads() -> None:
    pol = CostAwarePolicy(cloud_cost=0.1, quality_value=10.0, spend_budget=25.0)
    tickets: list[Ticket] = []
    sink = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = [pol.admit(float(v), cost=float(c)) for v, c in
                zip(rng.random(300) * 0.5, rng.random(300), strict=True)]
        with sink:
            tickets.extend(mine)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = sum((Fraction(t.cost) for t in tickets if t.escalate), Fraction(0))
    assert spent <= 25 and pol.snapshot().spent == float(spent)
    denied = [t for t in tickets if t.denied_by_budget]
    assert denied and denied[0].reason.startswith("spend budget")


# -- risk control ---------------------------------------------------------------------------
def _true_risk_uniform(t: float) -> float:
    """P(bad | p >= t) for p ~ U(0,1), good ~ Bernoulli(p)."""
    return (1.0 - t) / 2.0


def _true_risk_square(t: float) -> float:
    """P(bad | p >= t) for p ~ U(0,1), good ~ Bernoulli(p**2) (over-confident p_good)."""
    return 1.0 - (1.0 + t + t * t) / 3.0


@pytest.mark.parametrize(
    ("good_prob", "true_risk", "alpha", "delta"),
    [
        (lambda p: p, _true_risk_uniform, 0.1, 0.1),
        (lambda p: p**2, _true_risk_square, 0.15, 0.2),
    ],
)
def test_risk_bound_holds_over_repeated_draws(good_prob, true_risk, alpha, delta) -> None:
    rng = np.random.default_rng(11)
    n_draws, n = 300, 1500
    violations = naive_violations = met = 0
    for _ in range(n_draws):
        p = rng.random(n)
        y = (rng.random(n) < good_prob(p)).astype(int)
        pol = RiskControlPolicy(max_edge_error=alpha, delta=delta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "nothing certified" is allowed
            pol.fit(p, y)
        if pol.guarantee_met_:
            met += 1
            violations += true_risk(pol.threshold_) > alpha + 1e-12
            assert pol.edge_error_upper_bound_ <= alpha + 1e-12
            kept = p >= pol.threshold_
            assert pol.n_kept_ == kept.sum()
            assert pol.expected_cloud_fraction_ == pytest.approx(1 - kept.mean())
        # naive plug-in: loosest grid threshold whose empirical kept error is <= alpha
        order = np.argsort(-p)
        kept_err = np.cumsum(y[order] == 0) / np.arange(1, n + 1)
        naive_t = p[order][np.flatnonzero(kept_err <= alpha).max()]
        naive_violations += true_risk(naive_t) > alpha + 1e-12
    slack = 3 * math.sqrt(delta * (1 - delta) / n_draws)
    assert violations / n_draws <= delta + slack
    assert met >= n_draws // 2  # the procedure certifies something most of the time
    assert naive_violations / n_draws > delta + slack  # the check could have failed


def test_risk_control_nothing_certified_escalates_everything() -> None:
    p, y = held_out(12, n=30)
    pol = RiskControlPolicy(max_edge_error=0.01, delta=0.05)
    with pytest.warns(UserWarning, match="no threshold certifies"):
        pol.fit(p, y)
    assert pol.guarantee_met_ is False and pol.expected_cloud_fraction_ == 1.0
    assert pol.decide([1.0, 0.99, np.nan]).all()
    assert "no threshold certifies" in pol.explain(1.0, True)


def test_risk_control_explain_and_attributes() -> None:
    p, y = held_out(13, n=3000)
    pol = RiskControlPolicy(max_edge_error=0.1, delta=0.1).fit(p, y)
    assert pol.guarantee_met_
    t = pol.threshold_
    assert 0.8 <= t < 1.0
    assert pol.empirical_edge_error_ <= pol.edge_error_upper_bound_ <= 0.1
    assert pol.explain(min(t + 0.01, 1.0), False).startswith("p_good")
    assert "< risk-controlled threshold" in pol.explain(t - 0.01, True)


def test_risk_control_nan_policy_edge_counts_nan_as_kept() -> None:
    p, y = held_out(14, n=3000)
    p = p.copy()
    p[:300] = np.nan
    y = y.copy()
    y[:300] = 0  # unscorable answers are all bad: keeping them must cost certification
    esc = RiskControlPolicy(max_edge_error=0.1).fit(p, y)
    with pytest.warns(UserWarning, match="no threshold certifies"):
        edge = RiskControlPolicy(max_edge_error=0.1, nan_policy="edge").fit(p, y)
    assert esc.guarantee_met_ and not edge.guarantee_met_


# -- online policies: the ledger base, budgets enforced by default -----------------------------
def test_default_budget_is_an_enforced_all_time_guarantee() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.2)
    assert pol.enforce == "total" and pol.enforced and isinstance(pol, OnlinePolicy)
    pol.fit(np.linspace(0, 1, 101))
    out = pol.decide(np.zeros(50))  # every request wants the cloud
    cum = np.cumsum(out)
    assert all(c <= math.floor(0.2 * (n + 1)) for n, c in enumerate(cum))
    assert cum[-1] == 10 and pol.snapshot().requests == 50


def test_budget_threshold_is_registered_and_says_it_is_no_guarantee() -> None:
    pol = policy_registry.resolve("budget_threshold", "policy", "test", max_cloud_fraction=0.3)
    assert isinstance(pol, BudgetThresholdPolicy) and not pol.enforced
    assert "enforce" not in pol.get_params()
    pol.fit(np.linspace(0, 1, 101))
    assert pol.decide(np.zeros(10)).all()  # the threshold alone, no ledger limit
    assert pol.snapshot().requests == 0
    text = pol.explain(0.1, True)
    assert "fitted" in text and "not a guarantee" in text
    assert "not a guarantee" in BudgetPolicy(max_cloud_fraction=0.3, enforce="none").fit(
        np.linspace(0, 1, 11)).explain(0.9, False)
    with pytest.raises(InvalidParameterError, match="enforce"):
        pol.set_params(enforce="total")


@pytest.mark.parametrize("pol", [BudgetPolicy(max_cloud_fraction=0.3), CostAwarePolicy()])
def test_online_policies_share_the_ledger_base(pol: OnlinePolicy) -> None:
    assert isinstance(pol, OnlinePolicy)
    for name in ("admit", "settle", "reset", "snapshot"):
        assert getattr(type(pol), name) is getattr(OnlinePolicy, name)
    pol.fit(np.linspace(0, 1, 11))
    pol.admit(0.0)
    snap = pol.snapshot()
    assert isinstance(snap, LedgerSnapshot) and snap.requests == 1
    assert pol.ledger is None and pol.snapshot() == snap  # `ledger` is the store parameter now


def test_settle_with_the_real_cost_refunds_the_reservation_difference() -> None:
    pol = CostAwarePolicy(cloud_cost=2.0, quality_value=10.0, spend_budget=5.0)
    a = pol.admit(0.0)
    b = pol.admit(0.0)
    assert a.escalate and b.escalate and a.cost == 2.0 and pol.snapshot().spent == 4.0
    assert not pol.admit(0.0).escalate  # 4 + 2 > 5
    assert pol.settle(a, True, cost=0.5) is True  # billed 0.5, not 2
    assert pol.snapshot().spent == 2.5
    assert pol.settle(a, True, cost=0.1) is False  # settled once only
    c = pol.admit(0.0)  # 2.5 + 2 <= 5: possible only thanks to the refund
    assert c.escalate
    assert pol.settle(b, True) is False and pol.snapshot().spent == 4.5
    assert pol.settle(c, False) is True and pol.snapshot()[:4] == (4, 2, 0, 2.5)
    with pytest.raises(InvalidParameterError, match="'ticket'"):
        pol.settle("not a ticket", True)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="'cost'"):
        pol.settle(c, True, cost=-1.0)


def test_set_params_starts_a_new_ledger() -> None:
    pol = CostAwarePolicy(cloud_cost=1.0, quality_value=10.0, spend_budget=1.0)
    t = pol.admit(0.0)
    assert t.escalate and not pol.admit(0.0).escalate
    pol.set_params(spend_budget=2.0)
    assert pol.snapshot().requests == 0
    assert pol.settle(t, False) is False  # a ticket of the old ledger
    assert pol.admit(0.0).escalate and pol.admit(0.0).escalate and not pol.admit(0.0).escalate


def test_period_mode_needs_a_period() -> None:
    with pytest.raises(InvalidParameterError, match=r"'period'.*enforce='period'"):
        BudgetPolicy(max_cloud_fraction=0.5, enforce="period").fit(np.linspace(0, 1, 11))
    with pytest.raises(InvalidParameterError, match="'period'"):
        BudgetPolicy(max_cloud_fraction=0.5, enforce="period", period=0.0).fit([0.5])
    with pytest.raises(InvalidParameterError, match="'period'"):
        CostAwarePolicy(period=-1.0).decide([0.5])


def test_budget_period_mode_restarts_counts_at_each_boundary() -> None:
    pol = BudgetPolicy(max_cloud_fraction=0.5, enforce="period", period=1.0)
    pol.fit(np.linspace(0, 1, 11))
    first = [pol.admit(0.0) for _ in range(4)]
    assert [t.escalate for t in first] == [False, True, False, True]
    assert pol.snapshot().cloud == 2
    assert "in this period" in first[2].reason
    time.sleep(1.05)
    assert pol.snapshot()[:4] == (0, 0, 0, 0.0)  # a new period
    t = pol.admit(0.0)
    assert t.seq == 0 and not t.escalate  # floor(0.5 * 1) = 0 in the new period
    assert pol.settle(first[1], False) is False  # a ticket of the previous period
    assert pol.admit(0.0).escalate


def test_cost_aware_period_is_a_budget_per_period() -> None:
    pol = CostAwarePolicy(cloud_cost=1.0, quality_value=10.0, spend_budget=1.0, period=1.0)
    assert pol.admit(0.0).escalate and not pol.admit(0.0).escalate
    time.sleep(1.05)
    assert pol.admit(0.0).escalate and pol.snapshot().spent == 1.0


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    p=st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)), min_size=1, max_size=80),
    budget=st.sampled_from([0.0, 0.1, 0.25, 0.29, 0.5, 0.75, 1.0]),
)
def test_total_budget_holds_at_every_prefix_for_any_settle_pattern(data, p, budget) -> None:
    b = Fraction(repr(budget))
    pol = BudgetPolicy(max_cloud_fraction=budget).fit(np.linspace(0, 1, 11))
    tickets: list[Ticket] = []
    outcome: dict[int, bool] = {}  # seq -> spent, for settled escalations
    open_: list[Ticket] = []
    for v in p:
        t = pol.admit(v)
        tickets.append(t)
        if t.escalate:
            open_.append(t)
        snap = pol.snapshot()
        assert snap.cloud <= math.floor(b * snap.requests)
        # settle any subset of the open tickets, in any order, as spent or failed
        for _ in range(data.draw(st.integers(0, len(open_)))):
            k = data.draw(st.integers(0, len(open_) - 1))
            spent = data.draw(st.booleans())
            done = open_.pop(k)
            pol.settle(done, spent)
            outcome[done.seq] = spent
            snap = pol.snapshot()
            assert snap.cloud <= math.floor(b * snap.requests)
    # escalations really spent (not given back) among the first n arrivals
    spent_flags = [t.escalate and outcome.get(t.seq, True) for t in tickets]
    cum = np.cumsum(spent_flags)
    for n in range(1, len(tickets) + 1):
        assert cum[n - 1] <= math.floor(b * n), (n, cum[n - 1])
    assert pol.snapshot().cloud == cum[-1]
