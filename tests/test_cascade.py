"""Cascade over k tiers, its threshold search, the k-way selector and the price table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression

from confroute.calibration import IsotonicCalibrator
from confroute.cascade import (
    Cascade,
    KWaySelector,
    Tier,
    fit_cascade_thresholds,
    simulate_cascade,
)
from confroute.errors import InvalidParameterError, InvalidTypeError, NotFittedError
from confroute.evaluation.metrics import auroc
from confroute.evaluation.recorded import RecordedModel
from confroute.policies import BudgetPolicy
from confroute.predictive.routers import KNNRouter, QueryRouterEstimator
from confroute.prices import (
    PRICES_MID_2024,
    Price,
    call_cost,
    estimate_tokens,
    lookup_price,
    price_table,
)

# ------------------------------------------------------------------ offline rule


def _planted(n: int = 400, seed: int = 0):
    """Tier 0 is right exactly when its p_good >= 0.6; tier 1 is always right."""
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(size=n)
    correct = np.column_stack([(p0 >= 0.6).astype(float), np.ones(n)])
    return p0[:, None], correct


def test_threshold_search_finds_the_known_optimum_under_a_quality_floor():
    p, q = _planted()
    point = fit_cascade_thresholds(p, q, [1.0, 10.0], min_quality=1.0, n_grid=len(p))
    # cheapest rule with no error: stop at tier 0 exactly for the queries it gets right
    assert point.quality == 1.0
    assert point.params[0] == pytest.approx(p[q[:, 0] == 1, 0].min())
    assert point.cost == pytest.approx(1.0 + 10.0 * (q[:, 0] == 0).mean())
    assert point.quality_ci[0] < 1.0 <= point.quality_ci[1]
    assert point.cost_ci[0] <= point.cost <= point.cost_ci[1]
    assert sum(point.shares) == pytest.approx(1.0)


def test_threshold_search_under_a_cost_cap_matches_brute_force_on_three_tiers():
    rng = np.random.default_rng(3)
    n = 14
    p = rng.uniform(size=(n, 2))
    q = (rng.uniform(size=(n, 3)) < np.array([0.4, 0.6, 0.9])).astype(float)
    costs = np.array([1.0, 3.0, 9.0])
    cap = 6.0
    point = fit_cascade_thresholds(p, q, costs, max_cost=cap, n_grid=n)
    best = -1.0
    for t in itertools.product(*[[*np.unique(p[:, j]), math.inf] for j in range(2)]):
        out = simulate_cascade(p, q, costs, list(t))
        if out.cost.mean() <= cap + 1e-12:
            best = max(best, out.quality.mean())
    assert point.quality == pytest.approx(best)
    assert point.cost <= cap + 1e-12


def test_last_tier_always_answers_and_costs_add_up():
    p = np.array([[0.9, 0.9], [0.1, 0.9], [0.1, 0.1], [np.nan, np.nan]])
    q = np.ones((4, 3))
    out = simulate_cascade(p, q, [1.0, 2.0, 4.0], [0.5, 0.5])
    np.testing.assert_array_equal(out.stop, [0, 1, 2, 2])  # NaN never stops
    np.testing.assert_allclose(out.cost, [1.0, 3.0, 7.0, 7.0])
    never = simulate_cascade(p, q, [1.0, 2.0, 4.0], [math.inf, math.inf])
    assert (never.stop == 2).all()
    np.testing.assert_allclose(never.tier_shares(3), [0, 0, 1])


def test_agreement_stops_at_the_agreeing_tier():
    p = np.zeros((3, 2))
    agree = np.array([[True, False], [False, True], [False, False]])
    out = simulate_cascade(p, np.ones((3, 3)), [1.0, 1.0, 1.0], [0.5, 0.5], agree=agree)
    np.testing.assert_array_equal(out.stop, [1, 2, 2])


def test_threshold_search_rejects_an_impossible_constraint():
    p, q = _planted(50)
    with pytest.raises(InvalidParameterError, match=r"'max_cost'.*cheapest operating point"):
        fit_cascade_thresholds(p, q, [1.0, 10.0], max_cost=0.5)
    with pytest.raises(InvalidParameterError, match=r"exactly one of 'max_cost'"):
        fit_cascade_thresholds(p, q, [1.0, 10.0])
    with pytest.raises(InvalidParameterError, match=r"'p_good_per_tier'"):
        fit_cascade_thresholds(np.zeros((49, 1)), q, [1.0, 10.0], max_cost=5)
    with pytest.raises(InvalidParameterError, match=r"'costs'.*non-negative"):
        simulate_cascade(p, q, [-1.0, 10.0], [0.5])
    with pytest.raises(InvalidParameterError, match=r"'thresholds'.*length 1"):
        simulate_cascade(p, q, [1.0, 10.0], [0.5, 0.5])


# ------------------------------------------------------------------ live tiers


class HashEncoder:
    """scikit-learn's hashing vectorizer as a TextEncoder (unit rows)."""

    name = "hashing-64"

    def __init__(self) -> None:
        self.vec = HashingVectorizer(n_features=64, alternate_sign=False)

    def encode(self, texts):
        return self.vec.transform(list(texts)).toarray()


