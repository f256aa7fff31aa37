"""Calibrators: map uncertainty scores to P(edge answer is good).

A calibrator is fitted on held-out ``(scores, labels)`` pairs, where ``scores``
are estimator outputs (**higher = more uncertain**, one column per estimator)
and ``labels`` are 1 when the edge answer was good. ``p_good`` returns the
calibrated probability that a new edge answer is good, shape (n,), which a
:class:`~confroute.policies.Policy` turns into a keep/escalate decision.

Calibrators are scikit-learn binary classifiers (``classes_ = [0, 1]``, 1 =
good): ``predict_proba`` returns shape (n, 2) ``[P(bad), P(good)]`` and
``predict`` returns 0/1, so ``clone``, ``Pipeline``, ``GridSearchCV``,
``cross_val_predict`` and ``CalibrationDisplay`` work on them.

References
----------
.. [1] B. Zadrozny and C. Elkan, "Transforming classifier scores into accurate
   multiclass probability estimates", KDD 2002.
.. [2] J. Platt, "Probabilistic outputs for support vector machines and
   comparisons to regularized likelihood methods", Advances in Large Margin
   Classifiers, 1999.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
from sklearn.base import ClassifierMixin

from confroute._params import ParamCheck, ParamsMixin, read_state, validate_params
from confroute._registry import Registry
from confroute._validation import (
    check_array,
    check_bool,
    check_float,
    check_int,
    check_labels,
    check_same_length,
    param_error,
)
from confroute.errors import InvalidParameterError, NotFittedError, SerializationError

__all__ = [
    "Calibrator",
    "IsotonicCalibrator",
    "PlattCalibrator",
    "calibrator_registry",
]

_C = TypeVar("_C", bound="Calibrator")



#: Standardised scores are clipped to +-_Z_MAX so products with coefficients stay finite.
_Z_MAX = 1e150


def _mean_and_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and standard deviation without overflow for scores near +-1.8e308.

    Computed on ``x / max|x|`` (values in [-1, 1]) and scaled back; a zero
    deviation becomes 1 (constant columns are only centred).
    """
    top = np.abs(x).max(axis=0)
    top[top == 0] = 1.0
    unit = x / top
    mean = unit.mean(axis=0) * top
    scale = unit.std(axis=0) * top
    scale[scale == 0] = 1.0
    return mean, scale


def _standardized(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - mean) / scale`` computed as ``x / scale - mean / scale`` and clipped.

    The difference ``x - mean`` can overflow for extreme scores; the quotients
    cannot exceed what the clip bounds, so logits stay finite.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        z = x / scale - mean / scale
    return np.nan_to_num(np.clip(z, -_Z_MAX, _Z_MAX), nan=0.0)


def _check_positive_float(value: Any, name: str, owner: str) -> float:
    return check_float(value, name, owner, min_value=0.0, min_inclusive=False)


def _check_unit_float(value: Any, name: str, owner: str) -> float:
    return check_float(value, name, owner, min_value=0.0, max_value=1.0)


def _check_direction(value: Any, name: str, owner: str) -> str | bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value == "auto":
        return "auto"
    raise param_error(name, owner, "'auto', True or False", value,
                      type_error=not isinstance(value, str))


