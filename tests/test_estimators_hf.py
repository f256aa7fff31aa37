"""Estimators end to end on tiny in-process models (real transformers code paths)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from confroute.estimators import (
    EmbeddingEquivalence,
    EnsembleEstimator,
    MeanTokenEntropy,
    NLIEquivalence,
    SelfConsistency,
    SemanticEntropy,
    SequenceLogProb,
    VerbalizedConfidence,
    estimate_many,
    parse_confidence,
)
from confroute.types import GenerationConfig
from tests.test_estimators_support import NoGenerationModel, TrigramEmbedder
from tests.tiny_models import make_nli_model

PROMPTS = ["The capital of France is", "What is the answer?"]


class CountingModel:
    """Wraps a real model and records every generate call (to check shared generation)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.name = "counting"
        self.calls: list[tuple[int, GenerationConfig]] = []

    def generate(self, prompts, config):  # type: ignore[no-untyped-def]
        self.calls.append((len(prompts), config))
        return self.inner.generate(prompts, config)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def lm(tiny_llama):  # type: ignore[no-untyped-def]
    from confroute.models.hf import HFLanguageModel

    model, tok = tiny_llama
    return HFLanguageModel(model, tok, device="cpu")


def test_logprob_estimators_match_sample_statistics(lm) -> None:  # type: ignore[no-untyped-def]
    out = MeanTokenEntropy(max_new_tokens=8).estimate(PROMPTS, lm)
    for score, s in zip(out.scores, out.samples):
        assert s.greedy is not None and s.greedy.token_entropies is not None
        assert score == pytest.approx(float(np.mean(s.greedy.token_entropies)))
        assert score >= 0.0
    nll = SequenceLogProb(max_new_tokens=8).estimate(PROMPTS, samples=out.samples)
    for score, s in zip(nll.scores, out.samples):
        assert score == pytest.approx(-float(np.mean(s.greedy.token_logprobs)))  # type: ignore[union-attr, arg-type]


@pytest.mark.parametrize("variant", ["discrete", "weighted", "paper"])
def test_semantic_entropy_seeded_is_deterministic(lm, variant: str) -> None:  # type: ignore[no-untyped-def]
    se = SemanticEntropy(n_samples=4, max_new_tokens=6, equivalence="exact", variant=variant,
                         seed=7)
    a = se.estimate(PROMPTS, lm)
    b = se.estimate(PROMPTS, lm)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert (np.all(a.scores >= 0) and np.all(a.scores <= math.log(4) + 1e-9)) or variant == "paper"
    assert np.all((a.details["n_clusters"] >= 1) & (a.details["n_clusters"] <= 4))
    # reuse: the same samples score again with no model and no generation
    c = se.estimate(PROMPTS, NoGenerationModel(), samples=a.samples)
    np.testing.assert_array_equal(a.scores, c.scores)


def test_shared_generation_across_estimators(lm) -> None:  # type: ignore[no-untyped-def]
    counting = CountingModel(lm)
    se = SemanticEntropy(n_samples=3, max_new_tokens=6, equivalence=EmbeddingEquivalence(
        embedder=TrigramEmbedder(), threshold=0.9), seed=1)
    sc = SelfConsistency(n_samples=3, max_new_tokens=6, seed=1)  # same sampling settings
    out = estimate_many([se, sc, MeanTokenEntropy(max_new_tokens=6)], PROMPTS, counting)
    # one greedy call and one sampling call for both sampling estimators
    assert [cfg.greedy for _, cfg in counting.calls] == [True, False]
    assert all(e.scores.shape == (2,) for e in out.values())


def test_verbalized_asks_followup_and_parses_only_the_reply(lm) -> None:  # type: ignore[no-untyped-def]
    counting = CountingModel(lm)
    v = VerbalizedConfidence(max_new_tokens=6, answer_max_new_tokens=6)
    out = v.estimate(PROMPTS, counting)
    assert len(counting.calls) == 2  # greedy answer, then one batched follow-up
    for s, score, parsed in zip(out.samples, out.scores, out.details["parsed"]):
        reply = s.extra[v.extra_key].text
        conf = parse_confidence(reply, s.greedy.text)
        assert parsed == (conf is not None)
        assert (math.isnan(score) and conf is None) or score == pytest.approx(1 - conf / 100)
        # the question itself says "0 to 100"; it is never what gets parsed
        assert v.question not in reply
    again = v.estimate(PROMPTS, NoGenerationModel(), samples=out.samples)
    np.testing.assert_array_equal(np.nan_to_num(out.scores, nan=-1),
                                  np.nan_to_num(again.scores, nan=-1))


def test_ensemble_end_to_end(lm) -> None:  # type: ignore[no-untyped-def]
    ens = EnsembleEstimator([
        MeanTokenEntropy(max_new_tokens=6),
        SemanticEntropy(n_samples=3, max_new_tokens=6, temperature=0.9, equivalence="exact",
                        seed=3),
        SelfConsistency(n_samples=2, max_new_tokens=6, temperature=1.0, seed=3),
    ])
    counting = CountingModel(lm)
    out = ens.estimate(PROMPTS, counting)
    assert len(counting.calls) == 3  # greedy + one call per distinct sampling setting
    feats = ens.member_scores(out)
    assert feats.shape == (2, 3)
    assert np.all((out.scores >= 0) & (out.scores <= 1))


def test_semantic_entropy_with_tiny_nli(lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nli = NLIEquivalence(make_nli_model(tmp_path / "nli"), device="cpu", batch_size=8)
    se = SemanticEntropy(n_samples=3, max_new_tokens=5, equivalence=nli, seed=0)
    out = se.estimate(PROMPTS, lm)
    assert out.scores.shape == (2,) and out.n_unscored == 0
    assert np.all(out.details["n_checks"] == nli.last_n_checks)


def test_default_embedder_equivalence() -> None:
    eq = EmbeddingEquivalence(threshold=0.8)  # all-MiniLM-L6-v2 shipped in a PyPI package
    labels = eq.cluster("Where is the Eiffel Tower?",
                        ["It is in Paris.", "In Paris, France.", "Bananas are yellow."])
    assert labels == [0, 0, 1]