PROMPTS = [f"question number {w}" for w in ("one", "two", "three", "four", "five", "six")]


def _signal(uncertain: set[int]):
    """Estimator + fitted calibrator with p_good ~ 0 on ``uncertain`` prompts, ~ 1 elsewhere."""
    enc = HashEncoder()
    hard = [1.0 if i in uncertain else 0.0 for i in range(len(PROMPTS))]
    router = KNNRouter(k=1).fit(enc.encode(PROMPTS), hard)
    est = QueryRouterEstimator(router, embedder=enc)
    scores = est.estimate(PROMPTS).scores
    cal = IsotonicCalibrator().fit(scores, [1 - h for h in hard])
    return est, cal


def _recorded(name: str, answers: dict[int, str] | None = None, default: str = "x"):
    answers = answers or {}
    return RecordedModel({p: answers.get(i, f"{default} {i}") for i, p in enumerate(PROMPTS)},
                         name=name)


def _three_tiers(**last):
    e0, c0 = _signal({3, 4, 5})
    e1, c1 = _signal({5})
    return [
        Tier(_recorded("small"), e0, c0, name="small", cost_per_call=1.0),
        Tier(_recorded("medium"), e1, c1, name="medium", cost_per_call=2.0),
        Tier(last.pop("model", _recorded("big")), name="big", cost_per_call=10.0, **last),
    ]


def test_cascade_routes_by_tier_and_reports_tier_and_cost():
    responses = Cascade(_three_tiers())(PROMPTS)
    assert [r.tier for r in responses] == [0, 0, 0, 1, 1, 2]
    assert [r.tier_name for r in responses] == ["small"] * 3 + ["medium"] * 2 + ["big"]
    assert [r.cost for r in responses] == [1.0, 1.0, 1.0, 3.0, 3.0, 13.0]
    for r in responses:
        assert r.cost == pytest.approx(sum(r.tier_costs))
        assert len(r.tier_costs) == len(r.p_good) == r.tier + 1
        assert r.text == f"{'x'} {PROMPTS.index(r.prompt)}"
    assert responses[5].reason == "last tier answers"
    assert math.isnan(responses[5].p_good[-1])  # the last tier has no signal


def test_cascade_agreement_stops_early():
    tiers = _three_tiers()
    same = {5: "Paris"}
    tiers[0] = Tier(_recorded("small", same), tiers[0].estimator, tiers[0].calibrator,
                    name="small", cost_per_call=1.0)
    tiers[1] = Tier(_recorded("medium", same), tiers[1].estimator, tiers[1].calibrator,
                    name="medium", cost_per_call=2.0)
    r = Cascade(tiers, agreement=True)(PROMPTS)
    assert r[5].tier == 1 and r[5].text == "Paris"
    assert "agrees" in r[5].reason
    assert Cascade(tiers)(PROMPTS)[5].tier == 2


def test_tier_budget_limits_who_enters_and_failures_are_refunded():
    budget = BudgetPolicy(max_cloud_fraction=1 / 6, enforce="total").fit(np.linspace(0, 1, 60))
    tiers = _three_tiers()
    tiers[1] = Tier(tiers[1].model, tiers[1].estimator, tiers[1].calibrator, name="medium",
                    cost_per_call=2.0, policy=budget)
    responses = Cascade(tiers)(PROMPTS)
    entered = sum(r.tier >= 1 for r in responses)
    assert entered <= 1
    assert any("budget refused" in r.reason for r in responses)
    snap = budget.snapshot()
    assert snap.requests == len(PROMPTS) and snap.cloud == entered  # stoppers refunded
    # the last tier has no answer for prompt 5: the medium answer is served, marked degraded
    broken = RecordedModel({p: "y" for p in PROMPTS[:5]}, name="big")
    out = Cascade(_three_tiers(model=broken))(PROMPTS)
    assert out[5].degraded and out[5].tier == 1 and "big" in (out[5].error or "")


def test_tier_wrapping_a_calibrated_router():
    from confroute.router import Router

    est, _ = _signal({3, 4, 5})
    small = _recorded("small")
    router = Router(est, "isotonic", "threshold", edge=small)
    router.calibrate(PROMPTS, [1, 1, 1, 0, 0, 0])
    tiers = _three_tiers()
    tiers[0] = Tier(None, name="small", cost_per_call=1.0, router=router)
    assert tiers[0].model is small
    out = Cascade(tiers)(PROMPTS)
    assert [r.tier for r in out] == [0, 0, 0, 1, 1, 2]
    assert out[0].p_good[0] == pytest.approx(float(router.predict_proba(PROMPTS[:1])[0]))


