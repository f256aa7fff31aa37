"""Write your own uncertainty estimator by subclassing UncertaintyEstimator.

    python examples/custom_estimator.py

The estimator below scores the *hedging* in the greedy answer: the share of
hedge words ("maybe", "I think", ...). It declares what it needs from the edge
model (the greedy answer) and computes one float per prompt, higher = more
uncertain. Registering it makes it usable by name and savable in a Router file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from confroute import Router, load_default_edge_model
from confroute.estimators import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import Samples

HEDGES = re.compile(r"\b(maybe|perhaps|i think|possibly|probably|not sure|might|could be)\b",
                    re.IGNORECASE)


@estimator_registry.register("hedging")
class Hedging(UncertaintyEstimator):
    """Fraction of hedge phrases per word of the greedy answer (higher = more uncertain)."""

    def __init__(self, max_new_tokens: int = 48) -> None:
        self.max_new_tokens = max_new_tokens  # constructors only store parameters

    def sample_request(self) -> SampleRequest:
        return SampleRequest(greedy=True, max_new_tokens=self.max_new_tokens)

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        scores = []
        for s in samples:
            text = s.greedy.text if s.greedy is not None else ""
            words = max(1, len(text.split()))
            scores.append(len(HEDGES.findall(text)) / words)
        return np.asarray(scores, dtype=float), {}


def main() -> None:
    edge = load_default_edge_model()
    prompts = ["What is the capital of France?", "Who was the 21st President of the USA?"]
    est = Hedging()
    estimate = est.estimate(prompts, edge)
    for p, s, v in zip(prompts, estimate.samples, estimate.scores):
        print(f"{p!r}: {s.greedy.text!r} hedging={v:.3f}")
    # Combine it with a built-in estimator in a router; both score one generation.
    router = Router([est, "sequence_logprob"], "platt", "threshold", edge=edge)
    print(router)


if __name__ == "__main__":
    main()
