"""The UncertaintyEstimator base class, its registry, and shared-sample estimation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from confroute._params import ParamsMixin
from confroute._registry import Registry
from confroute._validation import check_float, check_int, check_prompts
from confroute.errors import EstimationError
from confroute.models.base import LanguageModel, SampleRequest, collect_samples
from confroute.types import Estimate, GenerationConfig, Prompt, Samples

__all__ = [
    "SamplingEstimatorMixin",
    "UncertaintyEstimator",
    "estimate_many",
    "estimator_registry",
    "sampling_config",
]


def sampling_config(
    owner: str,
    *,
    n_samples: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    max_new_tokens: Any,
    seed: Any,
) -> GenerationConfig:
    """Validate the sampling parameters of an N-sample estimator and build its config.

    Errors name the estimator's own parameter (``n_samples``, not ``n``).
    """
    return GenerationConfig(
        max_new_tokens=check_int(max_new_tokens, "max_new_tokens", owner, min_value=1),
        temperature=check_float(temperature, "temperature", owner, min_value=0.0,
                                min_inclusive=False),
        top_p=check_float(top_p, "top_p", owner, min_value=0.0, max_value=1.0,
                          min_inclusive=False),
        top_k=check_int(top_k, "top_k", owner, min_value=0),
        n=check_int(n_samples, "n_samples", owner, min_value=1),
        seed=check_int(seed, "seed", owner, min_value=0, allow_none=True),
    )


class UncertaintyEstimator(ParamsMixin, ABC):
    """Scores how uncertain a model is about its answer to each prompt.

    **Sign convention: higher score = more uncertain.** A calibrator later maps
    scores to P(edge answer is good), learning the (decreasing) direction.

    Subclasses declare what generations they need in :meth:`sample_request` and
    compute scores from those generations in :meth:`score_samples`; generation
    itself is shared (see :func:`estimate_many`), so several estimators run on one
    set of samples with no second generation.

    NaN is allowed only where a prompt cannot be scored (e.g. an unparseable
    verbalized confidence); it is counted in :attr:`Estimate.n_unscored`.
    """

    #: False for query-only (pre-generation) estimators that never call the edge model.
    needs_generation: ClassVar[bool] = True

    @property
    def name(self) -> str:
        """Registered name of the estimator (class name when unregistered)."""
        return str(getattr(type(self), "_registry_name", type(self).__name__))

    @abstractmethod
    def sample_request(self) -> SampleRequest:
        """The generations this estimator needs from the edge model."""

    def sample_requests(self) -> list[SampleRequest]:
        """All generations this estimator needs (several when sampling settings differ).

        Defaults to ``[self.sample_request()]``; composite estimators override it.
        """
        return [self.sample_request()]

    def check_model(self, model: LanguageModel | None) -> None:
        """Refuse a model this estimator cannot score with, before anything is generated.

        Called by :meth:`estimate` and :func:`estimate_many` ahead of the shared
        generation; the default accepts every model. A fitted probe refuses a model
        other than the one it was trained on (wasting no decoding on it).
        """

    def prepare_samples(
        self, samples: list[Samples], model: LanguageModel | None = None
    ) -> list[Samples]:
        """Add estimator-specific generations to ``samples`` (stored in ``Samples.extra``).

        Runs after the shared generation and before :meth:`score_samples`; the
        default adds nothing. Verbalized confidence uses it to ask its follow-up
        question once, so the reply is kept in the returned samples for reuse.
        """
        return samples

    @abstractmethod
    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        """Compute scores from generations that satisfy :meth:`sample_request`.

        Parameters
        ----------
        samples : sequence of Samples, length n_prompts
        model : LanguageModel or None
            The edge model, for estimators that must query it again (verbalized
            confidence asks a follow-up question).

        Returns
        -------
        scores : ndarray of shape (n_prompts,)
            Higher = more uncertain; NaN where the prompt cannot be scored.
        details : mapping of str to ndarray of shape (n_prompts,)
        """

    def estimate(
        self,
        prompts: Sequence[Prompt],
        model: LanguageModel | None = None,
        *,
        samples: Sequence[Samples] | None = None,
    ) -> Estimate:
        """Generate what is needed (reusing ``samples``) and score each prompt.

        Parameters
        ----------
        prompts : sequence of Prompt, length n_prompts
        model : LanguageModel, optional
            The edge model; required unless ``samples`` already hold everything.
        samples : sequence of Samples, optional
            Generations made earlier (e.g. by another estimator) to reuse.

        Returns
        -------
        Estimate
            ``scores`` of shape (n_prompts,) and the samples used.
        """
        plist = check_prompts(prompts, type(self).__name__)
        self.check_model(model)
        used = collect_samples(model, plist, self.sample_requests(), existing=samples)
        used = self.prepare_samples(used, model)
        scores, details = self.score_samples(used, model)
        return _make_estimate(self.name, scores, used, details, len(plist))


def _make_estimate(
    name: str,
    scores: Any,
    samples: list[Samples],
    details: Mapping[str, np.ndarray],
    n: int,
) -> Estimate:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (n,):
        raise EstimationError(
            f"Estimator {name} returned scores of shape {arr.shape}; expected ({n},)."
        )
    if np.isinf(arr).any():
        raise EstimationError(f"Estimator {name} returned an infinite score.")
    return Estimate(scores=arr, samples=samples, name=name, details=dict(details))


class SamplingEstimatorMixin:
    """For N-sample estimators storing ``n_samples``, ``temperature``, ``top_p``,
    ``top_k``, ``max_new_tokens`` and ``seed``: their validated sampling config."""

    n_samples: Any
    temperature: Any
    top_p: Any
    top_k: Any
    max_new_tokens: Any
    seed: Any

    def _sampling_config(self) -> GenerationConfig:
        return sampling_config(
            type(self).__name__, n_samples=self.n_samples, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )


def estimate_many(
    estimators: Sequence[UncertaintyEstimator],
    prompts: Sequence[Prompt],
    model: LanguageModel | None = None,
    *,
    samples: Sequence[Samples] | None = None,
) -> dict[str, Estimate]:
    """Run several estimators on one shared generation.

    The union of their :meth:`~UncertaintyEstimator.sample_request` is generated
    once (one greedy call, one batched sampling call per distinct sampling
    setting) and every estimator scores from it.

    Returns
    -------
    dict
        Estimator name -> :class:`~confroute.types.Estimate`; all share the same
        ``samples`` list.
    """
    plist = check_prompts(prompts, "estimate_many")
    if len(estimators) == 0:
        raise EstimationError("estimate_many needs at least one estimator.")
    for est in estimators:
        est.check_model(model)
    used = collect_samples(
        model, plist, [r for e in estimators if e.needs_generation for r in e.sample_requests()],
        existing=samples,
    )
    for est in estimators:
        used = est.prepare_samples(used, model)
    out: dict[str, Estimate] = {}
    for est in estimators:
        scores, details = est.score_samples(used, model)
        key = est.name
        i = 2
        while key in out:
            key = f"{est.name}_{i}"
            i += 1
        out[key] = _make_estimate(key, scores, used, details, len(plist))
    return out


estimator_registry: Registry[UncertaintyEstimator] = Registry(
    "estimator", UncertaintyEstimator  # type: ignore[type-abstract]
)
