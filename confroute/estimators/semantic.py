"""Semantic entropy: uncertainty over meanings rather than token strings.

References
----------
.. [1] Kuhn, Gal and Farquhar, "Semantic Uncertainty: Linguistic Invariances for
   Uncertainty Estimation in Natural Language Generation", ICLR 2023.
.. [2] Farquhar, Kossen, Kuhn and Gal, "Detecting hallucinations in large language
   models using semantic entropy", Nature 630, 2024 (discrete semantic entropy).
.. [3] Zhang et al., "Leveraging Uncertainty Estimation for Efficient LLM Routing",
   arXiv:2502.11021, 2025 (Eq. 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from confroute._validation import check_bool, check_choice
from confroute.errors import EstimationError
from confroute.estimators.base import (
    SamplingEstimatorMixin,
    UncertaintyEstimator,
    estimator_registry,
)
from confroute.estimators.equivalence import Equivalence, resolve_equivalence
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import Sample, Samples, prompt_text

__all__ = ["SemanticEntropy", "semantic_entropy_from_clusters"]

_VARIANTS = ("discrete", "weighted", "paper")


def semantic_entropy_from_clusters(
    labels: Sequence[int], log_likelihoods: Sequence[float] | None = None,
    variant: str = "discrete",
) -> float:
    """Semantic entropy of one prompt from the cluster ids of its samples.

    Parameters
    ----------
    labels : sequence of int, length n_samples
        Cluster id of each sample.
    log_likelihoods : sequence of float, length n_samples, optional
        Length-normalised log-likelihood of each sample (needed unless discrete).
    variant : {"discrete", "weighted", "paper"}

    Returns
    -------
    float
        The entropy in nats (see :class:`SemanticEntropy` for the formulas).
    """
    lab = np.asarray(labels, dtype=np.int64)
    if lab.size == 0:
        return math.nan
    ids, inverse = np.unique(lab, return_inverse=True)
    if len(ids) == 1:
        return 0.0  # exactly, without the rounding of p = sum(w) / sum(w)
    if variant == "discrete":
        p = np.bincount(inverse).astype(np.float64) / lab.size
    else:
        if log_likelihoods is None:
            raise EstimationError(f"The {variant!r} semantic entropy needs log-likelihoods.")
        ll = np.asarray(log_likelihoods, dtype=np.float64)
        # exp(ll - max) avoids underflow; the shift cancels in the normalisation.
        w = np.exp(ll - np.max(ll))
        p = np.bincount(inverse, weights=w, minlength=len(ids)) / np.sum(w)
    if variant == "paper":
        with np.errstate(divide="ignore"):
            logs = np.log(p)
        # A cluster whose weight underflowed to 0 has log p = -inf; clip to the
        # smallest representable probability so the score stays finite.
        logs = np.maximum(logs, math.log(np.finfo(np.float64).tiny))
        return max(0.0, -float(np.mean(logs)))
    nz = p[p > 0]
    return float(max(0.0, -np.sum(nz * np.log(nz))))


@estimator_registry.register("semantic_entropy")
class SemanticEntropy(SamplingEstimatorMixin, UncertaintyEstimator):
    """Entropy of the model's answers over meaning clusters.

    ``n_samples`` answers are sampled, clustered by an :class:`Equivalence`
    (bidirectional entailment, embeddings or exact match), and the entropy of the
    cluster distribution is the score. With clusters :math:`C_1, \\dots, C_K`
    of sizes :math:`|C_k|` among :math:`N` samples:

    - ``variant="discrete"`` [2]_, the frequency distribution:

      .. math:: \\mathrm{SE} = -\\sum_{k=1}^K \\hat p_k \\log \\hat p_k,
                \\qquad \\hat p_k = |C_k| / N.

    - ``variant="weighted"`` [1]_, cluster probabilities from the samples'
      length-normalised likelihoods :math:`\\bar\\ell(s) = \\frac{1}{T_s}\\sum_t
      \\log p(s_t \\mid s_{<t}, x)` (mean token log-probability):

      .. math:: p(C_k \\mid x) = \\frac{\\sum_{s \\in C_k} e^{\\bar\\ell(s)}}
                {\\sum_{s} e^{\\bar\\ell(s)}}, \\qquad
                \\mathrm{SE} = -\\sum_k p(C_k \\mid x) \\log p(C_k \\mid x).

    - ``variant="paper"`` (Eq. 2 of Zhang et al. [3]_, the Monte-Carlo estimator
      of Kuhn et al. [1]_), with the same :math:`p(C_k \\mid x)`:

      .. math:: \\mathrm{SE} = -\\frac{1}{K} \\sum_{k=1}^K \\log p(C_k \\mid x).

    All variants are 0 when every sample falls in one cluster; for :math:`N`
    mutually non-equivalent equally likely samples all equal :math:`\\log N`.
    Samples with no tokens get :math:`\\bar\\ell = 0` (the log-likelihood of the
    empty continuation as recorded, i.e. no token penalty).

    Parameters
    ----------
    n_samples : int >= 1, default 10
    temperature : float > 0, default 0.7
    top_p : float in (0, 1], default 0.95
    top_k : int >= 0, default 50
        Sampling defaults. Measured on the 135M edge model, temperature 1.0
        without truncation gives mostly off-topic samples, so the defaults are
        milder; the evaluation harness sweeps these settings.
    max_new_tokens : int >= 1, default 64
    equivalence : {"embedding", "nli", "exact"} or Equivalence, default "embedding"
    variant : {"discrete", "weighted", "paper"}, default "discrete"
    include_greedy : bool, default False
        Also cluster the greedy answer with the samples (N + 1 answers).
    seed : int or None, default None
        Sampling seed for reproducible draws.

    Notes
    -----
    ``details`` holds ``n_clusters`` (float array of shape (n_prompts,)) and
    ``n_checks`` (equivalence checks made for the whole batch, repeated per
    prompt).
    """

    def __init__(
        self,
        n_samples: int = 10,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 50,
        max_new_tokens: int = 64,
        equivalence: Any = "embedding",
        variant: str = "discrete",
        include_greedy: bool = False,
        seed: int | None = None,
    ) -> None:
        self.n_samples = n_samples
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.equivalence = equivalence
        self.variant = variant
        self.include_greedy = include_greedy
        self.seed = seed

    def _equivalence(self) -> Equivalence:
        # A backend built from a name is kept, so its model (e.g. the default
        # embedder) is loaded once per estimator, not once per batch.
        if isinstance(self.equivalence, str):
            cached = getattr(self, "_equivalence_cache", None)
            if cached is not None and cached[0] == self.equivalence:
                return cached[1]
            built = resolve_equivalence(self.equivalence, "equivalence", type(self).__name__)
            self._equivalence_cache = (self.equivalence, built)
            return built
        return resolve_equivalence(self.equivalence, "equivalence", type(self).__name__)

    def sample_request(self) -> SampleRequest:
        cfg = self._sampling_config()
        owner = type(self).__name__
        check_choice(self.variant, "variant", owner, _VARIANTS)
        check_bool(self.include_greedy, "include_greedy", owner)
        self._equivalence()
        return SampleRequest(greedy=True, max_new_tokens=cfg.max_new_tokens, sampling=cfg)

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        owner = type(self).__name__
        cfg = self._sampling_config()
        variant = check_choice(self.variant, "variant", owner, _VARIANTS)
        include_greedy = check_bool(self.include_greedy, "include_greedy", owner)
        equiv = self._equivalence()

        groups: list[list[Sample]] = []
        for i, s in enumerate(samples):
            drawn = list(s.sampled(cfg))
            if len(drawn) < cfg.n:
                raise EstimationError(
                    f"SemanticEntropy needs {cfg.n} samples per prompt with its sampling "
                    f"settings; prompt {i} has {len(drawn)}. Pass the model or complete samples."
                )
            if include_greedy:
                if s.greedy is None:
                    raise EstimationError(
                        f"SemanticEntropy(include_greedy=True) needs the greedy answer; "
                        f"prompt {i} has none."
                    )
                drawn = [s.greedy, *drawn]
            groups.append(drawn)

        labels = equiv.cluster_many(
            [prompt_text(s.prompt) for s in samples], [[x.text for x in g] for g in groups]
        )
        n_checks = float(equiv.last_n_checks)
        scores = np.empty(len(samples), dtype=np.float64)
        n_clusters = np.empty(len(samples), dtype=np.float64)
        for i, (g, lab) in enumerate(zip(groups, labels)):
            lls: list[float] | None = None
            if variant != "discrete":
                lls = [_length_normalised_ll(x, i) for x in g]
            scores[i] = semantic_entropy_from_clusters(lab, lls, variant)
            n_clusters[i] = len(set(lab))
        details = {"n_clusters": n_clusters, "n_checks": np.full(len(samples), n_checks)}
        return scores, details


def _length_normalised_ll(sample: Sample, prompt_index: int) -> float:
    if sample.token_logprobs is None:
        raise EstimationError(
            "The 'weighted' and 'paper' semantic entropy variants need token log-probabilities, "
            f"but a sample of prompt {prompt_index} has none (the backend did not report "
            "them). Use variant='discrete' or a backend that returns logprobs."
        )
    if len(sample.token_logprobs) == 0:
        return 0.0
    return float(np.mean(sample.token_logprobs))
