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


PROBE_WIDTH = 8


def _probe_state(confident: bool, noise: float, seed: int) -> np.ndarray:
    """A hidden state of width PROBE_WIDTH whose first half says how sure the model is."""
    rng = np.random.default_rng(seed)
    base = np.where(np.arange(PROBE_WIDTH) < PROBE_WIDTH // 2, 1.0, 0.0)
    return ((1.0 if confident else -1.0) * base + noise * rng.normal(size=PROBE_WIDTH)).astype(
        np.float32)


def _with_probe_states(est: UncertaintyEstimator, samples: Samples, confident: bool,
                       noise: float, seed: int) -> Samples:
    from dataclasses import replace

    from confroute.estimators import OptionEntropy, PromptProbe

    layers = sorted({i for r in est.sample_requests() for i in r.hidden_layers})
    greedy = samples.greedy
    if layers and greedy is not None:
        states = np.stack([np.stack([_probe_state(confident, noise, seed + 7 * t)
                                     for t in range(greedy.n_tokens)], axis=0)] * len(layers))
        greedy = replace(greedy, hidden_states=states, hidden_layers=tuple(layers))
    extra = dict(samples.extra)
    if isinstance(est, OptionEntropy):  # option log-likelihoods: one clear winner or a tie
        ll = np.array([-0.1, -6.0, -7.0, -8.0] if confident else [-1.4] * 4)
        # text scoring keeps (summed log-prob, token count) per option
        extra[est.cache_key] = (np.column_stack([2 * ll, [2.0] * 4])
                                if est.scoring == "text" else ll)
    if isinstance(est, PromptProbe):
        extra.update({est.extra_key(j): _probe_state(confident, noise, seed)
                      for j in est.active_layers()})
    return replace(samples, greedy=greedy, extra=extra)


def fitted_probe(est: UncertaintyEstimator) -> UncertaintyEstimator:
    """``est`` (a hidden-state probe) fitted on 24 noisy confident/uncertain cases."""
    labels = np.array([1, 0] * 12)
    prompts = [f"q{i}" for i in range(len(labels))]
    samples = [complete_samples(est, p, confident=bool(y), noise=0.5, seed=i)
               for i, (p, y) in enumerate(zip(prompts, labels))]
    est.fit(prompts, samples, labels)  # type: ignore[attr-defined]
    return est


def complete_samples(est: UncertaintyEstimator, prompt: str, confident: bool,
                     noise: float = 0.0, seed: int = 0) -> Samples:
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
    return _with_probe_states(est, Samples(prompt=prompt, greedy=greedy, draws=draws,
                                           extra=extra), confident, noise, seed)


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