class Calibrator(ClassifierMixin, ParamsMixin, ABC):
    """Maps uncertainty scores to the probability that the edge answer is good.

    Subclasses declare their parameters in ``_param_checks`` (validated at
    :meth:`fit`), their learned state in ``_state_spec``, and implement
    ``_fit`` / ``_predict`` on validated 2-D arrays.

    Conventions: ``scores`` (scikit-learn's ``X``) is array-like of shape (n,)
    for one estimator or (n, k) for k estimators used as features; labels
    (``y``) are 1 for a good edge answer and 0 for a bad one. Learned attributes
    end in ``_``. A calibrator is a scikit-learn binary classifier: confroute
    code calls :meth:`p_good` (shape (n,)); scikit-learn calls
    :meth:`predict_proba` (shape (n, 2)) and :meth:`predict`.

    Attributes
    ----------
    classes_ : ndarray of shape (2,)
        Always ``array([0, 1])`` (0 = bad edge answer, 1 = good), set by fit.
    n_features_in_ : int
        Number of score columns seen in fit.
    """

    #: For scikit-learn < 1.6, whose ``is_classifier`` reads this instead of the tags.
    _estimator_type: ClassVar[str] = "classifier"

    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {}
    _state_spec: ClassVar[Mapping[str, str]] = {}
    #: Largest number of score columns the calibrator accepts (None = any).
    _max_features: ClassVar[int | None] = None

    @property
    def name(self) -> str:
        """Registered name (class name when unregistered)."""
        return str(getattr(type(self), "_registry_name", type(self).__name__))

    # -- public API -----------------------------------------------------------------------
    def fit(self: _C, scores: Any, labels: Any) -> _C:
        """Learn the score -> P(good) map from held-out data.

        Parameters
        ----------
        scores : array-like of shape (n,) or (n, k)
            Uncertainty scores (higher = more uncertain), finite.
        labels : array-like of shape (n,)
            1 if the edge answer was good, 0 otherwise; both classes must occur.

        Returns
        -------
        self
        """
        owner = type(self).__name__
        params = validate_params(self, self._param_checks)
        x = self._check_scores(scores, fitting=True)
        y = check_labels(labels, "labels", owner)
        check_same_length(f"{owner}.fit", scores=x, labels=y)
        self._fit(x, y, params)
        self.n_features_in_ = int(x.shape[1])
        self.classes_ = np.array([0, 1])
        return self

    def p_good(self, scores: Any) -> np.ndarray:
        """Calibrated probability that each edge answer is good.

        Parameters
        ----------
        scores : array-like of shape (n,) or (n, k)
            Same number of columns as at fit. NaN is allowed (an estimator
            could not score) and gives a NaN probability, which the policy
            escalates by default; infinite scores are an error.

        Returns
        -------
        ndarray of shape (n,)
            P(good) in [0, 1], NaN where any score of the row is NaN.
        """
        self._check_fitted()
        x = self._check_scores(scores, fitting=False)
        out = np.full(x.shape[0], np.nan)
        ok = ~np.isnan(x).any(axis=1)
        if ok.any():
            out[ok] = np.clip(self._predict(x[ok]), 0.0, 1.0)
        return out

    def predict_proba(self, scores: Any) -> np.ndarray:
        """Class probabilities in scikit-learn's layout, columns ordered as ``classes_``.

        Parameters
        ----------
        scores : array-like of shape (n,) or (n, k)
            As for :meth:`p_good`.

        Returns
        -------
        ndarray of shape (n, 2)
            ``[P(bad), P(good)]`` per row (rows sum to 1); both NaN where
            :meth:`p_good` is NaN.
        """
        p = self.p_good(scores)
        return np.column_stack([1.0 - p, p])

    def predict(self, scores: Any) -> np.ndarray:
        """Predicted label: 1 (good) where P(good) > 0.5, else 0 (the argmax of predict_proba).

        Parameters
        ----------
        scores : array-like of shape (n,) or (n, k)
            As for :meth:`p_good`.

        Returns
        -------
        ndarray of int of shape (n,)
            0 or 1; a NaN probability (unscorable) predicts 0, as the default
            policy escalates it.
        """
        return (self.p_good(scores) > 0.5).astype(np.int64)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.one_d_array = True
        tags.input_tags.allow_nan = True
        tags.classifier_tags.multi_class = False
        return tags

    def get_state(self) -> dict[str, Any]:
        """Learned values (arrays and scalars) for safe JSON persistence."""
        self._check_fitted()
        state: dict[str, Any] = {}
        for key, kind in self._state_spec.items():
            value = getattr(self, key)
            state[key] = np.array(value, dtype=np.float64) if kind == "array" else value
        state["n_features_in_"] = self.n_features_in_
        return state

    def set_state(self: _C, state: Mapping[str, Any]) -> _C:
        """Restore what :meth:`get_state` returned; the calibrator is then fitted."""
        spec = {**self._state_spec, "n_features_in_": "int"}
        values = read_state(state, spec, type(self).__name__)
        self._check_state(values)
        for key, value in values.items():
            setattr(self, key, value)
        self.classes_ = np.array([0, 1])
        return self

    # -- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    def _fit(self, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> None:
        """Fit on ``x`` of shape (n, k) (finite) and ``y`` of shape (n,) in {0, 1}."""

    @abstractmethod
    def _predict(self, x: np.ndarray) -> np.ndarray:
        """P(good) of shape (n,) for finite ``x`` of shape (n, n_features_in_)."""

    def _check_state(self, values: dict[str, Any]) -> None:
        """Cross-checks on a restored state (shapes agree, ...)."""

    # -- helpers --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet: call fit(scores, labels) first."
            )

    def _check_scores(self, scores: Any, *, fitting: bool) -> np.ndarray:
        owner = type(self).__name__
        x = check_array(scores, "scores", owner, ndim=(1, 2), allow_nan=not fitting,
                        allow_empty=not fitting)
        if x.ndim == 1:
            x = x[:, None]
        k = x.shape[1]
        if fitting:
            if self._max_features is not None and k > self._max_features:
                raise InvalidParameterError(
                    f"The 'scores' parameter of {owner} must have shape (n,) or (n, "
                    f"{self._max_features}): this calibrator is one-dimensional. Got {k} "
                    "columns; use PlattCalibrator for several scores."
                )
            if k == 0:
                raise InvalidParameterError(
                    f"The 'scores' parameter of {owner} must have at least one column."
                )
        elif k != self.n_features_in_:
            raise InvalidParameterError(
                f"The 'scores' parameter of {owner} must have {self.n_features_in_} column(s), "
                f"as at fit. Got {k}."
            )
        return x


