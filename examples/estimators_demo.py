"""Greedy answers and the four uncertainty estimators on the embedded edge model.

Runs offline on a CPU in under a minute once the embedded model has been
converted (the first run converts it, about a minute more):

    python examples/estimators_demo.py

All four estimators score from one shared generation: the greedy answer feeds
the log-probability estimators and verbalized confidence, and one batched call
draws the samples that semantic entropy and self-consistency share.
"""

from __future__ import annotations

import math
import time

from confroute import load_default_edge_model
from confroute.estimators import (
    MeanTokenEntropy,
    SelfConsistency,
    SemanticEntropy,
    SequenceLogProb,
    VerbalizedConfidence,
    estimate_many,
)

PROMPTS = [
    "What is the capital of France?",  # easy fact
    "How many legs does a spider have?",  # easy fact
    "Who wrote Romeo and Juliet?",  # easy fact
    "What did I have for breakfast on 3 March 2009?",  # unanswerable
    "What is the 7th word of the 31st page of the first edition of Ulysses?",  # unanswerable
]


def main() -> None:
    t0 = time.perf_counter()
    edge = load_default_edge_model()
    t_load = time.perf_counter() - t0
    shared = {"n_samples": 5, "max_new_tokens": 32, "seed": 0}
    estimators = [
        MeanTokenEntropy(max_new_tokens=32),
        SequenceLogProb(max_new_tokens=32),
        SemanticEntropy(equivalence="embedding", **shared),
        SelfConsistency(extractor="short", **shared),
        VerbalizedConfidence(),
    ]
    t1 = time.perf_counter()
    results = estimate_many(estimators, PROMPTS, edge)
    t_est = time.perf_counter() - t1
    samples = next(iter(results.values())).samples
    names = list(results)
    for i, prompt in enumerate(PROMPTS):
        greedy = samples[i].greedy
        print(f"\nQ: {prompt}\nA: {greedy.text if greedy else None!r}")
        for name in names:
            v = results[name].scores[i]
            print(f"   {name:<20} {'NaN (unparseable)' if math.isnan(v) else f'{v:.3f}'}")
    print(f"\n(higher = more uncertain) model load {t_load:.1f} s, all estimators on "
          f"{len(PROMPTS)} prompts {t_est:.1f} s; verbalized unparseable: "
          f"{results['verbalized'].n_unscored}")


if __name__ == "__main__":
    main()
