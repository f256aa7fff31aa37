"""Tests of confroute.calibration: contract suite, properties and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from confroute import _serialization
from confroute.calibration import (
    Calibrator,
    GBMCalibrator,
    IsotonicCalibrator,
    PlattCalibrator,
    calibrator_registry,
)
from confroute.errors import (
    InvalidParameterError,
    InvalidTypeError,
    NotFittedError,
    SerializationError,
)


def make_data(seed: int, n: int = 400, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Uncertainty scores (higher = worse) with P(good) = expit(-2 * first column)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, k))
    p = 1.0 / (1.0 + np.exp(2.0 * s[:, 0]))
    y = (rng.random(n) < p).astype(int)
    return (s[:, 0] if k == 1 else s), y


ALL = [IsotonicCalibrator, PlattCalibrator, GBMCalibrator]


def test_registry_lists_both() -> None:
    assert calibrator_registry.names() == ["gbm", "isotonic", "platt"]
    assert calibrator_registry.resolve("platt", "calibrator", "Router").__class__ is PlattCalibrator


@pytest.mark.parametrize("cls", ALL)
def test_contract(cls: type[Calibrator]) -> None:
    s, y = make_data(0)
    cal = cls()
    assert cal.fit(s, y) is cal
    out = cal.p_good(np.linspace(-4, 4, 50))
    assert out.shape == (50,) and out.dtype == np.float64
    assert np.all((out >= 0) & (out <= 1))
    # uncertainty scores: higher score -> lower P(good)
    assert out[0] > 0.8 and out[-1] < 0.2
    assert cal.n_features_in_ == 1


@pytest.mark.parametrize("cls", ALL)
def test_clone_and_params(cls: type[Calibrator]) -> None:
    s, y = make_data(1)
    cal = cls().fit(s, y)
    c2 = clone(cal)
    assert type(c2) is cls and c2.get_params() == cal.get_params()
    assert not hasattr(c2, "n_features_in_")
    name = next(iter(cal.get_params()))
    value = {"increasing": False, "C": 3.0, "max_iter": 50}[name]
    assert c2.set_params(**{name: value}) is c2 and c2.get_params()[name] == value
    with pytest.raises(InvalidParameterError, match="bogus"):
        c2.set_params(bogus=1)


@pytest.mark.parametrize("cls", ALL)
def test_state_round_trip_through_json(cls: type[Calibrator], tmp_path) -> None:
    s, y = make_data(2)
    cal = cls().fit(s, y)
    path = tmp_path / "cal.json"
    _serialization.write_file(path, "calibrator", {
        "name": calibrator_registry.name_of(cal), "params": cal.get_params(deep=False),
        "state": cal.get_state(),
    })
    doc = _serialization.read_file(path, "calibrator")
    new = calibrator_registry.get_class(doc["name"])(**doc["params"]).set_state(doc["state"])
    grid = np.linspace(-5, 5, 101)
    np.testing.assert_array_equal(new.p_good(grid), cal.p_good(grid))


@pytest.mark.parametrize("cls", ALL)
def test_unfitted(cls: type[Calibrator]) -> None:
    with pytest.raises(NotFittedError, match=r"call fit\(scores, labels\) first"):
        cls().p_good([0.1])
    with pytest.raises(NotFittedError, match="fit"):
        cls().get_state()


@pytest.mark.parametrize("cls", ALL)
def test_nan_maps_to_nan_and_inf_is_error(cls: type[Calibrator]) -> None:
    s, y = make_data(3)
    cal = cls().fit(s, y)
    out = cal.p_good([0.0, np.nan, 1.0])
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
    with pytest.raises(InvalidParameterError, match="'scores'"):
        cal.p_good([0.0, np.inf])
    assert cal.p_good(np.zeros(0)).shape == (0,)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, np.nan, 0.3], [1, 0, 1], "'scores'"),
        ([0.1, np.inf, 0.3], [1, 0, 1], "'scores'"),
        ([0.1, 0.2, 0.3], [1, 0], "same length"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "'labels'.*both classes"),
        ([0.1, 0.2, 0.3], [1, 0, 2], "'labels'"),
        ([0.1, 0.2, 0.3], [1, 0, np.nan], "'labels'"),
        ([], [], "'scores'"),
    ],
)
def test_bad_fit_input(cls: type[Calibrator], scores, labels, match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        cls().fit(scores, labels)


@pytest.mark.parametrize(
    ("cal", "exc", "match"),
    [
        (IsotonicCalibrator(increasing="up"), InvalidParameterError, "'increasing'"),
        (IsotonicCalibrator(increasing=1), InvalidTypeError, "'increasing'"),
        (IsotonicCalibrator(y_min=-0.1), InvalidParameterError, "'y_min'"),
        (IsotonicCalibrator(y_max=1.5), InvalidParameterError, "'y_max'"),
        (IsotonicCalibrator(y_min=0.8, y_max=0.2), InvalidParameterError, "'y_min'"),
        (PlattCalibrator(C=0.0), InvalidParameterError, "'C'"),
        (PlattCalibrator(C="big"), InvalidTypeError, "'C'"),
        (PlattCalibrator(standardize="yes"), InvalidTypeError, "'standardize'"),
        (PlattCalibrator(smooth_targets=None), InvalidTypeError, "'smooth_targets'"),
    ],
)
def test_bad_params_rejected_at_fit(cal: Calibrator, exc: type[Exception], match: str) -> None:
    s, y = make_data(4, n=50)
    with pytest.raises(exc, match=match):
        cal.fit(s, y)


def test_isotonic_rejects_several_columns() -> None:
    s, y = make_data(5, k=2)
    with pytest.raises(InvalidParameterError, match=r"'scores'.*PlattCalibrator"):
        IsotonicCalibrator().fit(s, y)
    # (n, 1) is fine
    IsotonicCalibrator().fit(s[:, :1], y)


@pytest.mark.parametrize(("increasing", "expect"), [("auto", False), (True, True), (False, False)])
def test_isotonic_direction(increasing, expect: bool) -> None:
    s, y = make_data(6)
    cal = IsotonicCalibrator(increasing=increasing).fit(s, y)
    assert cal.increasing_ is expect
    # auto on a *confidence* score (higher = better) learns increasing
    assert IsotonicCalibrator().fit(-s, y).increasing_ is True


def test_isotonic_bounds_and_clipping() -> None:
    s, y = make_data(7)
    cal = IsotonicCalibrator(y_min=0.1, y_max=0.9).fit(s, y)
    out = cal.p_good(np.array([-100.0, 100.0, *np.linspace(-3, 3, 20)]))
    assert out.min() >= 0.1 and out.max() <= 0.9
    assert out[0] == cal.y_thresholds_[0] and out[1] == cal.y_thresholds_[-1]


def test_isotonic_constant_scores_fall_back_to_decreasing() -> None:
    cal = IsotonicCalibrator().fit(np.ones(10), [0, 1] * 5)
    assert cal.increasing_ is False
    np.testing.assert_allclose(cal.p_good([0.0, 1.0, 2.0]), 0.5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    increasing=st.sampled_from(["auto", True, False]),
    query=st.lists(st.floats(-10, 10), min_size=2, max_size=30),
)
def test_isotonic_output_is_monotone_and_in_unit_interval(seed, increasing, query) -> None:
    s, y = make_data(seed, n=60)
    cal = IsotonicCalibrator(increasing=increasing).fit(s, y)
    q = np.sort(np.asarray(query))
    out = cal.p_good(q)
    assert np.all((out >= 0) & (out <= 1))
    d = np.diff(out)
    assert np.all(d >= -1e-12) if cal.increasing_ else np.all(d <= 1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 3), c=st.floats(1e-3, 1e3),
       smooth=st.booleans(), standardize=st.booleans())
def test_platt_probabilities_in_unit_interval(seed, k, c, smooth, standardize) -> None:
    s, y = make_data(seed, n=80, k=k)
    cal = PlattCalibrator(C=c, smooth_targets=smooth, standardize=standardize).fit(s, y)
    out = cal.p_good(np.random.default_rng(seed).normal(scale=5, size=(40, k)))
    assert out.shape == (40,) and np.all((out >= 0) & (out <= 1))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), cls=st.sampled_from(ALL),
       query=st.lists(st.floats(-10, 10), min_size=1, max_size=30))
def test_classifier_view_agrees_with_p_good(seed, cls, query) -> None:
    s, y = make_data(seed, n=60)
    cal = cls().fit(s, y)
    proba = cal.predict_proba(query)
    p = cal.p_good(query)
    assert proba.shape == (len(query), 2) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(proba[:, 1], p)
    np.testing.assert_array_equal(cal.predict(query), (p > 0.5).astype(int))
    np.testing.assert_array_equal(cal.classes_, [0, 1])


def test_platt_matches_sklearn_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    s, y = make_data(8, n=500, k=2)
    cal = PlattCalibrator(C=0.5).fit(s, y)
    z = (s - s.mean(axis=0)) / s.std(axis=0)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(cal.coef_, ref.coef_[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cal.intercept_, ref.intercept_[0], rtol=1e-4, atol=1e-6)
    assert cal.coef_[0] < 0  # the informative uncertainty column gets a negative weight


def test_platt_feature_count_checked_at_predict() -> None:
    s, y = make_data(9, k=2)
    cal = PlattCalibrator().fit(s, y)
    assert cal.n_features_in_ == 2
    with pytest.raises(InvalidParameterError, match=r"'scores'.*2 column"):
        cal.p_good(np.zeros((3, 3)))
    with pytest.raises(InvalidParameterError, match=r"'scores'.*2 column"):
        cal.p_good(np.zeros(3))
    out = cal.p_good(np.array([[0.0, np.nan], [0.0, 0.0]]))
    assert np.isnan(out[0]) and np.isfinite(out[1])


def test_platt_smoothing_keeps_away_from_extremes() -> None:
    s = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    y = np.array([1, 1, 1, 0, 0, 0])  # separable: plain Platt saturates with a large C
    hard = PlattCalibrator(C=1e4).fit(s, y).p_good([-3.0, 3.0])
    soft = PlattCalibrator(C=1e4, smooth_targets=True).fit(s, y).p_good([-3.0, 3.0])
    assert hard[0] > soft[0] and hard[1] < soft[1]
    assert soft[0] < 0.9 and soft[1] > 0.1


@pytest.mark.parametrize(
    ("cls", "state", "match"),
    [
        (PlattCalibrator, {"coef_": [1.0], "intercept_": 0.0, "mean_": [0.0]}, "scale_"),
        (PlattCalibrator, {"coef_": [1.0, 2.0], "intercept_": 0.0, "mean_": [0.0],
                           "scale_": [1.0], "n_features_in_": 1}, "shape"),
        (PlattCalibrator, {"coef_": [1.0], "intercept_": "x", "mean_": [0.0],
                           "scale_": [1.0], "n_features_in_": 1}, "intercept_"),
        (IsotonicCalibrator, {"increasing_": False, "X_thresholds_": [1.0, 0.0],
                              "y_thresholds_": [0.0, 1.0], "n_features_in_": 1}, "increasing"),
        (IsotonicCalibrator, [1, 2], "dict"),
    ],
)
def test_bad_state(cls: type[Calibrator], state, match: str) -> None:
    with pytest.raises(SerializationError, match=match):
        cls().set_state(state)


def test_gbm_stacks_interacting_scores_and_round_trips() -> None:
    """An XOR of two scores: no monotone (Platt) map can use it, the boosted trees can."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s = rng.normal(size=(2000, 2))
    y = ((s[:, 0] > 0) == (s[:, 1] > 0)).astype(int)
    s_te = rng.normal(size=(2000, 2))
    y_te = ((s_te[:, 0] > 0) == (s_te[:, 1] > 0)).astype(int)
    gbm = GBMCalibrator().fit(s, y)
    assert roc_auc_score(y_te, gbm.p_good(s_te)) > 0.95
    assert roc_auc_score(y_te, PlattCalibrator().fit(s, y).p_good(s_te)) < 0.6
    from sklearn.ensemble import HistGradientBoostingClassifier

    ref = HistGradientBoostingClassifier(early_stopping=False, max_leaf_nodes=15,
                                         min_samples_leaf=20, random_state=0).fit(s, y)
    np.testing.assert_allclose(gbm.p_good(s_te), ref.predict_proba(s_te)[:, 1], atol=1e-9)
    again = GBMCalibrator().set_state(gbm.get_state())
    np.testing.assert_array_equal(again.p_good(s_te), gbm.p_good(s_te))
    bad = dict(gbm.get_state())
    bad["left_"] = np.zeros_like(bad["left_"])
    with pytest.raises(SerializationError, match="children point forward"):
        GBMCalibrator().set_state(bad)
