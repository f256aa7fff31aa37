"""Shared builders for the estimator tests: hand-made Samples and a tiny real embedder.

The embedder is a genuine (if crude) sentence embedder: L2-normalised counts of
hashed character trigrams. It is deterministic, needs no model files and makes
texts that share most trigrams close, so it exercises EmbeddingEquivalence
without any mock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pytest

from confroute.estimators import UncertaintyEstimator, VerbalizedConfidence
from confroute.estimators.ensemble import EnsembleEstimator
from confroute.types import GenerationConfig, Sample, Samples

CONFIDENT_ANSWER = "Paris, 75"
UNCERTAIN_ANSWERS = [
    "1 Berlin", "2 Tokyo", "3 Madrid", "4 Cairo", "5 Lima", "6 Oslo", "7 Quito", "8 Hanoi",
    "9 Dakar", "10 Sofia", "11 Kyiv", "12 Bern",
]


class TrigramEmbedder:
    """L2-normalised hashed character-trigram counts, shape (n, dim)."""

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            s = f"  {t.lower()}  "
            for j in range(len(s) - 2):
                h = int(hashlib.md5(s[j:j + 3].encode()).hexdigest()[:8], 16) % self.dim
                out[i, h] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


def sample(text: str, logprob: float = -0.5, entropy: float = 1.0, n_tokens: int = 3) -> Sample:
    return Sample(
        text=text,
        token_ids=tuple(range(n_tokens)),
        token_logprobs=np.full(n_tokens, logprob),
        token_entropies=np.full(n_tokens, entropy),
    )


def _requests_of(est: UncertaintyEstimator) -> list[GenerationConfig]:
    return [r.sampling for r in est.sample_requests() if r.sampling is not None]


def _verbalized_members(est: UncertaintyEstimator) -> list[VerbalizedConfidence]:
    if isinstance(est, VerbalizedConfidence):
        return [est]
    if isinstance(est, EnsembleEstimator):
        return [m for m in est._members() if isinstance(m, VerbalizedConfidence)]
    return []


def complete_samples(est: UncertaintyEstimator, prompt: str, confident: bool) -> Samples:
    """Samples holding everything ``est`` needs: a confident or an uncertain case."""
    if confident:
        greedy = sample(CONFIDENT_ANSWER, logprob=-0.01, entropy=0.05)
    else:
        greedy = sample("maybe Rome", logprob=-2.5, entropy=3.0)
    draws: dict[tuple[object, ...], tuple[Sample, ...]] = {}
    for cfg in _requests_of(est):
        if confident:
            texts = [CONFIDENT_ANSWER] * cfg.n
        else:
            texts = [UNCERTAIN_ANSWERS[k % len(UNCERTAIN_ANSWERS)] for k in range(cfg.n)]
        lp = -0.01 if confident else -2.5
        draws[cfg.sampling_key()] = tuple(sample(t, logprob=lp) for t in texts)
    extra = {
        v.extra_key: Sample(text="Confidence: 95" if confident else "Confidence: 20%")
        for v in _verbalized_members(est)
    }
    return Samples(prompt=prompt, greedy=greedy, draws=draws, extra=extra)


class NoGenerationModel:
    """A LanguageModel that fails if asked to generate (injects the fault to detect reuse)."""

    name = "no-generation"

    def generate(self, prompts: Sequence[object], config: GenerationConfig) -> list[list[Sample]]:
        pytest.fail("the estimator generated although complete samples were given")


def test_trigram_embedder_is_normalised_and_discriminates() -> None:
    emb = TrigramEmbedder().encode(["Paris", "paris", "Berlin is big", ""])
    assert emb.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(emb[:3], axis=1), 1.0, rtol=1e-5)
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0)
    assert float(emb[0] @ emb[2]) < 0.5
