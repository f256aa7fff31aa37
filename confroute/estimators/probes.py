"""Learned uncertainty: probes on the edge model's own hidden states.

A probe is a small classifier (logistic regression by default, optionally a
one-hidden-layer MLP) on the hidden state of one layer of the edge model. It is
fitted on a calibration set (:meth:`LearnedEstimator.fit`; the
:class:`~confroute.router.Router` does it inside ``calibrate``, cross-fitted) and
scores a prompt with the predicted probability that the edge answer is **bad**
(higher = more uncertain, the estimator sign convention).

- :class:`HiddenStateProbe` (post-generation): the mean (``"answer_mean"``) or last
  (``"answer_last"``) hidden state over the greedy answer's tokens, captured in the
  decoding passes that produce the answer (``SampleRequest.hidden_layers``), so no
  extra forward pass (Kadavath et al. 2022; Azaria & Mitchell 2023).
- :class:`PromptProbe` (pre-generation): the hidden state at the prompt's last token
  after one prefill; the router decides before decoding.
- :class:`SemanticEntropyProbe`: predicts whether the semantic entropy of the
  answer is above its calibration median from the answer's hidden state, so it
  needs no correctness labels (Kossen et al. 2024, "Semantic Entropy Probes").

The layer and the regularisation ``C`` are chosen by stratified K-fold
cross-validation (:class:`sklearn.model_selection.GridSearchCV`, ROC AUC) on the
calibration set only. The fitted head is stored as plain arrays (scaler mean and
scale, weights, biases), with the edge model's architecture name and hidden size,
so a saved router holds no pickle, and a probe applied to another model is refused.

References
----------
Kadavath et al., "Language Models (Mostly) Know What They Know", 2022.
Azaria & Mitchell, "The Internal State of an LLM Knows When It's Lying", 2023.
Kossen et al., "Semantic Entropy Probes: Robust and Cheap Hallucination Detection
in LLMs", 2024.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar

import numpy as np

from confroute._validation import (
    check_choice,
    check_int,
    check_labels,
    check_prompts,
    check_same_length,
    param_error,
)
from confroute.errors import EstimationError, InvalidParameterError, NotFittedError
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest, collect_samples
from confroute.types import Prompt, Samples

__all__ = [
    "DEFAULT_C",
    "HiddenStateProbe",
    "LearnedEstimator",
    "PromptProbe",
    "SemanticEntropyProbe",
    "check_model_signature",
    "shared_probe_fits",
]


#: The default grid of the inverse regularisation strength searched by cross-validation.
DEFAULT_C: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)

_FIT_MEMO: ContextVar[dict[tuple[Any, ...], dict[str, Any]] | None] = ContextVar(
    "confroute_probe_fit_memo", default=None)


@contextlib.contextmanager
def shared_probe_fits() -> Iterator[dict[tuple[Any, ...], dict[str, Any]]]:
    """Fit each distinct probe search once inside this block.

    A probe's layer/C search is a deterministic function of its parameters, its
    features, its targets and the model's signature. Inside the block a search
    repeated on identical inputs (the same probe calibrated in several routers, or
    the folds of :meth:`LearnedEstimator.cross_fit` run again) restores the state
    found the first time instead of refitting; results are identical, only the
    repeated work is skipped. Useful when comparing routers that share a probe.

    Yields
    ------
    dict
        The memo (one entry per distinct search), for inspection.

    Examples
    --------
    >>> from confroute.estimators import shared_probe_fits
    >>> with shared_probe_fits() as memo:
    ...     len(memo)
    0
    """
    memo: dict[tuple[Any, ...], dict[str, Any]] = {}
    token = _FIT_MEMO.set(memo)
    try:
        yield memo
    finally:
        _FIT_MEMO.reset(token)


def _check_layers(value: Any, owner: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    ok = (isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value))
    if not ok:
        raise param_error("layers", owner, "a non-empty tuple of non-negative layer indices "
                          "(0 = embeddings, i = after block i; e.g. (8, 12, 16) for a 30-layer "
                          "model)", value, type_error=value is not None and not isinstance(
                              value, (list, tuple)))
    return tuple(sorted(set(value)))


def _check_cs(value: Any, owner: str) -> tuple[float, ...]:
    vals = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    ok = isinstance(vals, (list, tuple)) and len(vals) > 0 and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) and c > 0
        for c in vals)
    if not ok:
        raise param_error("C", owner, "a positive float or a non-empty tuple of them (the grid "
                          "searched by cross-validation)", value)
    return tuple(float(c) for c in vals)


def check_model_signature(
    expected: Mapping[str, Any] | None, model: LanguageModel | None, owner: str
) -> None:
    """Refuse a fitted probe on a model other than the one it was trained on.

    Raises
    ------
    InvalidParameterError
        If ``model`` reports an architecture or hidden size other than ``expected``.
    """
    arch = getattr(model, "architecture", None)
    if expected is None or not callable(arch):
        return
    got = arch()
    for key in ("architecture", "hidden_size"):
        if expected.get(key) is not None and got.get(key) != expected.get(key):
            raise InvalidParameterError(
                f"The 'model' parameter of {owner} must be the model the probe was trained "
                f"on ({expected.get('architecture')}, hidden size {expected.get('hidden_size')})"
                f". Got {got.get('architecture')} with hidden size {got.get('hidden_size')}."
            )


def _head_forward(z: np.ndarray, weights: Sequence[np.ndarray],
                  biases: Sequence[np.ndarray]) -> np.ndarray:
    """Probability of the positive class: ReLU hidden layers, logistic output; (n,)."""
    for w, b in zip(weights[:-1], biases[:-1]):
        z = np.maximum(z @ w + b, 0.0)
    logit = (z @ weights[-1] + biases[-1]).reshape(-1)
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(logit, -500, 500))), dtype=np.float64)


class LearnedEstimator(UncertaintyEstimator):
    """Base of estimators fitted on a calibration set (hidden-state probes).

    Subclasses supply :meth:`features` (what the probe reads) and may override
    :meth:`targets` (what it predicts: by default 1 = the edge answer is bad).
    Scores are the predicted probability of the target, higher = more uncertain.

    Parameters (shared)
    -------------------
    layers : int or tuple of int
        Candidate layers (indices into the model's hidden states); the best one
        is chosen by cross-validation.
    C : float or tuple of float, default :data:`DEFAULT_C`
        Inverse regularisation strength (grid searched by cross-validation). The
        default grid reaches strong regularisation (1e-4): hidden states are wide
        (hundreds to thousands of features) and the bad-or-good signal is spread
        thinly over them, so with a few hundred positive labels the best probes are
        heavily regularised.
    kind : {"logistic", "mlp"}, default "logistic"
        The probe: logistic regression, or an MLP with one hidden layer of 64
        units (``alpha = 1 / C``).
    n_folds : int, default 5
        Folds of the layer/C search and of :meth:`cross_fit`.
    seed : int, default 0
        Seed of the fold split and of the MLP's initialisation.

    Attributes
    ----------
    layer_ : int
        The chosen layer.
    C_ : float
    mean_, scale_ : ndarray of shape (hidden_size,)
        Standardisation of the features.
    weights_, biases_ : list of ndarray
        The head's layers (one for logistic regression).
    signature_ : dict or None
        ``{"architecture", "hidden_size"}`` of the model the probe was fitted on.
    cv_auroc_ : float
        Cross-validated AUROC of the chosen layer and C.
    """

    needs_fit: ClassVar[bool] = True
    _MLP_HIDDEN: ClassVar[int] = 64

    layers: Any
    C: Any
    kind: Any
    n_folds: Any
    seed: Any

    # ----------------------------------------------------------- to override
    def features(
        self, samples: Sequence[Samples], model: LanguageModel | None, layers: Sequence[int]
    ) -> np.ndarray:
        """Features of each prompt, shape (n_prompts, len(layers), hidden_size); NaN rows
        where a prompt has none (e.g. an empty answer)."""
        raise NotImplementedError

    def targets(
        self, samples: Sequence[Samples], labels: np.ndarray, model: LanguageModel | None
    ) -> np.ndarray:
        """What the probe predicts, shape (n,): 1 - label (1 = bad answer), NaN unknown."""
        return np.where(np.isnan(labels), np.nan, 1.0 - labels)

    # ------------------------------------------------------------------ params
    def _checked(self) -> dict[str, Any]:
        owner = type(self).__name__
        return {
            "layers": _check_layers(self.layers, owner),
            "C": _check_cs(self.C, owner),
            "kind": check_choice(self.kind, "kind", owner, ("logistic", "mlp")),
            "n_folds": check_int(self.n_folds, "n_folds", owner, min_value=2),
            "seed": check_int(self.seed, "seed", owner, min_value=0),
        }

    def active_layers(self) -> tuple[int, ...]:
        """All candidate layers before fitting, only the chosen one after."""
        layer = getattr(self, "layer_", None)
        return (int(layer),) if layer is not None else self._checked()["layers"]

    def check_fitted(self) -> None:
        if getattr(self, "weights_", None) is None:
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet: call fit(prompts, samples, "
                "labels, model) or calibrate a Router that holds it first."
            )

    # ------------------------------------------------------------------ fitting
    def _prepare_fit(
        self, prompts: Sequence[Prompt], samples: Sequence[Samples] | None, labels: Any,
        model: LanguageModel | None,
    ) -> tuple[np.ndarray, np.ndarray, list[Samples]]:
        owner = f"{type(self).__name__}.fit"
        plist = check_prompts(prompts, owner)
        self._checked()
        y = np.full(len(plist), np.nan) if labels is None else np.asarray(labels, dtype=float)
        check_same_length(owner, prompts=plist, labels=y)
        for k in ("layer_", "weights_"):
            self.__dict__.pop(k, None)  # refit from scratch: request every candidate layer
        used = collect_samples(model, plist, self.sample_requests(), existing=samples)
        used = self.prepare_samples(used, model)
        X = self.features(used, model, self._checked()["layers"])
        return X, self.targets(used, y, model), used

    def fit(
        self, prompts: Sequence[Prompt], samples: Sequence[Samples] | None = None,
        labels: Any = None, model: LanguageModel | None = None,
    ) -> LearnedEstimator:
        """Choose the layer and C by cross-validation and fit the probe.

        Parameters
        ----------
        prompts : sequence of Prompt, length n
        samples : sequence of Samples of length n, optional
            Generations to reuse (with the hidden states the probe needs).
        labels : array-like of shape (n,), optional
            1 = edge answer good, 0 = bad, NaN = unknown (left out). Not needed by
            :class:`SemanticEntropyProbe`.
        model : LanguageModel, optional
            The edge model (generates what ``samples`` lack; its signature is recorded).

        Returns
        -------
        self
        """
        X, t, _ = self._prepare_fit(prompts, samples, labels, model)
        self._fit_arrays(X, t, model)
        return self

    def cross_fit(
        self, prompts: Sequence[Prompt], samples: Sequence[Samples] | None = None,
        labels: Any = None, model: LanguageModel | None = None,
    ) -> tuple[np.ndarray, list[Samples]]:
        """Out-of-fold scores of the calibration set, then fit on all of it.

        Each usable row is scored by a probe (layer and C chosen again inside the
        fold) fitted on the other folds, so a calibrator fitted on these scores
        never sees a score of a probe trained on the same row.

        Returns
        -------
        scores : ndarray of shape (n,)
            Out-of-fold scores (rows without a target get the final probe's score).
        samples : list of Samples
            The samples used (with anything the probe generated).
        """
        from sklearn.base import clone
        from sklearn.model_selection import StratifiedKFold

        X, t, used = self._prepare_fit(prompts, samples, labels, model)
        self._fit_arrays(X, t, model)
        oof = self._score_arrays(X[:, [self._layer_pos()]])
        use = np.flatnonzero(~np.isnan(t) & np.isfinite(X).all(axis=(1, 2)))
        folds = StratifiedKFold(self._folds(t[use]), shuffle=True, random_state=int(self.seed))
        for train, test in folds.split(use, t[use]):
            part = clone(self)
            part._fit_arrays(X[use[train]], t[use[train]], model)
            oof[use[test]] = part._score_arrays(X[use[test]][:, [part._layer_pos()]])
        return oof, used

    def _layer_pos(self) -> int:
        return self._checked()["layers"].index(int(self.layer_))

    def _folds(self, t: np.ndarray) -> int:
        minority = int(min((t == 1).sum(), (t == 0).sum()))
        if minority < 2:
            raise InvalidParameterError(
                f"{type(self).__name__} needs at least 2 calibration prompts of each target "
                f"class to be fitted by cross-validation. Got {minority} in the smaller class."
            )
        return min(int(self.n_folds), minority)

    def _fit_arrays(self, X: np.ndarray, t: np.ndarray, model: LanguageModel | None) -> None:
        """Grid-search layer and C on (X (n, n_layers, h), t (n,)) and keep the best head."""
        from sklearn.model_selection import GridSearchCV, StratifiedKFold

        p = self._checked()
        ok = ~np.isnan(t) & np.isfinite(X).all(axis=(1, 2))
        Xu, tu = X[ok], check_labels(t[ok], "targets", type(self).__name__).astype(int)
        memo, key = _FIT_MEMO.get(), None
        if memo is not None:
            arch = getattr(model, "architecture", None)
            digest = hashlib.blake2b(np.ascontiguousarray(Xu).tobytes(), digest_size=16)
            digest.update(tu.tobytes())
            key = (type(self).__name__, repr(sorted(p.items())), Xu.shape, Xu.dtype.str,
                   digest.hexdigest(), repr(sorted(dict(arch()).items()))
                   if callable(arch) else None)
            if key in memo:
                self.set_state(memo[key])
                return
        cv = StratifiedKFold(self._folds(tu), shuffle=True, random_state=p["seed"])
        best: tuple[float, int, Any] | None = None
        for pos in range(Xu.shape[1]):
            search = GridSearchCV(self._pipeline(p), self._grid(p), scoring="roc_auc", cv=cv)
            search.fit(Xu[:, pos, :], tu)
            if best is None or search.best_score_ > best[0] + 1e-12:
                best = (float(search.best_score_), pos, search)
        assert best is not None
        self._keep(best[2], p["layers"][best[1]], best[0], X.shape[2], model)
        if memo is not None and key is not None:
            state = self.get_state()
            assert state is not None  # fitted just above
            memo[key] = state

    def _pipeline(self, p: Mapping[str, Any]) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        clf: Any = (LogisticRegression(max_iter=2000) if p["kind"] == "logistic" else
                    MLPClassifier((self._MLP_HIDDEN,), max_iter=500, random_state=p["seed"]))
        return Pipeline([("scale", StandardScaler()), ("clf", clf)])

    @staticmethod
    def _grid(p: Mapping[str, Any]) -> dict[str, list[float]]:
        if p["kind"] == "logistic":
            return {"clf__C": list(p["C"])}
        return {"clf__alpha": [1.0 / c for c in p["C"]]}

    def _keep(self, search: Any, layer: int, auroc: float, width: int,
              model: LanguageModel | None) -> None:
        pipe = search.best_estimator_
        scaler, clf = pipe.named_steps["scale"], pipe.named_steps["clf"]
        self.layer_ = int(layer)
        self.C_ = float(search.best_params_.get("clf__C") or 1.0 / search.best_params_[
            "clf__alpha"])
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = np.asarray(scaler.scale_, dtype=np.float64)
        if hasattr(clf, "coefs_"):
            self.weights_ = [np.asarray(w, dtype=np.float64) for w in clf.coefs_]
            self.biases_ = [np.asarray(b, dtype=np.float64) for b in clf.intercepts_]
        else:
            self.weights_ = [np.asarray(clf.coef_, dtype=np.float64).T]
            self.biases_ = [np.asarray(clf.intercept_, dtype=np.float64)]
        self.cv_auroc_ = auroc
        arch = getattr(model, "architecture", None)
        self.signature_ = dict(arch()) if callable(arch) else {"hidden_size": width}

    # ------------------------------------------------------------------ scoring
    def check_model(self, model: LanguageModel | None) -> None:
        """A fitted probe refuses another model before anything is generated."""
        if getattr(self, "weights_", None) is not None:
            check_model_signature(self.signature_, model, type(self).__name__)

    def _score_arrays(self, X: np.ndarray) -> np.ndarray:
        """Scores of features of shape (n, 1, hidden_size) at the chosen layer; (n,)."""
        x = X[:, 0, :].astype(np.float64)
        if x.shape[1] != len(self.mean_):
            raise EstimationError(
                f"{type(self).__name__} was fitted on hidden states of width "
                f"{len(self.mean_)}; the samples hold width {x.shape[1]} (another model?)."
            )
        out = np.full(len(x), np.nan)
        ok = np.isfinite(x).all(axis=1)
        if ok.any():
            out[ok] = _head_forward((x[ok] - self.mean_) / self.scale_, self.weights_,
                                    self.biases_)
        return out

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        self.check_fitted()
        check_model_signature(self.signature_, model, type(self).__name__)
        X = self.features(samples, model, (int(self.layer_),))
        return self._score_arrays(X), {}

    # ------------------------------------------------------------- persistence
    def get_state(self) -> dict[str, Any] | None:
        if getattr(self, "weights_", None) is None:
            return None
        return {"layer": self.layer_, "C": self.C_, "mean": self.mean_, "scale": self.scale_,
                "weights": list(self.weights_), "biases": list(self.biases_),
                "cv_auroc": self.cv_auroc_, "signature": dict(self.signature_ or {})}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a fitted probe, checking every array's shape and finiteness."""
        layers = self._checked()["layers"]
        if int(state["layer"]) not in layers:
            raise ValueError(f"layer {state['layer']} is not one of the layers {layers}")
        mean, scale = (np.asarray(state[k], dtype=np.float64) for k in ("mean", "scale"))
        ws = [np.asarray(w, dtype=np.float64) for w in state["weights"]]
        bs = [np.asarray(b, dtype=np.float64) for b in state["biases"]]
        width = len(mean)
        for w, b in zip(ws, bs):
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise ValueError("the probe's weight shapes do not chain")
            width = w.shape[1]
        arrays = [mean, scale, *ws, *bs]
        if (width != 1 or len(ws) != len(bs) or not ws or scale.shape != mean.shape
                or not all(np.isfinite(a).all() for a in arrays) or (scale <= 0).any()):
            raise ValueError("the probe's arrays are inconsistent or not finite")
        sig = state.get("signature") or {}
        if not isinstance(sig, dict) or int(sig.get("hidden_size", len(mean))) != len(mean):
            raise ValueError("the recorded hidden size does not match the probe's width")
        self.layer_, self.C_, self.cv_auroc_ = int(state["layer"]), float(state["C"]), float(
            state["cv_auroc"])
        self.mean_, self.scale_, self.weights_, self.biases_ = mean, scale, ws, bs
        self.signature_ = dict(sig)


def _answer_features(
    samples: Sequence[Samples], layers: Sequence[int], position: str, owner: str
) -> np.ndarray:
    """Pooled greedy-answer hidden states, shape (n, len(layers), hidden); NaN if empty."""
    rows: list[np.ndarray | None] = []
    for i, s in enumerate(samples):
        g = s.greedy
        if g is None or g.hidden_states is None or not set(layers) <= set(g.hidden_layers):
            raise EstimationError(
                f"{owner} needs the hidden states of layers {tuple(layers)} of the greedy "
                f"answer to prompt {i}; generate it with a local HFLanguageModel (the "
                "samples carry none, e.g. from a remote model or an old cache)."
            )
        hs = g.hidden_states[[list(g.hidden_layers).index(j) for j in layers]]
        if hs.shape[1] == 0:
            rows.append(None)
        else:
            rows.append(hs.mean(axis=1) if position == "answer_mean" else hs[:, -1, :])
    width = next((r.shape[-1] for r in rows if r is not None), 1)
    return np.stack([np.full((len(layers), width), np.nan) if r is None else r for r in rows])


@estimator_registry.register("hidden_state_probe")
class HiddenStateProbe(LearnedEstimator):
    """Post-generation probe on the greedy answer's hidden states.

    Parameters
    ----------
    layers : int or tuple of int
        Candidate layers; see :class:`LearnedEstimator` for ``C``, ``kind``,
        ``n_folds`` and ``seed``.
    position : {"answer_mean", "answer_last"}, default "answer_mean"
        Mean over the answer's tokens, or the state that predicted its last token.
    max_new_tokens : int, default 64

    Notes
    -----
    The state of token :math:`t` is the one at the position that predicted it, as
    captured by the decoding loop (see :mod:`confroute.models._decode`). An empty
    answer has no state: its score is NaN (counted as unscored).
    """

    def __init__(self, layers: Any = None, *, position: str = "answer_mean",
                 C: Any = DEFAULT_C, kind: str = "logistic", n_folds: int = 5, seed: int = 0,
                 max_new_tokens: int = 64) -> None:
        self.layers = layers
        self.position = position
        self.C = C
        self.kind = kind
        self.n_folds = n_folds
        self.seed = seed
        self.max_new_tokens = max_new_tokens

    def sample_request(self) -> SampleRequest:
        owner = type(self).__name__
        check_choice(self.position, "position", owner, ("answer_mean", "answer_last"))
        m = check_int(self.max_new_tokens, "max_new_tokens", owner, min_value=1)
        return SampleRequest(greedy=True, max_new_tokens=m, hidden_layers=self.active_layers())

    def features(
        self, samples: Sequence[Samples], model: LanguageModel | None, layers: Sequence[int]
    ) -> np.ndarray:
        return _answer_features(samples, layers, self.position, type(self).__name__)


@estimator_registry.register("prompt_probe")
class PromptProbe(LearnedEstimator):
    """Pre-generation probe on the hidden state at the prompt's last token.

    One prefill of the prompt (``model.prompt_hidden_states``), nothing generated:
    a :class:`~confroute.router.Router` whose estimators are all pre-generation
    decides before decoding and generates the edge answer only for the prompts it
    keeps. The states are kept in ``Samples.extra`` for reuse.

    Parameters
    ----------
    layers : int or tuple of int
        Candidate layers; see :class:`LearnedEstimator` for the others.
    """

    needs_generation: ClassVar[bool] = False

    def __init__(self, layers: Any = None, *, C: Any = DEFAULT_C, kind: str = "logistic",
                 n_folds: int = 5, seed: int = 0) -> None:
        self.layers = layers
        self.C = C
        self.kind = kind
        self.n_folds = n_folds
        self.seed = seed

    @staticmethod
    def extra_key(layer: int) -> str:
        """Key of one layer's prompt state, ndarray (hidden_size,), in ``Samples.extra``."""
        return f"prompt_hidden:{layer}"

    def sample_request(self) -> SampleRequest:
        return SampleRequest(greedy=False)

    def prepare_samples(
        self, samples: list[Samples], model: LanguageModel | None = None
    ) -> list[Samples]:
        from dataclasses import replace

        layers = self.active_layers()
        missing = [i for i, s in enumerate(samples)
                   if any(self.extra_key(j) not in s.extra for j in layers)]
        if not missing:
            return samples
        get = getattr(model, "prompt_hidden_states", None)
        if model is None or not callable(get):
            raise InvalidParameterError(
                f"The 'model' parameter of {type(self).__name__} must be a local model with "
                f"prompt_hidden_states (an HFLanguageModel) when the samples lack the prompt "
                f"states. Got {type(model).__name__}."
            )
        check_model_signature(getattr(self, "signature_", None), model, type(self).__name__)
        states = np.asarray(get([samples[i].prompt for i in missing], list(layers)))
        out = list(samples)
        for k, i in enumerate(missing):
            extra = {**dict(out[i].extra),
                     **{self.extra_key(j): states[k, n] for n, j in enumerate(layers)}}
            out[i] = replace(out[i], extra=extra)
        return out

    def features(
        self, samples: Sequence[Samples], model: LanguageModel | None, layers: Sequence[int]
    ) -> np.ndarray:
        try:
            return np.stack([np.stack([np.asarray(s.extra[self.extra_key(j)], dtype=np.float32)
                                       for j in layers]) for s in samples])
        except KeyError as exc:
            raise EstimationError(f"{type(self).__name__}: samples lack {exc}; run "
                                  "prepare_samples with the edge model first.") from None


def _balanced_cut(se: np.ndarray) -> float:
    """The median of ``se``, or, when ties make ``se > median`` one class, the cut among
    its distinct values that splits it most evenly (discrete semantic entropy often
    ties most prompts at log N). NaN-only input gives NaN."""
    finite = se[np.isfinite(se)]
    if finite.size == 0:
        return float("nan")
    median = float(np.median(finite))
    values = np.unique(finite)[:-1]  # cutting at the largest value leaves no positive
    if values.size == 0 or 0 < np.mean(finite > median) < 1:
        return median
    shares = np.array([np.mean(finite > v) for v in values])
    return float(values[int(np.argmin(np.abs(shares - 0.5)))])


@estimator_registry.register("semantic_entropy_probe")
class SemanticEntropyProbe(HiddenStateProbe):
    """Post-generation probe trained to predict high semantic entropy (no labels needed).

    At fit time the calibration prompts are sampled and their semantic entropy
    computed by ``semantic``; the target is 1 where it is above its calibration
    median (Kossen et al. 2024 binarise the same way). At serving time only the
    greedy answer's hidden states are read: the cost of a greedy answer.

    Parameters
    ----------
    semantic : SemanticEntropy or None
        The estimator whose score is imitated (None: ``SemanticEntropy(n_samples=5,
        equivalence="exact")``). Other parameters as :class:`HiddenStateProbe`.

    Attributes
    ----------
    threshold_ : float
        The calibration median of semantic entropy (or, when ties put every value
        on one side of it, the most even cut between two distinct values).
    """

    def __init__(self, layers: Any = None, *, semantic: Any = None,
                 position: str = "answer_mean", C: Any = DEFAULT_C,
                 kind: str = "logistic", n_folds: int = 5, seed: int = 0,
                 max_new_tokens: int = 64) -> None:
        super().__init__(layers, position=position, C=C, kind=kind, n_folds=n_folds, seed=seed,
                         max_new_tokens=max_new_tokens)
        self.semantic = semantic

    def _semantic(self) -> UncertaintyEstimator:
        from confroute.estimators.semantic import SemanticEntropy

        if self.semantic is None:
            return SemanticEntropy(n_samples=5, equivalence="exact", seed=0)
        if not isinstance(self.semantic, UncertaintyEstimator):
            raise param_error("semantic", type(self).__name__, "a SemanticEntropy or None",
                              self.semantic, type_error=True)
        return self.semantic

    def sample_requests(self) -> list[SampleRequest]:
        own = [self.sample_request()]
        if getattr(self, "weights_", None) is None:  # fitting: sample for the target
            own += self._semantic().sample_requests()
        return own

    def targets(
        self, samples: Sequence[Samples], labels: np.ndarray, model: LanguageModel | None
    ) -> np.ndarray:
        se, _ = self._semantic().score_samples(samples, model)
        se = np.asarray(se, dtype=np.float64)
        self.threshold_ = _balanced_cut(se)
        return np.where(np.isnan(se), np.nan, (se > self.threshold_).astype(np.float64))

    def cross_fit(
        self, prompts: Sequence[Prompt], samples: Sequence[Samples] | None = None,
        labels: Any = None, model: LanguageModel | None = None,
    ) -> tuple[np.ndarray, list[Samples]]:
        # Labels play no part: the target is the semantic entropy of each prompt.
        return super().cross_fit(prompts, samples, None, model)

    def fit(
        self, prompts: Sequence[Prompt], samples: Sequence[Samples] | None = None,
        labels: Any = None, model: LanguageModel | None = None,
    ) -> SemanticEntropyProbe:
        super().fit(prompts, samples, None, model)
        return self