calibrator_registry: Registry[Calibrator] = Registry(
    "calibrator", Calibrator  # type: ignore[type-abstract]
)


@calibrator_registry.register("isotonic")
class IsotonicCalibrator(Calibrator):
    r"""Isotonic (monotone, non-parametric) calibration of one score [1]_.

    Fits the monotone step function closest to the labels in squared error,

    .. math::

        \hat f = \arg\min_{f\ \text{monotone}} \sum_{i=1}^n \bigl(y_i - f(s_i)\bigr)^2,
        \qquad y_{\min} \le f \le y_{\max},

    by pool-adjacent-violators, and predicts by linear interpolation between the
    fitted points, clipped to the end values outside the fitted score range.

    Parameters
    ----------
    increasing : {"auto", True, False}, default="auto"
        Direction of P(good) in the score. Uncertainty scores are normally
        *decreasing* in P(good). ``"auto"`` uses increasing iff the Spearman rank
        correlation between scores and labels is > 0; a zero or undefined
        correlation (e.g. constant scores) falls back to decreasing, the
        convention for uncertainty scores.
    y_min, y_max : float in [0, 1], default 0 and 1
        Bounds of the fitted probabilities (``y_min <= y_max``).

    Attributes
    ----------
    increasing_ : bool
        Direction used.
    X_thresholds_ : ndarray of shape (n_thresholds,)
        Increasing score knots of the fitted function.
    y_thresholds_ : ndarray of shape (n_thresholds,)
        Fitted P(good) at the knots (monotone).
    n_features_in_ : int
        Always 1.
    """

    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "increasing": _check_direction,
        "y_min": _check_unit_float,
        "y_max": _check_unit_float,
    }
    _state_spec: ClassVar[Mapping[str, str]] = {
        "increasing_": "bool",
        "X_thresholds_": "array",
        "y_thresholds_": "unit_array",
    }
    _max_features: ClassVar[int | None] = 1

    def __init__(
        self, *, increasing: str | bool = "auto", y_min: float = 0.0, y_max: float = 1.0
    ) -> None:
        self.increasing = increasing
        self.y_min = y_min
        self.y_max = y_max

    def _fit(self, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> None:
        from sklearn.isotonic import IsotonicRegression

        if params["y_min"] > params["y_max"]:
            raise param_error("y_min", type(self).__name__,
                              f"<= y_max ({params['y_max']:g})", params["y_min"])
        s = x[:, 0]
        direction = params["increasing"]
        if direction == "auto":
            direction = False
            if np.ptp(s) > 0:
                from scipy.stats import spearmanr

                rho = float(spearmanr(s, y).statistic)
                direction = bool(rho > 0)
        iso = IsotonicRegression(
            increasing=bool(direction), y_min=params["y_min"], y_max=params["y_max"],
            out_of_bounds="clip",
        ).fit(s, y.astype(np.float64))
        self.increasing_ = bool(direction)
        self.X_thresholds_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds_ = np.asarray(iso.y_thresholds_, dtype=np.float64)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        # np.interp holds the end values outside the knots: that is the clipping.
        return np.interp(x[:, 0], self.X_thresholds_, self.y_thresholds_)

    def _check_state(self, values: dict[str, Any]) -> None:
        xs, ys = values["X_thresholds_"], values["y_thresholds_"]
        if xs.shape != ys.shape or xs.size == 0 or np.any(np.diff(xs) < 0):
            raise SerializationError(
                "The 'state' parameter of IsotonicCalibrator.set_state must hold non-empty "
                "X_thresholds_ (increasing) and y_thresholds_ of the same length."
            )
        steps = np.diff(ys) if values["increasing_"] else -np.diff(ys)
        if np.any((ys < 0) | (ys > 1)) or np.any(steps < 0):
            raise SerializationError(
                "The 'state' parameter of IsotonicCalibrator.set_state must hold y_thresholds_ "
                "in [0, 1], monotone in the direction of increasing_ "
                f"({'non-decreasing' if values['increasing_'] else 'non-increasing'})."
            )
        if values["n_features_in_"] != 1:
            raise SerializationError(
                "The 'state' parameter of IsotonicCalibrator.set_state must have n_features_in_ 1."
            )


@calibrator_registry.register("platt")
class PlattCalibrator(Calibrator):
    r"""Logistic (Platt) calibration of one or several scores [2]_.

    With standardised features :math:`z = (s - \mu) / \sigma`,

    .. math::

        P(\text{good} \mid s) = \operatorname{expit}(w^\top z + b),

    where :math:`(w, b)` minimise the L2-penalised log-loss (the intercept is not
    penalised), solved by L-BFGS:

    .. math::

        \sum_{i=1}^n \Bigl[\log\bigl(1 + e^{w^\top z_i + b}\bigr) - t_i\,(w^\top z_i + b)
        \Bigr] + \frac{1}{2C}\,\lVert w \rVert_2^2 .

    The direction of each score is learned by the sign of its coefficient
    (uncertainty scores get negative weights). With ``smooth_targets=True`` the
    targets are Platt's smoothed labels

    .. math::

        t_i = \frac{N_+ + 1}{N_+ + 2} \text{ if } y_i = 1, \qquad
        t_i = \frac{1}{N_- + 2} \text{ if } y_i = 0,

    which keeps probabilities away from 0 and 1 on small calibration sets;
    otherwise :math:`t_i = y_i`.

    Parameters
    ----------
    C : float > 0, default=1.0
        Inverse L2 strength (same convention as scikit-learn).
    standardize : bool, default=True
        Standardise each score column with its calibration mean and standard
        deviation before fitting (constant columns are only centred).
    smooth_targets : bool, default=False
        Use Platt's smoothed targets.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features_in_,)
        Weights on the standardised scores.
    intercept_ : float
    mean_, scale_ : ndarray of shape (n_features_in_,)
        Standardisation (zeros and ones when ``standardize=False``).
    n_features_in_ : int
    """

    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "C": _check_positive_float,
        "standardize": check_bool,
        "smooth_targets": check_bool,
    }
    _state_spec: ClassVar[Mapping[str, str]] = {
        "coef_": "array",
        "intercept_": "float",
        "mean_": "array",
        "scale_": "array",
    }

    def __init__(
        self, *, C: float = 1.0, standardize: bool = True, smooth_targets: bool = False
    ) -> None:
        self.C = C
        self.standardize = standardize
        self.smooth_targets = smooth_targets

    def _fit(self, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> None:
        from scipy.optimize import minimize
        from scipy.special import expit

        k = x.shape[1]
        if params["standardize"]:
            mean, scale = _mean_and_scale(x)
        else:
            mean, scale = np.zeros(k), np.ones(k)
        z = _standardized(x, mean, scale)
        if params["smooth_targets"]:
            n_pos = int(y.sum())
            n_neg = int(y.size - n_pos)
            t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
        else:
            t = y.astype(np.float64)
        inv_c = 1.0 / params["C"]

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:k], theta[k]
            logits = z @ w + b
            value = float(np.sum(np.logaddexp(0.0, logits) - t * logits))
            value += 0.5 * inv_c * float(w @ w)
            resid = expit(logits) - t
            grad = np.empty(k + 1)
            grad[:k] = z.T @ resid + inv_c * w
            grad[k] = resid.sum()
            return value, grad

        prior = float(np.clip(t.mean(), 1e-12, 1 - 1e-12))
        theta0 = np.zeros(k + 1)
        theta0[k] = np.log(prior / (1.0 - prior))
        res = minimize(loss, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": 1000, "gtol": 1e-10})
        if not res.success:
            warnings.warn(
                f"PlattCalibrator: L-BFGS did not fully converge ({res.message}); "
                "try a smaller C.",
                RuntimeWarning,
                stacklevel=3,
            )
        if not np.all(np.isfinite(res.x)):
            raise InvalidParameterError(
                "The 'scores' parameter of PlattCalibrator.fit must have a range a logistic fit "
                "can handle: the fit diverged to non-finite coefficients. Rescale the scores."
            )
        self.coef_ = np.asarray(res.x[:k], dtype=np.float64)
        self.intercept_ = float(res.x[k])
        self.mean_ = np.asarray(mean, dtype=np.float64)
        self.scale_ = np.asarray(scale, dtype=np.float64)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        z = _standardized(x, self.mean_, self.scale_)
        return np.asarray(expit(z @ self.coef_ + self.intercept_))

    def _check_state(self, values: dict[str, Any]) -> None:
        k = values["n_features_in_"]
        shapes = {key: values[key].shape for key in ("coef_", "mean_", "scale_")}
        if k < 1 or any(s != (k,) for s in shapes.values()) or np.any(values["scale_"] <= 0):
            raise SerializationError(
                "The 'state' parameter of PlattCalibrator.set_state must hold coef_, mean_ and "
                f"scale_ (positive) of shape (n_features_in_,) = ({k},). Got shapes {shapes}."
            )


def _check_pos_int(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=1)


def _check_seed(value: Any, name: str, owner: str) -> int:
    return check_int(value, name, owner, min_value=0)


@calibrator_registry.register("gbm")
class GBMCalibrator(Calibrator):
    r"""Gradient-boosted stacking of several scores (probe, log-prob, sampling scores).

    A :class:`sklearn.ensemble.HistGradientBoostingClassifier` (log-loss, no
    monotone constraints, so interactions between scores are learned) fitted on
    the score columns; ``P(good) = expit(b + \sum_t f_t(s))`` over its trees. The
    trees are stored as plain arrays (feature, threshold, children, leaf value)
    and evaluated here, so a saved router holds no pickle.

    Parameters
    ----------
    max_iter : int, default=100
        Boosting iterations (trees).
    learning_rate : float > 0, default=0.1
    max_leaf_nodes : int, default=15
    min_samples_leaf : int, default=20
    l2_regularization : float >= 0, default=0.0
    seed : int, default=0
        ``random_state`` of the booster.

    Attributes
    ----------
    baseline_ : float
        The initial log-odds.
    roots_ : ndarray of shape (n_trees,)
        Index of each tree's root in the node arrays.
    feature_, threshold_, left_, right_, leaf_, value_ : ndarray of shape (n_nodes,)
        Node arrays of all trees (a row goes left when its score <= threshold).
    """

    _param_checks: ClassVar[Mapping[str, ParamCheck]] = {
        "max_iter": _check_pos_int,
        "learning_rate": _check_positive_float,
        "max_leaf_nodes": _check_pos_int,
        "min_samples_leaf": _check_pos_int,
        "l2_regularization": lambda v, n, o: check_float(v, n, o, min_value=0.0),
        "seed": _check_seed,
    }
    _state_spec: ClassVar[Mapping[str, str]] = {
        "baseline_": "float", "roots_": "array", "feature_": "array", "threshold_": "array",
        "left_": "array", "right_": "array", "leaf_": "array", "value_": "array",
    }

    def __init__(self, *, max_iter: int = 100, learning_rate: float = 0.1,
                 max_leaf_nodes: int = 15, min_samples_leaf: int = 20,
                 l2_regularization: float = 0.0, seed: int = 0) -> None:
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.seed = seed

    def _fit(self, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        clf = HistGradientBoostingClassifier(
            max_iter=params["max_iter"], learning_rate=params["learning_rate"],
            max_leaf_nodes=params["max_leaf_nodes"], min_samples_leaf=params["min_samples_leaf"],
            l2_regularization=params["l2_regularization"], random_state=params["seed"],
            early_stopping=False,
        ).fit(x, y)
        # The fitted trees' node records (sklearn keeps them in ``_predictors``).
        nodes = [trees[0].nodes for trees in clf._predictors]  # at least one tree
        sizes = [len(n) for n in nodes]
        offsets = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        cat, shift = np.concatenate(nodes), np.repeat(offsets, sizes)
        self.roots_ = offsets.astype(np.float64)
        self.feature_ = np.asarray(cat["feature_idx"], dtype=np.float64)
        self.threshold_ = np.asarray(cat["num_threshold"], dtype=np.float64)
        self.left_ = np.asarray(cat["left"] + shift, dtype=np.float64)
        self.right_ = np.asarray(cat["right"] + shift, dtype=np.float64)
        self.leaf_ = np.asarray(cat["is_leaf"], dtype=np.float64)
        self.value_ = np.asarray(cat["value"], dtype=np.float64)
        self.baseline_ = 0.0
        self.n_features_in_ = int(x.shape[1])
        # The initial log-odds: the booster's decision minus the sum of its trees.
        self.baseline_ = float(clf.decision_function(x[:1])[0] - self._raw(x[:1])[0])

    def _raw(self, x: np.ndarray) -> np.ndarray:
        """Sum of the trees' leaf values, shape (n,)."""
        feat, left, right = (a.astype(np.int64) for a in (self.feature_, self.left_, self.right_))
        leaf = self.leaf_.astype(bool)
        total = np.full(len(x), self.baseline_)
        rows = np.arange(len(x))
        for root in self.roots_.astype(np.int64):
            node = np.full(len(x), root)
            while not leaf[node].all():
                go_left = x[rows, feat[node]] <= self.threshold_[node]
                node = np.where(leaf[node], node, np.where(go_left, left[node], right[node]))
            total += self.value_[node]
        return total

    def _predict(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        return np.asarray(expit(self._raw(x)))

    def _check_state(self, values: dict[str, Any]) -> None:
        n = len(values["feature_"])
        k = values["n_features_in_"]
        arrays = [values[key] for key in ("feature_", "threshold_", "left_", "right_", "leaf_",
                                          "value_")]
        idx = [values[key] for key in ("roots_", "left_", "right_")]
        leaf = values["leaf_"]
        ok = (k >= 1 and all(a.shape == (n,) for a in arrays)
              and all(((a >= 0) & (a < max(n, 1)) & (a == np.round(a))).all() for a in idx)
              and np.isin(leaf, (0.0, 1.0)).all()
              and ((values["feature_"][leaf == 0] >= 0) & (values["feature_"][leaf == 0] < k)
                   ).all()
              and (values["left_"][leaf == 0] > np.arange(n)[leaf == 0]).all()
              and (values["right_"][leaf == 0] > np.arange(n)[leaf == 0]).all())
        if not ok:
            raise SerializationError(
                "The 'state' parameter of GBMCalibrator.set_state must hold node arrays of one "
                "length whose children point forward inside them and whose features are "
                f"below n_features_in_ ({k})."
            )
