"""Query-only (pre-generation) routers: P(strong model wins | query embedding).

Trained on preference labels (:mod:`confroute.predictive.labels`) over query
embeddings (:mod:`confroute.predictive.embed`), as in Zhang et al. (2025), who
reuse the router families of RouteLLM (Ong et al., 2024): similarity-weighted
(SW) ranking, matrix factorisation (MF), a two-layer MLP, and k-nearest
neighbours.

Every router predicts the probability that the **strong** (cloud) model wins the
query (:meth:`QueryRouter.p_strong`, shape (n,)); higher means more reason to
escalate. Routers are scikit-learn binary classifiers with ``classes_ = [0, 1]``
(1 = strong model wins): ``predict_proba`` has shape (n, 2) and ``predict``
returns 0/1, so ``clone``, ``GridSearchCV`` and ``cross_val_predict`` work.
:class:`QueryRouterEstimator` exposes a fitted router as an
:class:`~confroute.estimators.UncertaintyEstimator` that needs no generation, so
the usual calibrators and policies apply.

torch is imported only inside the ``fit`` of the MF and MLP routers; prediction
uses numpy on the stored arrays.

References
----------
.. [1] T. Zhang, A. Mehradfar, D. Dimitriadis, S. Avestimehr, "Leveraging
   Uncertainty Estimation for Efficient LLM Routing", arXiv:2502.11021, 2025.
.. [2] I. Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data",
   arXiv:2406.18665, 2024.
.. [3] R. A. Bradley, M. E. Terry, "Rank analysis of incomplete block designs:
   I. The method of paired comparisons", Biometrika 39, 1952.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
from sklearn.base import ClassifierMixin

from confroute._params import ParamsMixin
from confroute._registry import Registry
from confroute._serialization import read_file, write_file
from confroute._stats import budget_allowance, clopper_pearson
from confroute._validation import check_array, check_float, check_int, param_error
from confroute.errors import (
    InvalidParameterError,
    InvalidTypeError,
    NotFittedError,
    SerializationError,
    describe,
)
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest
from confroute.predictive.embed import QueryEmbedder
from confroute.predictive.labels import label_credits
from confroute.types import Samples, prompt_text

__all__ = [
    "KNNRouter",
    "MLPRouter",
    "MatrixFactorizationRouter",
    "QueryRouter",
    "QueryRouterEstimator",
    "SWRankingRouter",
    "router_registry",
    "threshold_for_cloud_share",
]

R = TypeVar("R", bound="QueryRouter")
_SAVE_KIND = "query_router"


class QueryRouter(ClassifierMixin, ParamsMixin, ABC):
    """Base class: predicts P(strong model wins | query) from a query embedding.

    Subclasses implement ``_fit``, ``_predict``, ``_get_state`` and
    ``_set_state``; validation, the fitted check, persistence and the registry
    live here.

    A router is a scikit-learn binary classifier of "the strong model wins"
    (class 1) against "it does not" (class 0): confroute code calls
    :meth:`p_strong` (shape (n,)), scikit-learn calls :meth:`predict_proba`
    (shape (n, 2)) and :meth:`predict`. Ties are soft targets (credit 0.5), so
    P(strong wins) is the expected strong-win credit. With scikit-learn's
    model-selection tools pass hard numeric labels (1 = strong wins, 0 =
    otherwise): stratified splitting rejects 0.5 credits, and
    ``cross_val_predict`` re-encodes string labels alphabetically (``"strong"``
    would become 0).

    Attributes
    ----------
    classes_ : ndarray of shape (2,)
        Always ``array([0, 1])`` (1 = the strong model wins), set by fit.
    n_features_in_ : int
        Embedding dimension seen in :meth:`fit`.
    """

    #: For scikit-learn < 1.6, whose ``is_classifier`` reads this instead of the tags.
    _estimator_type: ClassVar[str] = "classifier"

    def fit(self: R, embeddings: Any, labels: Any) -> R:
        """Fit on query embeddings and preference labels.

        Parameters
        ----------
        embeddings : array-like of shape (n_queries, d)
        labels : array-like of shape (n_queries,)
            ``"strong"`` / ``"weak"`` / ``"tie"``, or the strong-win credit as
            numbers in [0, 1] (1 / 0 / 0.5).

        Returns
        -------
        self
        """
        owner = f"{type(self).__name__}.fit"
        X = check_array(embeddings, "embeddings", owner, ndim=2)
        y = label_credits(labels, owner, "labels")
        if len(y) != X.shape[0]:
            raise InvalidParameterError(
                f"The inputs of {owner} must have the same length: 'embeddings' has "
                f"{X.shape[0]} rows, 'labels' has {len(y)}."
            )
        self._check_params(n_train=X.shape[0])
        self._fit(X, y)
        self.n_features_in_ = int(X.shape[1])
        self.classes_ = np.array([0, 1])
        return self

    def p_strong(self, embeddings: Any) -> np.ndarray:
        """P(strong model wins) for each query.

        Parameters
        ----------
        embeddings : array-like of shape (n_queries, d)

        Returns
        -------
        ndarray of float64 of shape (n_queries,)
            Values in [0, 1]; higher = more reason to escalate.
        """
        self._check_fitted()
        owner = f"{type(self).__name__}.p_strong"
        X = check_array(embeddings, "embeddings", owner, ndim=2)
        if X.shape[1] != self.n_features_in_:
            raise InvalidParameterError(
                f"The 'embeddings' parameter of {owner} must have {self.n_features_in_} "
                f"columns (the embedding dimension seen in fit). Got {X.shape[1]}."
            )
        p = np.asarray(self._predict(X), dtype=np.float64)
        return np.clip(p, 0.0, 1.0)

    def predict_proba(self, embeddings: Any) -> np.ndarray:
        """Class probabilities in scikit-learn's layout, columns ordered as ``classes_``.

        Parameters
        ----------
        embeddings : array-like of shape (n_queries, d)

        Returns
        -------
        ndarray of float64 of shape (n_queries, 2)
            ``[1 - P(strong wins), P(strong wins)]`` per row.
        """
        p = self.p_strong(embeddings)
        return np.column_stack([1.0 - p, p])

    def predict(self, embeddings: Any) -> np.ndarray:
        """1 where the strong model is predicted to win (P > 0.5), else 0.

        Parameters
        ----------
        embeddings : array-like of shape (n_queries, d)

        Returns
        -------
        ndarray of int of shape (n_queries,)
            The argmax of :meth:`predict_proba` (an exact 0.5 predicts 0).
        """
        return (self.p_strong(embeddings) > 0.5).astype(np.int64)

    # -- subclass hooks ---------------------------------------------------

    def _check_params(self, n_train: int) -> None:
        """Check constructor parameters (called at the start of fit)."""

    @abstractmethod
    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        """Learn from validated embeddings (n, d) and credits (n,)."""

    @abstractmethod
    def _predict(self, X: np.ndarray) -> np.ndarray:
        """P(strong wins) for validated embeddings (n, d) -> (n,)."""

    @abstractmethod
    def _get_state(self) -> dict[str, Any]:
        """Learned arrays and scalars."""

    @abstractmethod
    def _set_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_get_state` returned (shapes already checked by caller)."""

    # -- fitted state and persistence ------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet; call "
                f"fit(embeddings, labels) first (or load a saved router)."
            )

    def get_state(self) -> dict[str, Any]:
        """Learned state as plain values and ndarrays (what :meth:`save` stores)."""
        self._check_fitted()
        return {"n_features_in": self.n_features_in_, **self._get_state()}

    def set_state(self: R, state: Mapping[str, Any]) -> R:
        """Restore a state from :meth:`get_state`; raises SerializationError if malformed."""
        if not isinstance(state, Mapping):
            raise SerializationError(f"A router state must be a mapping. Got {describe(state)}.")
        d = state.get("n_features_in")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise SerializationError(
                f"Saved router state has an invalid 'n_features_in': {describe(d)}."
            )
        try:
            self._set_state(state)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, SerializationError):
                raise
            raise SerializationError(
                f"Saved {type(self).__name__} state is malformed: {exc!r}."
            ) from None
        self.n_features_in_ = d
        self.classes_ = np.array([0, 1])
        return self

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save parameters and learned arrays as a checksummed JSON file (no pickle)."""
        name = router_registry.name_of(self)
        write_file(path, _SAVE_KIND, {
            "name": name,
            "params": self.get_params(deep=False),
            "state": self.get_state(),
        })

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> QueryRouter:
        """Load a router saved by :meth:`save`.

        Only classes registered in :data:`router_registry` can be rebuilt, and
        ``SubClass.load`` refuses a file holding another router class.
        """
        payload = read_file(path, _SAVE_KIND)
        name = payload.get("name")
        if not isinstance(name, str):
            raise SerializationError(f"The file {str(path)!r} does not name a router class.")
        try:
            klass = router_registry.get_class(name)
        except InvalidParameterError as exc:
            raise SerializationError(f"The file {str(path)!r} holds an {exc}") from None
        if not issubclass(klass, cls):
            raise SerializationError(
                f"The file {str(path)!r} holds a {klass.__name__}, not a {cls.__name__}."
            )
        params = payload.get("params")
        if not isinstance(params, dict):
            raise SerializationError(f"The file {str(path)!r} has no router parameters.")
        try:
            obj = klass(**params)
        except TypeError as exc:
            raise SerializationError(
                f"The file {str(path)!r} has parameters {klass.__name__} does not accept: {exc}."
            ) from None
        obj._check_params(n_train=2**62)
        return obj.set_state(payload.get("state", {}))


router_registry: Registry[QueryRouter] = Registry(
    "query_router", QueryRouter  # type: ignore[type-abstract]
)


def _state_array(
    state: Mapping[str, Any], key: str, ndim: int, shape: tuple[int | None, ...] | None = None
) -> np.ndarray:
    arr = state[key]
    if not isinstance(arr, np.ndarray) or arr.ndim != ndim or arr.dtype.kind != "f":
        raise SerializationError(
            f"Saved router state entry {key!r} must be a {ndim}-D float array. Got {describe(arr)}."
        )
    if shape is not None:
        for got, want in zip(arr.shape, shape):
            if want is not None and got != want:
                raise SerializationError(
                    f"Saved router state entry {key!r} has shape {arr.shape}; expected {shape}."
                )
    if not np.isfinite(arr).all():
        raise SerializationError(f"Saved router state entry {key!r} has non-finite values.")
    return arr


def _unit_rows(X: np.ndarray, name: str, owner: str) -> np.ndarray:
    """L2-normalise rows for cosine similarity; an all-zero row has no direction."""
    norms = np.linalg.norm(X, axis=1)
    if (norms == 0).any():
        i = int(np.flatnonzero(norms == 0)[0])
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must not contain all-zero rows (cosine "
            f"similarity is undefined). Got one at row {i}."
        )
    return np.asarray(X / norms[:, None], dtype=np.float64)


_BLOCK_ELEMENTS = 1 << 22  # similarity-block size bound (~32 MB of float64 per temporary)


def _chunk_rows(n_train: int) -> int:
    """Query rows per similarity block, so a block holds at most ``_BLOCK_ELEMENTS`` floats."""
    return max(1, _BLOCK_ELEMENTS // max(n_train, 1))


# --------------------------------------------------------------------------- SW ranking


class _MemoryRouter(QueryRouter):
    """Shared part of the routers that keep the (normalised) training set."""

    embeddings_: np.ndarray
    credits_: np.ndarray

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.embeddings_ = _unit_rows(X, "embeddings", f"{type(self).__name__}.fit").astype(
            np.float32
        )
        self.credits_ = y.astype(np.float64)

    def _get_state(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings_, "credits": self.credits_}

    def _set_state(self, state: Mapping[str, Any]) -> None:
        d = int(state["n_features_in"])
        emb = _state_array(state, "embeddings", 2, (None, d))
        cred = _state_array(state, "credits", 1, (emb.shape[0],))
        if ((cred < 0) | (cred > 1)).any():
            raise SerializationError(f"Saved {type(self).__name__} credits must lie in [0, 1].")
        self.embeddings_ = emb.astype(np.float32)
        self.credits_ = cred.astype(np.float64)



@router_registry.register("sw")
class SWRankingRouter(_MemoryRouter):
    r"""Similarity-weighted Bradley–Terry ranking, fitted per query at inference.

    For a query :math:`q` with training queries :math:`q_i` and strong-win
    credits :math:`c_i \in [0, 1]` (a tie counts half a win for each side), each
    comparison gets the weight

    .. math::

        w_i = \gamma^{\,1 + S(q, q_i)}, \qquad
        S(q, q_i) = \frac{\cos(q, q_i)}{\max_j \cos(q, q_j)},

    the cosine similarity normalised by the largest similarity to :math:`q` over
    the training set, as in RouteLLM's implementation [2]_ (when that maximum is
    not positive the raw cosine is used, to keep the ordering of weights).

    With two models the Bradley–Terry model [3]_ is
    :math:`P(\text{strong wins}) = \sigma(\theta)` with
    :math:`\theta = \beta_{strong} - \beta_{weak}`. The weighted log-likelihood

    .. math::

        \ell(\theta) = \sum_i w_i \left[ c_i \log \sigma(\theta)
                       + (1 - c_i) \log \sigma(-\theta) \right]

    has :math:`\ell'(\theta) = \sum_i w_i (c_i - \sigma(\theta))`, so the
    maximum-likelihood fit is a weighted win rate (a weighted log-odds for
    :math:`\theta`). A pseudo-count :math:`\alpha` (one virtual tie of weight
    :math:`2\alpha`) keeps :math:`\theta` finite when every nearby comparison
    goes one way:

    .. math::

        \hat P(\text{strong wins} \mid q) = \sigma(\hat\theta) =
        \frac{\sum_i w_i c_i + \alpha}{\sum_i w_i + 2\alpha}.

    A batch of queries costs one matrix product with the training embeddings.

    Parameters
    ----------
    gamma : float, default 10.0
        Base of the similarity weighting (> 1; larger = more local).
    pseudo_count : float, default 1.0
        :math:`\alpha` above, in weight units (the nearest neighbour weighs
        :math:`\gamma^2`), >= 0.

    Attributes
    ----------
    embeddings_ : ndarray of shape (n_train, d)
        L2-normalised training embeddings.
    credits_ : ndarray of shape (n_train,)
        Strong-win credits.
    """

    def __init__(self, gamma: float = 10.0, pseudo_count: float = 1.0) -> None:
        self.gamma = gamma
        self.pseudo_count = pseudo_count

    def _check_params(self, n_train: int) -> None:
        owner = type(self).__name__
        check_float(self.gamma, "gamma", owner, min_value=1.0, min_inclusive=False)
        check_float(self.pseudo_count, "pseudo_count", owner, min_value=0.0)

    def _predict(self, X: np.ndarray) -> np.ndarray:
        Q = _unit_rows(X, "embeddings", f"{type(self).__name__}.p_strong")
        train = self.embeddings_.astype(np.float64)
        log_g = float(np.log(float(self.gamma)))
        alpha = float(self.pseudo_count)
        out = np.empty(Q.shape[0], dtype=np.float64)
        chunk = _chunk_rows(train.shape[0])
        for start in range(0, Q.shape[0], chunk):
            S = Q[start:start + chunk] @ train.T  # (m, n)
            m = S.max(axis=1, keepdims=True)
            S_norm = np.where(m > 0, S / np.where(m > 0, m, 1.0), S)
            # Subtract the per-row max exponent (= 2 log gamma when m > 0) for stability;
            # rescale alpha by the same factor so the estimator is unchanged.
            expo = (1.0 + S_norm) * log_g
            top = expo.max(axis=1, keepdims=True)
            W = np.exp(expo - top)
            a = alpha * np.exp(-top[:, 0])
            out[start:start + chunk] = (W @ self.credits_ + a) / (W.sum(axis=1) + 2 * a)
        return out


# --------------------------------------------------------------------------- kNN


@router_registry.register("knn")
class KNNRouter(_MemoryRouter):
    r"""Mean strong-win credit of the k most cosine-similar training queries.

    .. math::

        \hat P(\text{strong wins} \mid q) = \frac{1}{k} \sum_{i \in N_k(q)} c_i,

    with :math:`N_k(q)` the k training queries of highest cosine similarity to
    :math:`q` (ties in similarity broken by training order). Zhang et al. [1]_
    use :math:`k = 1`.

    Parameters
    ----------
    k : int, default 1
        Number of neighbours, 1 <= k <= n_train.
    """

    def __init__(self, k: int = 1) -> None:
        self.k = k

    def _check_params(self, n_train: int) -> None:
        check_int(self.k, "k", type(self).__name__, min_value=1)
        if self.k > n_train:
            raise param_error(
                "k", type(self).__name__,
                f"an int <= the number of training queries ({n_train})", self.k,
            )

    def _predict(self, X: np.ndarray) -> np.ndarray:
        Q = _unit_rows(X, "embeddings", f"{type(self).__name__}.p_strong")
        train = self.embeddings_.astype(np.float64)
        k = int(self.k)
        out = np.empty(Q.shape[0], dtype=np.float64)
        chunk = _chunk_rows(train.shape[0])
        for start in range(0, Q.shape[0], chunk):
            S = Q[start:start + chunk] @ train.T
            if k == 1:
                idx = S.argmax(axis=1)[:, None]
            else:
                # stable sort on -S: deterministic tie-breaking by training order
                idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
            out[start:start + chunk] = self.credits_[idx].mean(axis=1)
        return out

    def _set_state(self, state: Mapping[str, Any]) -> None:
        super()._set_state(state)
        if self.k > self.embeddings_.shape[0]:
            raise SerializationError(
                f"Saved KNNRouter has k={self.k} but only {self.embeddings_.shape[0]} "
                "training queries."
            )


# --------------------------------------------------------------------------- torch training


def _check_train_params(obj: Any, owner: str) -> None:
    check_int(obj.epochs, "epochs", owner, min_value=1)
    check_float(obj.lr, "lr", owner, min_value=0.0, min_inclusive=False)
    check_float(obj.weight_decay, "weight_decay", owner, min_value=0.0)
    check_int(obj.seed, "seed", owner, min_value=0)
    check_int(obj.batch_size, "batch_size", owner, min_value=1, allow_none=True)


def _train(
    params: list[Any],
    logits_fn: Any,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int | None,
    generator: Any,
) -> None:
    """Adam on binary cross-entropy with soft targets (ties = 0.5)."""
    import torch

    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n = Xt.shape[0]
    bs = n if batch_size is None else min(batch_size, n)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator) if bs < n else torch.arange(n)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            opt.zero_grad()
            loss = loss_fn(logits_fn(Xt[idx]), yt[idx])
            loss.backward()
            opt.step()


def _uniform(shape: tuple[int, ...], bound: float, generator: Any) -> Any:
    import torch

    t = (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound
    return t.requires_grad_(True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic
    return out


# --------------------------------------------------------------------------- MF


@router_registry.register("mf")
class MatrixFactorizationRouter(QueryRouter):
    r"""Bilinear matrix-factorisation router in the style of RouteLLM's MF [2]_.

    Each model :math:`M \in \{strong, weak\}` has a learned embedding
    :math:`v_M \in \mathbb{R}^{k}` (used L2-normalised, as in RouteLLM); a
    learned projection :math:`W \in \mathbb{R}^{k \times d}` maps the query
    embedding into the same space, and a learned vector :math:`w` reads out the
    score

    .. math::

        s(M, q) = w^\top \left( \hat v_M \odot W q \right) + b_M, \qquad
        P(\text{strong wins} \mid q) = \sigma\big(s(strong, q) - s(weak, q)\big).

    Trained with Adam on binary cross-entropy, ties as 0.5 targets. RouteLLM's
    MF has no per-model bias :math:`b_M`; with only two models the score
    difference is then linear in :math:`q` through the origin and cannot express
    a base rate, so a bias is learned unless ``model_bias=False``.

    Prediction is numpy on the stored arrays (torch is only needed to fit).

    Parameters
    ----------
    dim : int, default 64
        Latent dimension k.
    epochs : int, default 100
        Passes over the training set.
    lr : float, default 1e-2
        Adam learning rate.
    weight_decay : float, default 1e-4
        Adam (L2) weight decay.
    seed : int, default 0
        Seed of the initialisation and of mini-batch shuffling.
    batch_size : int or None, default None
        Mini-batch size; None trains full-batch.
    model_bias : bool, default True
        Learn the per-model bias :math:`b_M`.

    Attributes
    ----------
    model_embeddings_ : ndarray of shape (2, dim)
        Rows :math:`v_{strong}`, :math:`v_{weak}` (not normalised).
    projection_ : ndarray of shape (dim, d)
        :math:`W`.
    classifier_ : ndarray of shape (dim,)
        :math:`w`.
    model_bias_ : ndarray of shape (2,)
        :math:`(b_{strong}, b_{weak})` (zeros when ``model_bias=False``).
    """

    def __init__(
        self,
        dim: int = 64,
        epochs: int = 100,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        seed: int = 0,
        batch_size: int | None = None,
        model_bias: bool = True,
    ) -> None:
        self.dim = dim
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.batch_size = batch_size
        self.model_bias = model_bias

    def _check_params(self, n_train: int) -> None:
        owner = type(self).__name__
        check_int(self.dim, "dim", owner, min_value=1)
        _check_train_params(self, owner)
        from confroute._validation import check_bool

        check_bool(self.model_bias, "model_bias", owner)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        import torch

        g = torch.Generator().manual_seed(int(self.seed))
        d, k = X.shape[1], int(self.dim)
        P = _uniform((2, k), 1.0, g)
        W = _uniform((k, d), 1.0 / np.sqrt(d), g)
        w = _uniform((k,), 1.0 / np.sqrt(k), g)
        b = torch.zeros(2, requires_grad=bool(self.model_bias))
        params = [P, W, w] + ([b] if self.model_bias else [])

        def logits(xb: torch.Tensor) -> torch.Tensor:
            v = torch.nn.functional.normalize(P, p=2.0, dim=1)
            proj = xb @ W.T  # (n, k)
            s = (proj[:, None, :] * v[None, :, :]) @ w + b  # (n, 2)
            return s[:, 0] - s[:, 1]

        _train(params, logits, X, y, epochs=int(self.epochs), lr=float(self.lr),
               weight_decay=float(self.weight_decay), batch_size=self.batch_size, generator=g)
        self.model_embeddings_ = P.detach().numpy().astype(np.float32)
        self.projection_ = W.detach().numpy().astype(np.float32)
        self.classifier_ = w.detach().numpy().astype(np.float32)
        self.model_bias_ = b.detach().numpy().astype(np.float32)

    def _predict(self, X: np.ndarray) -> np.ndarray:
        P = self.model_embeddings_.astype(np.float64)
        v = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
        proj = X @ self.projection_.astype(np.float64).T  # (n, k)
        s = (proj * v[0]) @ self.classifier_ - (proj * v[1]) @ self.classifier_
        s = s + float(self.model_bias_[0]) - float(self.model_bias_[1])
        return _sigmoid(s)

    def _get_state(self) -> dict[str, Any]:
        return {"model_embeddings": self.model_embeddings_, "projection": self.projection_,
                "classifier": self.classifier_, "model_bias": self.model_bias_}

    def _set_state(self, state: Mapping[str, Any]) -> None:
        d, k = int(state["n_features_in"]), int(self.dim)
        self.model_embeddings_ = _state_array(state, "model_embeddings", 2, (2, k))
        self.projection_ = _state_array(state, "projection", 2, (k, d))
        self.classifier_ = _state_array(state, "classifier", 1, (k,))
        self.model_bias_ = _state_array(state, "model_bias", 1, (2,))


# --------------------------------------------------------------------------- MLP


@router_registry.register("mlp")
class MLPRouter(QueryRouter):
    r"""Two-layer perceptron on the query embedding.

    .. math::

        P(\text{strong wins} \mid q) =
        \sigma\big(w_2^\top \operatorname{ReLU}(W_1 q + b_1) + b_2\big),

    trained with Adam on binary cross-entropy, ties as 0.5 targets. Prediction
    is numpy on the stored arrays.

    Parameters
    ----------
    hidden : int, default 128
        Width of the hidden layer.
    epochs : int, default 200
    lr : float, default 1e-3
    weight_decay : float, default 1e-4
    seed : int, default 0
    batch_size : int or None, default None
        Mini-batch size; None trains full-batch.

    Attributes
    ----------
    W1_ : ndarray of shape (hidden, d)
    b1_ : ndarray of shape (hidden,)
    w2_ : ndarray of shape (hidden,)
    b2_ : ndarray of shape (1,)
    """

    def __init__(
        self,
        hidden: int = 128,
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.batch_size = batch_size

    def _check_params(self, n_train: int) -> None:
        owner = type(self).__name__
        check_int(self.hidden, "hidden", owner, min_value=1)
        _check_train_params(self, owner)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        import torch

        g = torch.Generator().manual_seed(int(self.seed))
        d, h = X.shape[1], int(self.hidden)
        W1 = _uniform((h, d), 1.0 / np.sqrt(d), g)
        b1 = _uniform((h,), 1.0 / np.sqrt(d), g)
        w2 = _uniform((h,), 1.0 / np.sqrt(h), g)
        b2 = _uniform((1,), 1.0 / np.sqrt(h), g)

        def logits(xb: torch.Tensor) -> torch.Tensor:
            return torch.relu(xb @ W1.T + b1) @ w2 + b2

        _train([W1, b1, w2, b2], logits, X, y, epochs=int(self.epochs), lr=float(self.lr),
               weight_decay=float(self.weight_decay), batch_size=self.batch_size, generator=g)
        self.W1_ = W1.detach().numpy().astype(np.float32)
        self.b1_ = b1.detach().numpy().astype(np.float32)
        self.w2_ = w2.detach().numpy().astype(np.float32)
        self.b2_ = b2.detach().numpy().astype(np.float32)

    def _predict(self, X: np.ndarray) -> np.ndarray:
        hid = np.maximum(X @ self.W1_.astype(np.float64).T + self.b1_, 0.0)
        return _sigmoid(hid @ self.w2_.astype(np.float64) + float(self.b2_[0]))

    def _get_state(self) -> dict[str, Any]:
        return {"W1": self.W1_, "b1": self.b1_, "w2": self.w2_, "b2": self.b2_}

    def _set_state(self, state: Mapping[str, Any]) -> None:
        d, h = int(state["n_features_in"]), int(self.hidden)
        self.W1_ = _state_array(state, "W1", 2, (h, d))
        self.b1_ = _state_array(state, "b1", 1, (h,))
        self.w2_ = _state_array(state, "w2", 1, (h,))
        self.b2_ = _state_array(state, "b2", 1, (1,))


# --------------------------------------------------------------------------- estimator


@estimator_registry.register("query_router")
class QueryRouterEstimator(UncertaintyEstimator):
    """A fitted query router used as a pre-generation uncertainty estimator.

    The score of a prompt is P(strong model wins | query) from ``router`` on the
    embedding of ``prompt_text(prompt)``: higher = more reason to escalate,
    consistent with the estimator convention "higher = more uncertain". No
    generation is needed, so :meth:`estimate` works with ``model=None`` and the
    router can gate a query before the edge model runs.

    Parameters
    ----------
    router : QueryRouter, path-like or None, default None
        A fitted router, or the path of one saved with :meth:`QueryRouter.save`
        (loaded on first use). None is accepted at construction only so the
        class can be built by name; scoring then raises NotFittedError.
    embedder : QueryEmbedder, TextEncoder or None, default None
        How to embed prompts; it must be the embedder the router was trained
        with. None uses :class:`QueryEmbedder` with the default embedder.
    """

    needs_generation: ClassVar[bool] = False

    def __init__(self, router: Any = None, embedder: Any = None) -> None:
        self.router = router
        self.embedder = embedder

    def sample_request(self) -> SampleRequest:
        return SampleRequest(greedy=False)

    def resolve_router(self) -> QueryRouter:
        """The fitted query router (loaded from its path on first use); NotFittedError if none."""
        owner = type(self).__name__
        r = self.router
        if r is None:
            raise NotFittedError(
                f"{owner} has no router; pass a fitted QueryRouter (or the path of a saved "
                "one) as 'router'."
            )
        if isinstance(r, QueryRouter):
            return r
        if isinstance(r, (str, os.PathLike)):
            cached = getattr(self, "_loaded", None)
            if cached is not None and cached[0] == os.fspath(r):
                return cached[1]
            loaded = QueryRouter.load(r)
            self._loaded = (os.fspath(r), loaded)
            return loaded
        raise InvalidTypeError(
            f"The 'router' parameter of {owner} must be a QueryRouter or the path of a saved "
            f"one. Got {describe(r)}."
        )

    def _resolve_embedder(self) -> QueryEmbedder:
        e = self.embedder
        if isinstance(e, QueryEmbedder):
            return e
        cached = getattr(self, "_wrapped", None)
        if cached is not None and cached[0] is e:
            return cached[1]
        wrapped = QueryEmbedder(e)
        self._wrapped = (e, wrapped)
        return wrapped

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        """P(strong wins | query) for each prompt; ``model`` is not used.

        Returns
        -------
        scores : ndarray of shape (n_prompts,)
        details : dict
            Empty.
        """
        router = self.resolve_router()
        router._check_fitted()
        if len(samples) == 0:
            return np.zeros(0), {}
        emb = self._resolve_embedder().encode([prompt_text(s.prompt) for s in samples])
        return router.p_strong(emb), {}


# --------------------------------------------------------------------------- thresholds


def threshold_for_cloud_share(
    scores: Any, target_share: float, confidence: float = 0.95
) -> tuple[float, tuple[float, float]]:
    r"""Threshold on router scores so at most ``target_share`` of queries go to the cloud.

    A query is escalated when ``score > threshold``. On the calibration scores
    (the user's own prompts) the returned threshold is the smallest value
    :math:`t` among the observed scores (or :math:`-\infty`) whose realised
    share :math:`\hat p = \#\{s_i > t\} / n` is at most ``target_share``. Tied
    scores are never split, so :math:`\hat p` may fall below the target when a
    block of equal scores straddles it.

    The interval is the two-sided Clopper–Pearson interval [4]_ at level
    ``confidence`` for the binomial proportion with :math:`k = n \hat p`
    successes in :math:`n` trials:

    .. math::

        \text{lo} = B^{-1}\!\left(\tfrac{1-c}{2};\, k,\, n - k + 1\right), \qquad
        \text{hi} = B^{-1}\!\left(\tfrac{1+c}{2};\, k + 1,\, n - k\right),

    with :math:`B^{-1}` the Beta quantile (lo = 0 when k = 0, hi = 1 when k = n).

    **What it guarantees.** For new queries drawn independently from the same
    distribution as the calibration prompts, and a threshold treated as fixed,
    the long-run cloud share lies in (lo, hi) with probability about
    ``confidence``. **What it does not.** Because :math:`t` is chosen on the
    same data the interval is slightly optimistic; it says nothing under
    distribution shift (new topics, new users); and it bounds the long-run
    share, not the share within any window. For a hard cap on spend use an
    online budget policy; ``hi`` tells how much head-room to leave.

    Parameters
    ----------
    scores : array-like of shape (n,)
        Router scores (e.g. P(strong wins)) on representative prompts; finite.
    target_share : float
        Maximum share of queries sent to the cloud, in [0, 1].
    confidence : float, default 0.95
        Confidence level of the interval, in (0, 1).

    Returns
    -------
    threshold : float
        Escalate when ``score > threshold`` (``-inf`` escalates everything).
    (lo, hi) : tuple of float
        Clopper–Pearson interval on the cloud share of new, similar traffic.

    References
    ----------
    .. [4] C. J. Clopper, E. S. Pearson, "The use of confidence or fiducial limits
       illustrated in the case of the binomial", Biometrika 26, 1934.
    """
    owner = "threshold_for_cloud_share"
    s = check_array(scores, "scores", owner, ndim=1)
    target = check_float(target_share, "target_share", owner, min_value=0.0, max_value=1.0)
    conf = check_float(confidence, "confidence", owner, min_value=0.0, max_value=1.0,
                       min_inclusive=False, max_inclusive=False)
    assert target is not None and conf is not None
    n = s.shape[0]
    uniq = np.unique(s)  # ascending
    # number of scores strictly above each unique value
    above = n - np.searchsorted(np.sort(s), uniq, side="right")
    # floor(target * n) in exact rational arithmetic (0.3 * 10 is 3, not 2.9999...)
    allowed = budget_allowance(target, n)
    if n <= allowed:
        threshold = -np.inf
        k = n
    else:
        j = int(np.flatnonzero(above <= allowed)[0])  # exists: above[-1] == 0
        threshold = float(uniq[j])
        k = int(above[j])
    return float(threshold), clopper_pearson(k, n, conf)