def test_cascade_bad_input_names_the_parameter():
    tiers = _three_tiers()
    with pytest.raises(InvalidParameterError, match=r"'tiers'.*at least two"):
        Cascade([])
    with pytest.raises(InvalidParameterError, match=r"'tiers'.*non-decreasing cost"):
        Cascade([tiers[1], tiers[0]], thresholds=[0.5])
    with pytest.raises(InvalidParameterError, match=r"'thresholds'.*length 2"):
        Cascade(tiers, thresholds=[0.5])
    with pytest.raises(InvalidParameterError, match=r"'thresholds\[0\]'"):
        Cascade(tiers, thresholds=[1.5, 0.5])
    with pytest.raises(InvalidParameterError, match=r"'cost_per_call'.*\[0, inf\]"):
        Tier(_recorded("a"), name="a", cost_per_call=-1.0)
    with pytest.raises(InvalidParameterError, match=r"one kind of cost"):
        Tier(_recorded("a"), name="a", cost_per_call=1.0, price_in=1.0, price_out=2.0)
    with pytest.raises(InvalidParameterError, match=r"one kind of cost"):
        Tier(_recorded("a"), name="a", price_in=1.0)
    with pytest.raises(InvalidParameterError, match=r"'tiers\[0\]'.*confidence signal"):
        Cascade([tiers[2], tiers[2]])
    with pytest.raises(InvalidTypeError, match=r"'tiers\[1\]'.*a Tier"):
        Cascade([tiers[0], "big"])
    with pytest.raises(InvalidTypeError, match=r"'model'"):
        Tier(None, name="a", cost_per_call=1.0)
    with pytest.raises(InvalidParameterError, match=r"'correct_per_tier'.*3 columns"):
        Cascade(tiers).fit_thresholds(np.zeros((4, 2)), np.ones((4, 2)), max_cost=1.0)


def test_fit_thresholds_sets_the_cascade():
    p, q = _planted(200)
    tiers = _three_tiers()[1:]
    cascade = Cascade(tiers)
    point = cascade.fit_thresholds(p, q, [1.0, 10.0], min_quality=1.0)
    assert cascade.thresholds == list(point.params)
    assert cascade.operating_point_ is point


def test_end_to_end_two_tiny_hf_tiers_and_a_recorded_last_tier(tiny_llama, tiny_gpt2):
    from confroute.estimators import estimator_registry
    from confroute.models.hf import HFLanguageModel

    prompts = [f"What is {i} plus {i}?" for i in range(8)]
    tiers = []
    for name, lm in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        model = HFLanguageModel(*lm)
        est = estimator_registry.resolve("sequence_logprob", "estimator", "test")
        scores = est.estimate(prompts, model).scores
        cal = IsotonicCalibrator().fit(scores, [i % 2 for i in range(len(prompts))])
        tiers.append(Tier(model, est, cal, name=name, price_in=0.1, price_out=0.2,
                          max_new_tokens=4))
    big = RecordedModel({p: str(2 * i) for i, p in enumerate(prompts)}, name="big")
    tiers.append(Tier(big, name="big", price_in=5.0, price_out=15.0))
    for thresholds, tier in (([0.0, 0.0], 0), ([math.inf, math.inf], 2)):
        out = Cascade(tiers, thresholds=thresholds)(prompts)
        assert [r.tier for r in out] == [tier] * len(prompts)
        for r in out:
            assert isinstance(r.text, str)
            assert r.cost == pytest.approx(sum(r.tier_costs)) and r.cost > 0
            assert all(np.isfinite(r.p_good[: min(r.tier + 1, 2)]))
        if tier == 2:
            assert [r.text for r in out] == [str(2 * i) for i in range(len(prompts))]
    mixed = Cascade(tiers, thresholds=[0.5, 0.5])(prompts)
    assert {r.tier_name for r in mixed} <= {"llama", "gpt2", "big"}


# ------------------------------------------------------------------ k-way selector


def _selector_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    correct = np.column_stack([
        X[:, 0] > 0.3,                       # cheap: right on one region
        X[:, 1] > -0.5,                      # medium: right on another
        rng.uniform(size=n) < 0.95,          # expensive: almost always right
    ]).astype(float)
    return X, correct


