"""Single-generation estimators from the greedy answer's token statistics.

References
----------
.. [1] Malinin and Gales, "Uncertainty Estimation in Autoregressive Structured
   Prediction", ICLR 2021 (length-normalised sequence log-likelihood, token entropy).
.. [2] Fadeeva et al., "LM-Polygraph: Uncertainty Estimation for Language Models",
   EMNLP 2023 demo (mean token entropy, maximum sequence probability baselines).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from confroute._validation import check_bool, check_int
from confroute.errors import EstimationError
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import Sample, Samples

__all__ = ["MeanTokenEntropy", "SequenceLogProb"]


def _greedy(samples: Sequence[Samples], owner: str) -> list[Sample]:
    out = []
    for i, s in enumerate(samples):
        if s.greedy is None:
            raise EstimationError(
                f"{owner} needs the greedy answer, but prompt {i} has none. Pass the model "
                "or samples that include the greedy generation."
            )
        out.append(s.greedy)
    return out


class _GreedyAnswerEstimator(UncertaintyEstimator):
    """Base of the estimators that score the greedy answer alone."""

    max_new_tokens: int

    def sample_request(self) -> SampleRequest:
        m = check_int(self.max_new_tokens, "max_new_tokens", type(self).__name__, min_value=1)
        return SampleRequest(greedy=True, max_new_tokens=m)


@estimator_registry.register("mean_token_entropy")
class MeanTokenEntropy(_GreedyAnswerEstimator):
    """Mean entropy of the next-token distributions along the greedy answer.

    .. math:: u(x) = \\frac{1}{T} \\sum_{t=1}^{T} H\\big(p(\\cdot \\mid y_{<t}, x)\\big),
              \\qquad H(p) = -\\sum_v p_v \\log p_v

    over the :math:`T` generated tokens of the greedy answer :math:`y` (nats),
    see [1]_, [2]_. An empty answer (:math:`T = 0`) has no defined mean: its
    score is NaN and counted in :attr:`Estimate.n_unscored`.

    Parameters
    ----------
    max_new_tokens : int >= 1, default 64
        Length bound of the greedy answer.

    Notes
    -----
    ``Estimate.details["entropy_exact"]`` (float array of shape (n_prompts,),
    numeric like every detail) is 1.0 where the entropies were exact (a local
    model's full next-token distribution, ``Sample.entropy_kind == "exact"``)
    and 0.0 where they are a top-k lower bound (a remote server's top-k
    log-probabilities, ``"top_k_bound"``: see
    :func:`~confroute.models.openai.approximate_entropy`). Scores of the two
    kinds are not comparable: calibrate on the kind you serve.

    Raises
    ------
    EstimationError
        From :meth:`score_samples` when the backend did not report token entropies
        (remote APIs usually do not).
    """

    def __init__(self, max_new_tokens: int = 64) -> None:
        self.max_new_tokens = max_new_tokens

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        greedy = _greedy(samples, type(self).__name__)
        scores = np.empty(len(greedy), dtype=np.float64)
        n_tokens = np.empty(len(greedy), dtype=np.float64)
        for i, g in enumerate(greedy):
            if g.token_entropies is None:
                raise EstimationError(
                    f"MeanTokenEntropy needs per-token entropies, but the greedy answer of "
                    f"prompt {i} has none: the backend did not report them. Use a local "
                    "HFLanguageModel, or an estimator that needs no token statistics "
                    "(semantic_entropy, self_consistency, verbalized)."
                )
            ent = np.asarray(g.token_entropies, dtype=np.float64)
            n_tokens[i] = ent.size
            scores[i] = float(np.mean(ent)) if ent.size else math.nan
        # exact (local model) or a top-k lower bound (remote server): see Sample.entropy_kind
        exact = np.array([g.entropy_kind == "exact" for g in greedy], dtype=np.float64)
        return scores, {"n_tokens": n_tokens, "entropy_exact": exact}


@estimator_registry.register("sequence_logprob")
class SequenceLogProb(_GreedyAnswerEstimator):
    """Negative log-likelihood of the greedy answer.

    .. math:: u(x) = -\\frac{1}{T} \\sum_{t=1}^{T} \\log p(y_t \\mid y_{<t}, x)
              \\quad (\\text{normalize}), \\qquad
              u(x) = -\\sum_{t=1}^{T} \\log p(y_t \\mid y_{<t}, x) \\quad (\\text{otherwise}).

    Log-probabilities are those of the unprocessed model distribution, so the
    score does not depend on sampling settings [1]_. An empty answer
    (:math:`T = 0`) scores NaN in both modes (counted as unscored): a zero total
    NLL would otherwise make it look maximally confident.

    Parameters
    ----------
    max_new_tokens : int >= 1, default 64
    normalize : bool, default True
        Divide by the number of tokens (length-normalised NLL).

    Raises
    ------
    EstimationError
        From :meth:`score_samples` when the backend did not report token
        log-probabilities.
    """

    def __init__(self, max_new_tokens: int = 64, normalize: bool = True) -> None:
        self.max_new_tokens = max_new_tokens
        self.normalize = normalize

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        normalize = check_bool(self.normalize, "normalize", type(self).__name__)
        greedy = _greedy(samples, type(self).__name__)
        scores = np.empty(len(greedy), dtype=np.float64)
        n_tokens = np.empty(len(greedy), dtype=np.float64)
        for i, g in enumerate(greedy):
            if g.token_logprobs is None:
                raise EstimationError(
                    f"SequenceLogProb needs per-token log-probabilities, but the greedy answer "
                    f"of prompt {i} has none: the backend did not report them (ask an "
                    "OpenAI-compatible server for logprobs, or use a local HFLanguageModel)."
                )
            lp = np.asarray(g.token_logprobs, dtype=np.float64)
            n_tokens[i] = lp.size
            if lp.size == 0:
                scores[i] = math.nan
            else:
                scores[i] = -float(np.mean(lp) if normalize else np.sum(lp))
        return scores, {"n_tokens": n_tokens}
