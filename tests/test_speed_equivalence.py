"""Speed options of HFLanguageModel change nothing but speed (tiny real models)."""

from __future__ import annotations

import numpy as np
import pytest

from confroute.estimators import (
    EnsembleEstimator,
    MeanTokenEntropy,
    SemanticEntropy,
    SequenceLogProb,
    estimate_many,
)
from confroute.models.hf import HFLanguageModel
from confroute.types import GenerationConfig

PROMPTS = [
    "The capital of France is",
    "hi",
    "Question: who wrote Hamlet? Answer: William",
    "Two plus two is four. What is 2 + 2?",
]
SAMPLING = GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=50, n=4, seed=7)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_tok(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


def _lm(model_tok, **kwargs) -> HFLanguageModel:
    model, tok = model_tok
    return HFLanguageModel(model, tok, device="cpu", **kwargs)


class _ForwardCounter:
    """Records the input shape of every forward pass of a model."""

    def __init__(self, model) -> None:
        self.shapes: list[tuple[int, int]] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))

    def remove(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("decoding", ["confroute", "transformers"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_prefill_gives_identical_samples(model_tok, batch_size, decoding):
    plain = _lm(model_tok, shared_prefill=False, batch_size=batch_size, decoding=decoding)
    shared = _lm(model_tok, shared_prefill=True, batch_size=batch_size, decoding=decoding)
    a = plain.generate(PROMPTS, SAMPLING)
    b = shared.generate(PROMPTS, SAMPLING)
    for per_a, per_b in zip(a, b):
        assert len(per_a) == len(per_b) == SAMPLING.n
        for x, y in zip(per_a, per_b):
            assert x.token_ids == y.token_ids
            assert x.text == y.text and x.finish_reason == y.finish_reason
            np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-5)
            np.testing.assert_allclose(x.token_entropies, y.token_entropies, atol=1e-5)


@pytest.mark.parametrize("decoding", ["confroute", "transformers"])
def test_shared_prefill_encodes_the_prompt_once(model_tok, decoding):
    shared = _lm(model_tok, shared_prefill=True, decoding=decoding)
    counter = _ForwardCounter(shared.model)
    try:
        shared.generate(PROMPTS[:1], SAMPLING)
    finally:
        counter.remove()
    n_prompt = len(shared._encode_prompts(PROMPTS[:1])[0])
    if decoding == "transformers":
        # One pass over the prompt minus its last token for the single prompt row,
        # then only one new position per step for the n sample rows.
        assert counter.shapes[0] == (1, n_prompt - 1)
        assert all(s == (SAMPLING.n, 1) for s in counter.shapes[1:])
    else:
        # One pass over the whole prompt for the single prompt row, then one new
        # position per step for the sample rows still running.
        assert counter.shapes[0] == (1, n_prompt)
        assert all(s[0] <= SAMPLING.n and s[1] == 1 for s in counter.shapes[1:])


@pytest.mark.parametrize("decoding", ["confroute", "transformers"])
def test_plain_path_encodes_the_prompt_n_times(model_tok, decoding):
    plain = _lm(model_tok, shared_prefill=False, decoding=decoding)
    counter = _ForwardCounter(plain.model)
    try:
        plain.generate(PROMPTS[:1], SAMPLING)
    finally:
        counter.remove()
    n_prompt = len(plain._encode_prompts(PROMPTS[:1])[0])
    assert counter.shapes[0] == (SAMPLING.n, n_prompt)


def test_greedy_never_uses_shared_prefill(model_tok):
    shared = _lm(model_tok, shared_prefill=True)
    counter = _ForwardCounter(shared.model)
    try:
        shared.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=3))
    finally:
        counter.remove()
    assert counter.shapes[0] == (1, len(shared._encode_prompts(PROMPTS[:1])[0]))


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=8), SAMPLING])
def test_length_buckets_keep_order_and_results(model_tok, config):
    prompts = PROMPTS * 2
    ordered = _lm(model_tok, batch_size=3, bucket_by_length=False)
    bucketed = _lm(model_tok, batch_size=3, bucket_by_length=True)
    a, b = ordered.generate(prompts, config), bucketed.generate(prompts, config)
    if config.greedy:
        assert [s[0].token_ids for s in a] == [s[0].token_ids for s in b]
        for x, y in zip(a, b):
            np.testing.assert_allclose(x[0].token_logprobs, y[0].token_logprobs, atol=1e-5)
    reference = [ordered.generate([p], config)[0][0].token_ids for p in prompts]
    if config.greedy:
        assert [s[0].token_ids for s in b] == reference
    assert [len(s) for s in b] == [config.n] * len(prompts)


@pytest.mark.parametrize("decoding", ["confroute", "transformers"])
def test_buckets_group_prompts_of_similar_length(model_tok, monkeypatch, decoding):
    lm = _lm(model_tok, batch_size=2, bucket_by_length=True, decoding=decoding)
    widths: list[int] = []
    method = "generate" if decoding == "transformers" else "forward"
    real = getattr(lm.model, method)

    def spy(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # generate calls, or prefill passes
            widths.append(int(kwargs["input_ids"].shape[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.model, method, spy)
    lm.generate(PROMPTS, GenerationConfig(max_new_tokens=2))
    lengths = sorted(len(ids) for ids in lm._encode_prompts(PROMPTS))
    assert widths == [lengths[1], lengths[3]]


@pytest.mark.parametrize("decoding", ["confroute", "transformers"])
@pytest.mark.parametrize("shared_prefill", [True, False])
def test_shared_generation_is_computed_once(model_tok, shared_prefill, decoding):
    """estimate_many and an ensemble make exactly the forward passes of one greedy
    call plus one sampling call (with the own decoding loop: of one pass decoding
    both), however many estimators use them."""
    lm = _lm(model_tok, shared_prefill=shared_prefill, decoding=decoding)
    se = SemanticEntropy(n_samples=3, temperature=1.0, top_p=1.0, top_k=0,
                         max_new_tokens=6, equivalence="exact", seed=3)
    members = [MeanTokenEntropy(6), SequenceLogProb(6), SequenceLogProb(6, normalize=False), se]

    counter = _ForwardCounter(lm.model)
    try:
        if decoding == "transformers":
            lm.generate(PROMPTS, GenerationConfig(max_new_tokens=6))
            lm.generate(PROMPTS, se._sampling_config())
        else:
            lm.generate_multi(PROMPTS, [GenerationConfig(max_new_tokens=6),
                                        se._sampling_config()])
        expected = list(counter.shapes)
        counter.shapes.clear()
        estimate_many(members, PROMPTS, lm)
        via_many = list(counter.shapes)
        counter.shapes.clear()
        EnsembleEstimator(members).estimate(PROMPTS, lm)
        via_ensemble = list(counter.shapes)
    finally:
        counter.remove()
    assert via_many == expected
    assert via_ensemble == expected
    prefills = [shape for shape in expected if shape[1] > 1]
    assert len(prefills) == (1 if decoding == "confroute" else 2)
