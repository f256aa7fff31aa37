"""Calibrators, policies and query routers are native scikit-learn estimators.

Every test runs real scikit-learn machinery (clone, Pipeline, GridSearchCV,
cross_val_predict, cross_val_score, check_is_fitted, CalibrationDisplay) on seeded
synthetic data with a real signal, and checks values, not only types.
"""

from __future__ import annotations

import json
import pickle
from importlib import resources

import matplotlib
import numpy as np
import pytest
import sklearn.exceptions
from scipy.special import expit
from sklearn.base import clone, is_classifier
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import (
    GridSearchCV,
    StratifiedKFold,
    cross_val_predict,
    cross_val_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import get_tags
from sklearn.utils.validation import check_is_fitted

from confroute.calibration import (
    Calibrator,
    GBMCalibrator,
    IsotonicCalibrator,
    PlattCalibrator,
)
from confroute.errors import ConfrouteError, NotFittedError
from confroute.policies import BudgetPolicy, ThresholdPolicy
from confroute.predictive.routers import KNNRouter, MLPRouter, QueryRouter, SWRankingRouter

matplotlib.use("Agg")

CV = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)


def scores_and_labels(n: int = 600, k: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uncertainty scores (higher = less likely good) and 0/1 'good' labels drawn from them."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, k))
    logit = -2.0 * s[:, 0] + (1.0 * s[:, 1] if k > 1 else 0.0) + 0.3
    y = (rng.random(n) < expit(logit)).astype(int)
    return (s[:, 0] if k == 1 else s), y


def embeddings_and_wins(n: int = 400, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Query embeddings; the strong model wins (1) mostly where the first coordinate is high."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (rng.random(n) < expit(3.0 * X[:, 0])).astype(int)
    return X, y


CALIBRATORS = {
    "isotonic": (IsotonicCalibrator, 1),
    "platt": (PlattCalibrator, 1),
    "platt-2d": (PlattCalibrator, 2),
    "gbm-2d": (GBMCalibrator, 2),
}


# ----------------------------------------------------------------------------- errors


def test_not_fitted_error_is_also_sklearns_and_still_confroutes() -> None:
    with pytest.raises(sklearn.exceptions.NotFittedError) as info:
        PlattCalibrator().p_good([0.1])
    e = info.value
    assert isinstance(e, NotFittedError)
    assert isinstance(e, ConfrouteError)
    assert isinstance(e, ValueError) and isinstance(e, AttributeError)
    assert type(e).__name__ == "NotFittedError"
    assert "call fit(scores, labels) first" in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is type(e) and again.args == e.args
    # raised directly, outside any estimator, it is sklearn's too
    assert isinstance(NotFittedError("call fit first"), sklearn.exceptions.NotFittedError)


# ----------------------------------------------------------------------------- calibrators


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_calibrator_is_a_binary_classifier(name: str) -> None:
    cls, k = CALIBRATORS[name]
    cal = cls()
    assert is_classifier(cal)
    tags = get_tags(cal)
    assert tags.estimator_type == "classifier" and tags.input_tags.allow_nan
    assert tags.classifier_tags is not None and not tags.classifier_tags.multi_class
    with pytest.raises(sklearn.exceptions.NotFittedError):
        check_is_fitted(cal)
    X, y = scores_and_labels(k=k)
    assert cal.fit(X, y) is cal
    check_is_fitted(cal)
    np.testing.assert_array_equal(cal.classes_, [0, 1])
    proba = cal.predict_proba(X)
    assert proba.shape == (X.shape[0], 2)
    assert ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(proba[:, 1], cal.p_good(X))
    assert cal.p_good(X).shape == (X.shape[0],)
    pred = cal.predict(X)
    np.testing.assert_array_equal(pred, cal.classes_[proba.argmax(axis=1)])
    assert roc_auc_score(y, proba[:, 1]) > 0.7
    assert cal.score(X, y) > 0.65  # accuracy, from ClassifierMixin


def test_nan_rows_keep_nan_probabilities_and_predict_bad() -> None:
    X, y = scores_and_labels()
    cal = PlattCalibrator().fit(X, y)
    proba = cal.predict_proba([0.0, np.nan])
    assert np.isfinite(proba[0]).all() and np.isnan(proba[1]).all()
    np.testing.assert_array_equal(cal.predict([-3.0, np.nan, 3.0]), [1, 0, 0])


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_calibrator_clone_gives_an_unfitted_copy_with_the_same_params(name: str) -> None:
    cls, k = CALIBRATORS[name]
    X, y = scores_and_labels(k=k)
    params = ({"y_max": 0.9} if cls is IsotonicCalibrator else {"max_iter": 20}
              if cls is GBMCalibrator else {"C": 0.5})
    cal = cls(**params).fit(X, y)
    twin = clone(cal)
    assert type(twin) is cls and twin is not cal
    assert twin.get_params() == cal.get_params()
    assert not hasattr(twin, "classes_")
    with pytest.raises(sklearn.exceptions.NotFittedError):
        check_is_fitted(twin)
    np.testing.assert_allclose(twin.fit(X, y).predict_proba(X), cal.predict_proba(X))


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_cross_val_predict_and_score(name: str) -> None:
    cls, k = CALIBRATORS[name]
    X, y = scores_and_labels(k=k)
    proba = cross_val_predict(cls(), X, y, cv=CV, method="predict_proba")
    assert proba.shape == (X.shape[0], 2)
    assert ((proba >= 0) & (proba <= 1)).all()
    assert roc_auc_score(y, proba[:, 1]) > 0.7
    auc = cross_val_score(cls(), X, y, cv=CV, scoring="roc_auc")
    assert auc.shape == (5,) and auc.mean() > 0.7
    acc = cross_val_score(cls(), X, y, cv=CV)  # default scoring: accuracy
    assert acc.mean() > 0.65


def test_pipeline_scaler_then_platt_matches_platts_own_standardisation() -> None:
    X, y = scores_and_labels(k=2)
    pipe = make_pipeline(StandardScaler(), PlattCalibrator(standardize=False)).fit(X, y)
    own = PlattCalibrator(standardize=True).fit(X, y)
    assert is_classifier(pipe)
    np.testing.assert_array_equal(pipe.classes_, [0, 1])
    proba = pipe.predict_proba(X)
    assert proba.shape == (X.shape[0], 2)
    np.testing.assert_allclose(proba, own.predict_proba(X), atol=1e-6)
    assert roc_auc_score(y, proba[:, 1]) > 0.7
    # the pipeline tunes like any classifier: a nested parameter through the grid
    search = GridSearchCV(pipe, {"plattcalibrator__C": [1e-4, 1.0]}, cv=CV,
                          scoring="neg_log_loss").fit(X, y)
    assert search.best_params_ == {"plattcalibrator__C": 1.0}


def test_grid_search_over_platt_C_prefers_the_weakly_penalised_fit() -> None:
    X, y = scores_and_labels(k=2)
    search = GridSearchCV(PlattCalibrator(), {"C": [1e-4, 1.0]}, cv=CV,
                          scoring="neg_log_loss").fit(X, y)
    # C=1e-4 shrinks both weights to ~0, i.e. predicts the base rate: a worse log-loss
    assert search.best_params_ == {"C": 1.0}
    loss = -search.cv_results_["mean_test_score"]
    assert loss[1] < loss[0] - 0.1
    np.testing.assert_array_equal(search.best_estimator_.classes_, [0, 1])
    assert search.predict_proba(X).shape == (X.shape[0], 2)


def test_grid_search_over_isotonic_direction_finds_uncertainty_is_decreasing() -> None:
    X, y = scores_and_labels()
    search = GridSearchCV(IsotonicCalibrator(), {"increasing": [True, False]}, cv=CV,
                          scoring="roc_auc").fit(X, y)
    assert search.best_params_ == {"increasing": False}
    assert search.best_score_ > 0.7
    assert search.best_estimator_.increasing_ is False


@pytest.mark.parametrize("name", ["isotonic", "platt"])
def test_calibration_display_from_estimator(name: str) -> None:
    import matplotlib.pyplot as plt

    cls, _ = CALIBRATORS[name]
    X, y = scores_and_labels(n=3000, seed=1)
    X_te, y_te = scores_and_labels(n=3000, seed=2)
    cal = cls().fit(X, y)
    disp = CalibrationDisplay.from_estimator(cal, X_te, y_te, n_bins=8)
    try:
        assert disp.prob_true.shape == disp.prob_pred.shape and disp.prob_true.size >= 5
        assert ((disp.prob_pred >= 0) & (disp.prob_pred <= 1)).all()
        # a calibrator fitted on the same distribution is close to the diagonal
        assert np.abs(disp.prob_true - disp.prob_pred).max() < 0.1
        np.testing.assert_array_equal(disp.y_prob, cal.p_good(X_te))
    finally:
        plt.close("all")


def test_saved_states_still_load_as_classifiers() -> None:
    # a state written before calibrators were classifiers (no classes_ key)
    old = {"coef_": [-2.0], "intercept_": 0.5, "mean_": [0.0], "scale_": [1.0],
           "n_features_in_": 1}
    cal = PlattCalibrator().set_state(json.loads(json.dumps(old)))
    check_is_fitted(cal)
    np.testing.assert_array_equal(cal.classes_, [0, 1])
    np.testing.assert_allclose(cal.p_good([0.0, 1.0]), expit([0.5, -1.5]))
    assert cal.predict_proba([0.0, 1.0]).shape == (2, 2)
    assert "classes_" not in cal.get_state()  # the saved format is unchanged


def test_shipped_default_router_calibrator_loads_as_a_classifier() -> None:
    from confroute import Router

    with resources.as_file(resources.files("confroute.data") / "default_router.json") as path:
        router = Router.load(path)
    cal: Calibrator = router.calibrator
    assert is_classifier(cal) and cal.name == "isotonic"
    check_is_fitted(cal)
    np.testing.assert_array_equal(cal.classes_, [0, 1])
    grid = np.linspace(0.0, 6.0, 25)
    p = cal.p_good(grid)
    assert ((p >= 0) & (p <= 1)).all() and p[0] > p[-1]
    assert (np.diff(p) <= 1e-12).all()  # isotonic, decreasing in the uncertainty score
    np.testing.assert_allclose(cal.predict_proba(grid)[:, 1], p)


# ----------------------------------------------------------------------------- policies


def test_policy_is_an_estimator_with_sklearn_fitted_checks() -> None:
    p_good = expit(np.random.default_rng(0).normal(size=500))
    pol = BudgetPolicy(max_cloud_fraction=0.2, enforce="none")
    assert not is_classifier(pol)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        check_is_fitted(pol)
    with pytest.raises(sklearn.exceptions.NotFittedError, match=r"call fit\(p_good\) first"):
        pol.decide(p_good)
    pol.fit(p_good)
    check_is_fitted(pol)
    assert pol.decide(p_good).mean() == pytest.approx(0.2, abs=0.005)
    twin = clone(pol)
    assert twin.get_params() == pol.get_params() and twin.max_cloud_fraction == 0.2
    with pytest.raises(sklearn.exceptions.NotFittedError):
        check_is_fitted(twin)
    twin.set_params(max_cloud_fraction=0.5).fit(p_good)
    assert twin.decide(p_good).mean() == pytest.approx(0.5, abs=0.005)
    # a policy that needs no fit counts as fitted
    check_is_fitted(ThresholdPolicy(min_p_good=0.3))


# ----------------------------------------------------------------------------- query routers


@pytest.mark.parametrize("factory", [lambda: KNNRouter(k=15), lambda: SWRankingRouter()])
def test_query_router_is_a_binary_classifier(factory) -> None:  # type: ignore[no-untyped-def]
    X, y = embeddings_and_wins()
    router: QueryRouter = factory()
    assert is_classifier(router)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        check_is_fitted(router)
    with pytest.raises(sklearn.exceptions.NotFittedError, match=r"call fit\(embeddings, labels\)"):
        router.predict_proba(X)
    router.fit(X[:300], y[:300])
    check_is_fitted(router)
    np.testing.assert_array_equal(router.classes_, [0, 1])
    proba = router.predict_proba(X[300:])
    assert proba.shape == (100, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(proba[:, 1], router.p_strong(X[300:]))
    np.testing.assert_array_equal(router.predict(X[300:]), proba.argmax(axis=1))
    assert roc_auc_score(y[300:], proba[:, 1]) > 0.7
    twin = clone(router)
    assert twin.get_params() == router.get_params() and not hasattr(twin, "classes_")


def test_query_router_through_model_selection() -> None:
    X, y = embeddings_and_wins()
    proba = cross_val_predict(KNNRouter(k=15), X, y, cv=CV, method="predict_proba")
    assert proba.shape == (X.shape[0], 2) and ((proba >= 0) & (proba <= 1)).all()
    assert roc_auc_score(y, proba[:, 1]) > 0.7
    auc = cross_val_score(SWRankingRouter(), X, y, cv=CV, scoring="roc_auc")
    assert auc.mean() > 0.7
    # one neighbour only votes 0/1, a wider vote ranks far better on noisy labels
    search = GridSearchCV(KNNRouter(), {"k": [1, 25]}, cv=CV, scoring="roc_auc").fit(X, y)
    assert search.best_params_ == {"k": 25}
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0] + 0.05


def test_trained_router_clones_and_predicts_in_sklearn_layout() -> None:
    X, y = embeddings_and_wins(n=200)
    router = MLPRouter(hidden=8, epochs=60, lr=0.05).fit(X, y)
    twin = clone(router).fit(X, y)  # same seed: the same network
    np.testing.assert_allclose(twin.predict_proba(X), router.predict_proba(X), atol=1e-6)
    assert roc_auc_score(y, router.predict_proba(X)[:, 1]) > 0.7