@pytest.mark.parametrize("predictor", [LogisticRegression(), KNNRouter(k=15)])
def test_kway_selector_on_planted_data(predictor):
    X, y = _selector_data(1500, 0)
    Xc, yc = _selector_data(600, 1)
    Xt, yt = _selector_data(600, 2)
    costs = np.array([1.0, 3.0, 20.0])
    sel = KWaySelector(predictor, costs=costs).fit(X, y)
    P = sel.p_success(Xt)
    assert P.shape == (600, 3)
    assert auroc(-P[:, 0], yt[:, 0]) < 0.1 or auroc(P[:, 0], yt[:, 0]) > 0.9
    point = sel.fit_threshold(Xc, yc, max_cost=6.0)
    assert point.cost <= 6.0 and sel.value == point.params[0]
    pick = sel.select(Xt)
    rows = np.arange(len(yt))
    acc, cost = yt[rows, pick].mean(), costs[pick].mean()
    # well above the best single model within the cap (the medium one, ~0.69)
    assert acc > 0.85 and cost < 8.0


def test_kway_selector_utility_rule_and_bad_input():
    X, y = _selector_data(500, 0)
    sel = KWaySelector(LogisticRegression(), costs=[1.0, 3.0, 20.0], rule="utility", value=0.0)
    sel.fit(X, y)
    assert (sel.select(X) == np.argmax(sel.p_success(X), axis=1)).all()
    point = sel.fit_threshold(X, y, max_cost=4.0)
    assert point.cost <= 4.0
    with pytest.raises(NotFittedError, match=r"fit"):
        KWaySelector(LogisticRegression(), costs=[1.0, 2.0]).p_success(X)
    with pytest.raises(InvalidParameterError, match=r"'costs'.*non-decreasing"):
        KWaySelector(LogisticRegression(), costs=[3.0, 1.0, 2.0]).fit(X, y)
    with pytest.raises(InvalidParameterError, match=r"'predictors'.*3"):
        KWaySelector([LogisticRegression()] * 2, costs=[1.0, 2.0, 3.0]).fit(X, y)
    with pytest.raises(InvalidParameterError, match=r"'correct'.*0/1"):
        KWaySelector(LogisticRegression(), costs=[1.0, 2.0, 3.0]).fit(X, y * 0.5)
    with pytest.raises(InvalidParameterError, match=r"'rule'"):
        KWaySelector(LogisticRegression(), costs=[1.0, 2.0, 3.0], rule="best").fit(X, y)


# ------------------------------------------------------------------ prices


def test_price_table_values_names_and_overrides():
    assert lookup_price("gpt-4-0613") == Price(30.0, 60.0)
    assert lookup_price("anthropic_claude-3-opus-20240229").output_per_mtok == 75.0
    assert lookup_price("google_gemini-1.5-flash-preview-0514").input_per_mtok == 0.35
    assert lookup_price("meta_llama-3-70b") == Price(0.9, 0.9)
    assert all(p.approximate for p in PRICES_MID_2024.values())
    table = price_table({"llama-3-70b": (0.5, 0.7), "writer_palmyra-x-v3": Price(1, 2, False)})
    assert table["llama-3-70b"] == Price(0.5, 0.7, approximate=False)
    assert "palmyra-x-v3" in table and "palmyra-x-v3" not in PRICES_MID_2024
    assert lookup_price("llama-3-70b").input_per_mtok == 0.9  # built-in unchanged
    assert estimate_tokens("abcdefgh") == 2 and estimate_tokens("abcdefghi") == 3
    assert call_cost("gpt-4o-2024-05-13", 1000, 100) == pytest.approx((5e3 + 1.5e3) / 1e6)
    assert call_cost("gpt-4o-2024-05-13", "a" * 4000, "b" * 400) == pytest.approx(6.5e-3)


def test_price_table_bad_input():
    with pytest.raises(InvalidParameterError, match=r"'model'.*priced model.*gpt-4-0613"):
        lookup_price("text-unicorn@001")
    with pytest.raises(InvalidTypeError, match=r"overrides\['x'\]"):
        price_table({"x": "cheap"})
    with pytest.raises(InvalidParameterError, match=r"'input_per_mtok'"):
        Price(-1.0, 2.0)
    with pytest.raises(InvalidTypeError, match=r"'text'"):
        estimate_tokens(12)


# ------------------------------------------------------------------ properties

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(2, 4), st.integers(0, 10_000))
def test_cascade_rule_invariants(n, k, seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=(n, k - 1))
    q = (rng.uniform(size=(n, k)) < 0.6).astype(float)
    costs = np.sort(rng.uniform(0.0, 5.0, size=k))
    t = list(rng.uniform(size=k - 1))
    out = simulate_cascade(p, q, costs, t)
    assert ((out.stop >= 0) & (out.stop < k)).all()
    np.testing.assert_allclose(out.cost, np.cumsum(costs)[out.stop])
    np.testing.assert_array_equal(out.quality, q[np.arange(n), out.stop])
    cap = float(np.cumsum(costs)[-1]) * rng.uniform(0.3, 1.0)
    if cap >= costs[0]:
        point = fit_cascade_thresholds(p, q, costs, max_cost=cap, n_grid=5)
        assert point.cost <= cap + 1e-9
