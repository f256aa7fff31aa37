"""Self-consistency: disagreement among sampled final answers.

References
----------
.. [1] Wang et al., "Self-Consistency Improves Chain of Thought Reasoning in
   Language Models", ICLR 2023.
.. [2] Xiong et al., "Can LLMs Express Their Uncertainty? An Empirical Evaluation of
   Confidence Elicitation in LLMs", ICLR 2024 (agreement-based consistency).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from confroute._validation import check_choice
from confroute.errors import EstimationError
from confroute.estimators.answers import get_extractor
from confroute.estimators.base import (
    SamplingEstimatorMixin,
    UncertaintyEstimator,
    estimator_registry,
)
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import Samples

__all__ = ["SelfConsistency", "answer_agreement"]


def answer_agreement(answers: Sequence[str | None]) -> tuple[float, float]:
    """Majority fraction and entropy of a list of extracted answers.

    A None (unextractable) answer counts as its own distinct answer that can
    never be the majority.

    Parameters
    ----------
    answers : sequence of (str or None), length N >= 1

    Returns
    -------
    agreement : float
        :math:`\\max_a n_a / N` over extracted answers (0 when none was extracted).
    entropy : float
        :math:`-\\sum_a (n_a/N) \\log (n_a/N)`, each None a singleton.
    """
    n = len(answers)
    counts = Counter(a for a in answers if a is not None)
    agreement = max(counts.values(), default=0) / n
    freqs = np.array(list(counts.values()) + [1] * sum(a is None for a in answers), float) / n
    entropy = float(max(0.0, -np.sum(freqs * np.log(freqs))))
    return agreement, entropy


@estimator_registry.register("self_consistency")
class SelfConsistency(SamplingEstimatorMixin, UncertaintyEstimator):
    """Uncertainty from how often sampled answers agree.

    ``n_samples`` answers are sampled and an extractor maps each to a short
    canonical answer (a number, a choice letter, a normalised first sentence).
    With :math:`n_a` the count of answer :math:`a` among :math:`N` samples:

    .. math:: u_{\\text{majority}} = 1 - \\max_a \\frac{n_a}{N}, \\qquad
              u_{\\text{entropy}} = -\\sum_a \\frac{n_a}{N} \\log \\frac{n_a}{N}.

    A sample whose answer cannot be extracted counts as its own distinct answer
    that never forms the majority: it lowers the agreement and adds
    :math:`-\\frac1N \\log\\frac1N` to the entropy. If no answer is extracted at
    all, the majority score is 1 (no agreement).

    Parameters
    ----------
    n_samples : int >= 1, default 10
    temperature : float > 0, default 0.7
    top_p : float in (0, 1], default 0.95
    top_k : int >= 0, default 50
    max_new_tokens : int >= 1, default 64
    extractor : {"short", "number", "choice", "normalized"} or callable, default "short"
    measure : {"majority", "entropy"}, default "majority"
    seed : int or None, default None

    Notes
    -----
    ``details``: ``agreement`` (majority fraction, float array) and
    ``n_extracted`` (samples whose answer was extracted).
    """

    def __init__(
        self,
        n_samples: int = 10,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 50,
        max_new_tokens: int = 64,
        extractor: Any = "short",
        measure: str = "majority",
        seed: int | None = None,
    ) -> None:
        self.n_samples = n_samples
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.extractor = extractor
        self.measure = measure
        self.seed = seed

    def sample_request(self) -> SampleRequest:
        cfg = self._sampling_config()
        owner = type(self).__name__
        check_choice(self.measure, "measure", owner, ("majority", "entropy"))
        get_extractor(self.extractor, "extractor", owner)
        return SampleRequest(greedy=True, max_new_tokens=cfg.max_new_tokens, sampling=cfg)

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        owner = type(self).__name__
        cfg = self._sampling_config()
        measure = check_choice(self.measure, "measure", owner, ("majority", "entropy"))
        extract = get_extractor(self.extractor, "extractor", owner)
        n = len(samples)
        scores = np.empty(n, dtype=np.float64)
        agreement = np.empty(n, dtype=np.float64)
        n_extracted = np.empty(n, dtype=np.float64)
        for i, s in enumerate(samples):
            drawn = s.sampled(cfg)
            if len(drawn) < cfg.n:
                raise EstimationError(
                    f"SelfConsistency needs {cfg.n} samples per prompt with its sampling "
                    f"settings; prompt {i} has {len(drawn)}. Pass the model or complete samples."
                )
            answers = [extract(x.text) for x in drawn]
            agree, ent = answer_agreement(answers)
            agreement[i] = agree
            n_extracted[i] = sum(a is not None for a in answers)
            scores[i] = 1.0 - agree if measure == "majority" else ent
        return scores, {"agreement": agreement, "n_extracted": n_extracted}
