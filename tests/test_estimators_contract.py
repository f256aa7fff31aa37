"""One contract suite run over every registered estimator."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

import confroute.estimators as est_pkg
from confroute.errors import InvalidParameterError
from confroute.estimators import (
    EmbeddingEquivalence,
    EnsembleEstimator,
    HiddenStateProbe,
    MeanTokenEntropy,
    OptionEntropy,
    PromptProbe,
    SelfConsistency,
    SemanticEntropy,
    SemanticEntropyProbe,
    SequenceLogProb,
    UncertaintyEstimator,
    VerbalizedConfidence,
    estimator_registry,
)
from tests.test_estimators_support import (
    NoGenerationModel,
    TrigramEmbedder,
    complete_samples,
    fitted_probe,
)

FACTORIES: dict[str, list[Callable[[], UncertaintyEstimator]]] = {
    "mean_token_entropy": [MeanTokenEntropy],
    "sequence_logprob": [SequenceLogProb, lambda: SequenceLogProb(normalize=False)],
    "semantic_entropy": [
        lambda v=v: SemanticEntropy(n_samples=6, equivalence="exact", variant=v, seed=1)
        for v in ("discrete", "weighted", "paper")
    ] + [
        lambda: SemanticEntropy(
            n_samples=5, equivalence=EmbeddingEquivalence(embedder=TrigramEmbedder()),
            include_greedy=True,
        ),
    ],
    "self_consistency": [
        lambda: SelfConsistency(n_samples=5, seed=0),
        lambda: SelfConsistency(n_samples=4, extractor="number", measure="entropy"),
    ],
    "verbalized": [VerbalizedConfidence],
    "ensemble": [
        lambda: EnsembleEstimator(
            [MeanTokenEntropy(), SemanticEntropy(n_samples=3, equivalence="exact"),
             SelfConsistency(n_samples=4, temperature=1.0), VerbalizedConfidence()]
        ),
        lambda: EnsembleEstimator(["sequence_logprob", "mean_token_entropy"], combine="mean"),
    ],
    "hidden_state_probe": [
        lambda: fitted_probe(HiddenStateProbe(layers=(3, 5), n_folds=3)),
        lambda: fitted_probe(HiddenStateProbe(layers=4, position="answer_last", kind="mlp",
                                              C=1.0, n_folds=3)),
    ],
    "option_entropy": [
        OptionEntropy, lambda: OptionEntropy(measure="margin"),
        lambda: OptionEntropy(scoring="text"),
        lambda: OptionEntropy(scoring="text", normalize="sum", measure="margin"),
    ],
    "prompt_probe": [lambda: fitted_probe(PromptProbe(layers=(1, 2), n_folds=3))],
    "semantic_entropy_probe": [lambda: fitted_probe(SemanticEntropyProbe(
        layers=2, semantic=SemanticEntropy(n_samples=4, equivalence="exact"), n_folds=3))],
}
CASES = [(name, i) for name, fs in FACTORIES.items() for i in range(len(fs))]


def _build(name: str, i: int) -> UncertaintyEstimator:
    return FACTORIES[name][i]()


def test_every_registered_estimator_is_covered() -> None:
    ours = {n for n in estimator_registry.names()
            if estimator_registry.get_class(n).__module__.startswith(est_pkg.__name__)}
    assert ours == set(FACTORIES)


@pytest.mark.parametrize(("name", "i"), CASES)
def test_contract(name: str, i: int) -> None:
    est = _build(name, i)
    assert est.name == name
    prompts = ["capital of France?", "what is 17*23?", "capital of Peru?"]
    samples = [
        complete_samples(est, prompts[0], confident=True),
        complete_samples(est, prompts[1], confident=False),
        complete_samples(est, prompts[2], confident=True),
    ]
    # shared samples reused: no model, and a model that fails on generate, both work
    out = est.estimate(prompts, samples=samples)
    out2 = est.estimate(prompts, NoGenerationModel(), samples=samples)
    assert out.scores.shape == (3,)
    assert out.scores.dtype == np.float64
    np.testing.assert_array_equal(out.scores, out2.scores)  # deterministic
    assert out.n_unscored == 0  # NaN only in documented cases, none here
    # sign: confident < uncertain
    assert out.scores[0] < out.scores[1]
    assert out.scores[2] < out.scores[1]
    for key, val in out.details.items():
        assert np.asarray(val).shape == (3,), key
        assert np.asarray(val).dtype.kind in "fiub", key
    assert [s.prompt for s in out.samples] == prompts
    # parameters are stored unchanged and round-trip (sklearn clone style)
    params = est.get_params(deep=False)
    assert type(est)(**params).get_params(deep=False).keys() == params.keys()


@pytest.mark.parametrize(("name", "i"), CASES)
def test_mismatched_samples_length(name: str, i: int) -> None:
    est = _build(name, i)
    samples = [complete_samples(est, "a?", confident=True)]
    with pytest.raises(InvalidParameterError, match="'samples' parameter"):
        est.estimate(["a?", "b?"], samples=samples)


@pytest.mark.parametrize(("name", "i"), CASES)
def test_missing_generations_need_a_model(name: str, i: int) -> None:
    est = _build(name, i)
    with pytest.raises(InvalidParameterError, match="'model' parameter"):
        est.estimate(["a?"])


@pytest.mark.parametrize(
    ("est", "key"),
    [(MeanTokenEntropy(), None), (SequenceLogProb(), None), (VerbalizedConfidence(), "parsed")],
)
def test_documented_nan_is_counted(est: UncertaintyEstimator, key: str | None) -> None:
    from confroute.types import Sample, Samples

    empty = Sample("", token_ids=(), token_logprobs=np.zeros(0), token_entropies=np.zeros(0))
    s = complete_samples(est, "q", confident=True)
    if isinstance(est, VerbalizedConfidence):
        s = Samples(prompt="q", greedy=s.greedy, extra={est.extra_key: Sample("no idea")})
    else:
        s = Samples(prompt="q", greedy=empty)
    out = est.estimate(["q"], samples=[s])
    assert math.isnan(out.scores[0]) and out.n_unscored == 1
    if key is not None:
        assert out.details[key].tolist() == [0.0]
