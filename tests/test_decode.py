"""confroute's own decoding loop (confroute.models._decode) on tiny real models.

It must sample from exactly the distribution transformers' ``generate`` samples
from, give the greedy answer ``generate`` gives, and give the same samples however
the rows are batched (fused configurations, shared prefill, other prompts,
finished rows leaving the batch).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.models import _decode
from confroute.models._decode import filtered_distribution, sample_inverse_cdf
from confroute.models.hf import HFLanguageModel
from confroute.types import GenerationConfig

PROMPTS = [
    "The capital of France is",
    "hi",
    "Question: who wrote Hamlet? Answer: William",
    "Two plus two is four. What is 2 + 2?",
]
GREEDY = GenerationConfig(max_new_tokens=8)
SAMPLING = GenerationConfig(max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=40, n=4,
                            seed=5)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_tok(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


@pytest.fixture(scope="module")
def peaked_pair(model_tok):
    """A copy with a peaked output distribution and a likely EOS, so rows of one
    batch finish at different steps."""
    model, tok = model_tok
    model = copy.deepcopy(model)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(8.0)
        emb[tok.eos_token_id].mul_(4.0)
    return model, tok


def _lm(pair, **kwargs) -> HFLanguageModel:
    model, tok = pair
    return HFLanguageModel(model, tok, device="cpu", use_chat_template=False, **kwargs)


def _ids(out):
    return [[s.token_ids for s in per] for per in out]


def _same_stats(a, b, atol=1e-5):
    for per_a, per_b in zip(a, b):
        for x, y in zip(per_a, per_b):
            assert x.token_ids == y.token_ids
            assert x.text == y.text and x.finish_reason == y.finish_reason
            np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=atol)
            np.testing.assert_allclose(x.token_entropies, y.token_entropies, atol=atol)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (0.7, 50, 0.95), (1.0, 5, 0.5),
    (0.5, 1, 1.0), (2.0, 200, 0.3),
])
def test_filtered_distribution_is_transformers_distribution(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen) * 3.0
    processed = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        processed = TopKLogitsWarper(top_k)(None, processed)
    if top_p < 1.0:
        processed = TopPLogitsWarper(top_p)(None, processed)
    expected = torch.softmax(processed, dim=-1)
    probs, index = filtered_distribution(logits, temperature, top_k, top_p)
    full = torch.zeros_like(logits)
    if index is None:
        full = probs
    else:
        full.scatter_(-1, index, probs)
    full = full / full.sum(-1, keepdim=True)
    torch.testing.assert_close(full, expected, atol=1e-6, rtol=1e-5)


def test_inverse_cdf_sampler_draws_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]]).repeat(40_000, 1)
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(1))
    drawn = sample_inverse_cdf(probs, None, u)
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    torch.testing.assert_close(freq, probs[0].double(), atol=0.01, rtol=0.0)
    assert freq[1] == 0 and freq[4] == 0
    # u at the top edge never lands on the zero-probability tail; candidate ids map back.
    edge = sample_inverse_cdf(
        probs[:1], torch.tensor([[7, 8, 9, 10, 11]]), torch.tensor([1.0 - 1e-9])
    )
    assert edge.tolist() == [10]


def test_first_token_frequencies_match_exact_probabilities(peaked_pair):
    lm = _lm(peaked_pair)
    cfg = GenerationConfig(max_new_tokens=1, temperature=1.0, top_k=20, n=600, seed=3)
    out = lm.generate(["hello world"], cfg)[0]
    ids = lm._encode_prompts(["hello world"])
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor(ids)).logits[0, -1]
    probs, index = filtered_distribution(logits[None], 1.0, 20, 1.0)
    exact = dict(zip(index[0].tolist(), (probs[0] / probs[0].sum()).tolist()))
    counts: dict[int, int] = {}
    for s in out:
        counts[s.token_ids[0]] = counts.get(s.token_ids[0], 0) + 1
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(t, 0) / 600 - p) for t, p in exact.items())
    assert tv < 0.08


def test_greedy_row_is_transformers_greedy(peaked_pair):
    own = _lm(peaked_pair)
    hf = _lm(peaked_pair, decoding="transformers")
    fused = own.generate_multi(PROMPTS, [GREEDY, SAMPLING])
    _same_stats(fused[0], hf.generate(PROMPTS, GREEDY), atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_fused_configurations_equal_separate_calls(peaked_pair, batch_size):
    lm = _lm(peaked_pair, batch_size=batch_size)
    other = GenerationConfig(max_new_tokens=5, temperature=1.2, n=2, seed=9, stop=("e",))
    fused = lm.generate_multi(PROMPTS, [GREEDY, SAMPLING, other])
    _same_stats(fused[0], lm.generate(PROMPTS, GREEDY), atol=1e-4)
    _same_stats(fused[1], lm.generate(PROMPTS, SAMPLING))
    _same_stats(fused[2], lm.generate(PROMPTS, other))
    assert [len(per) for per in fused[1]] == [SAMPLING.n] * len(PROMPTS)


def test_samples_do_not_depend_on_the_batch(peaked_pair):
    lm = _lm(peaked_pair, batch_size=16)
    together = lm.generate(PROMPTS, SAMPLING)
    alone = [lm.generate([p], SAMPLING)[0] for p in PROMPTS]
    _same_stats(together, alone)
    # Rows finished at different steps (EOS), so rows left the batch mid-way.
    lengths = {len(s.token_ids) for per in together for s in per}
    assert len(lengths) > 1
    assert any(s.finish_reason == "stop" for per in together for s in per)


def test_fewer_samples_are_a_prefix_of_more(peaked_pair):
    lm = _lm(peaked_pair)
    many = lm.generate(PROMPTS[:2], SAMPLING)
    few = lm.generate(PROMPTS[:2], GenerationConfig(
        max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=40, n=2, seed=5))
    assert [per[:2] for per in _ids(many)] == _ids(few)


def test_seeds_reproduce_and_leave_the_global_generator(peaked_pair):
    lm = _lm(peaked_pair)
    before = torch.get_rng_state()
    a, b = lm.generate(PROMPTS, SAMPLING), lm.generate(PROMPTS, SAMPLING)
    assert torch.equal(before, torch.get_rng_state())
    assert _ids(a) == _ids(b)
    unseeded = GenerationConfig(max_new_tokens=8, temperature=1.0, n=3)
    torch.manual_seed(0)
    c = lm.generate(PROMPTS, unseeded)
    torch.manual_seed(0)
    d = lm.generate(PROMPTS, unseeded)
    assert _ids(c) == _ids(d)


def test_plain_prefill_gives_the_same_samples(model_tok):
    shared = _lm(model_tok, shared_prefill=True)
    plain = _lm(model_tok, shared_prefill=False)
    _same_stats(shared.generate_multi(PROMPTS, [GREEDY, SAMPLING])[1],
                plain.generate_multi(PROMPTS, [GREEDY, SAMPLING])[1])


@pytest.mark.parametrize("shared", [False, True])
def test_finished_rows_leave_and_shared_histories_are_computed_once(peaked_pair, shared):
    lm = _lm(peaked_pair, shared_prefill=shared)
    rows: list[int] = []
    handle = lm.model.register_forward_pre_hook(
        lambda m, a, k: rows.append(int(k["input_ids"].shape[0])), with_kwargs=True)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, n=6, seed=2)
    try:
        out = lm.generate(PROMPTS, cfg)
    finally:
        handle.remove()
    samples = [(p, s.token_ids) for p, per in enumerate(out) for s in per]
    longest = max(len(ids) for _, ids in samples)
    # Prefill, then one pass per step over the rows still running (after t tokens:
    # the rows longer than t), or over their distinct histories when shared.
    assert rows[0] == (len(PROMPTS) if shared else len(PROMPTS) * cfg.n)
    running = [[(p, ids[:t]) for p, ids in samples if len(ids) > t] for t in range(1, longest)]
    expected = [len(set(r)) if shared else len(r) for r in running]
    assert rows[1:] == expected
    if shared:  # the peaked model makes rows share prefixes: fewer rows computed
        assert sum(expected) < sum(len(r) for r in running)


def test_auto_falls_back_to_generate_when_the_cache_is_unsupported(model_tok, monkeypatch):
    def unsupported(cache):
        raise _decode.UnsupportedModel("injected: no row selection")

    monkeypatch.setattr(_decode, "check_cache", unsupported)
    auto = _lm(model_tok)
    reference = _lm(model_tok, decoding="transformers")
    _same_stats(auto.generate(PROMPTS, SAMPLING), reference.generate(PROMPTS, SAMPLING))
    with pytest.raises(InvalidParameterError, match="'decoding' parameter of HFLanguageModel"):
        _lm(model_tok, decoding="confroute").generate(PROMPTS, SAMPLING)


def test_bad_decoding_and_configs(model_tok):
    with pytest.raises(InvalidParameterError, match="'decoding'"):
        _lm(model_tok, decoding="fast").generate(["hi"], SAMPLING)
    lm = _lm(model_tok)
    with pytest.raises(InvalidTypeError, match=r"'configs' parameter of .*generate_multi"):
        lm.generate_multi(["hi"], SAMPLING)  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match=r"'configs\[1\]'"):
        lm.generate_multi(["hi"], [SAMPLING, {"n": 2}])  # type: ignore[list-item]
    assert lm.generate_multi(["hi"], []) == []


def _count_generate_multi(lm: HFLanguageModel) -> list[int]:
    """Number of configurations of every ``generate_multi`` call made on ``lm``."""
    calls: list[int] = []
    real = lm.generate_multi

    def spy(prompts, configs):
        calls.append(len(configs))
        return real(prompts, configs)

    lm.generate_multi = spy  # type: ignore[method-assign]
    return calls


def test_collect_samples_fuses_configurations_missing_for_the_same_prompts(model_tok):
    from confroute.models.base import SampleRequest, collect_samples

    lm = _lm(model_tok)
    calls = _count_generate_multi(lm)
    requests = [SampleRequest(greedy=True, max_new_tokens=8, sampling=SAMPLING)]
    got = collect_samples(lm, PROMPTS, requests)
    assert calls == [2]
    reference = lm.generate(PROMPTS, SAMPLING)
    assert [[s.token_ids for s in g.draws[SAMPLING.sampling_key()]] for g in got] == \
        _ids(reference)
    # With the greedy answers already there, only the samples are generated.
    calls.clear()
    partial = [g.__class__(prompt=g.prompt, greedy=g.greedy) for g in got]
    again = collect_samples(lm, PROMPTS, requests, existing=partial)
    assert calls == []  # one configuration: a plain generate call
    assert [g.greedy.token_ids for g in again] == [g.greedy.token_ids for g in got]


def test_merge_requests_keeps_the_longest_greedy_and_the_largest_n_per_key():
    from confroute.models.base import SampleRequest, merge_requests

    hot = GenerationConfig(max_new_tokens=8, temperature=1.0, n=3, seed=1)
    hot_more = GenerationConfig(max_new_tokens=8, temperature=1.0, n=7, seed=1)
    cool = GenerationConfig(max_new_tokens=8, temperature=0.5, n=2, seed=1)
    merged = merge_requests([
        SampleRequest(greedy=True, max_new_tokens=4, sampling=hot),
        SampleRequest(greedy=False, sampling=cool),
        SampleRequest(greedy=True, max_new_tokens=16, sampling=hot_more),
    ])
    assert merged == [
        SampleRequest(greedy=True, max_new_tokens=16),
        SampleRequest(greedy=False, sampling=hot_more),
        SampleRequest(greedy=False, sampling=cool),
    ]
    assert merge_requests([SampleRequest(greedy=False, sampling=cool)]) == [
        SampleRequest(greedy=False, sampling=cool)
    ]
    assert merge_requests([]) == []


def test_cached_model_generates_configurations_together(tmp_path, model_tok):
    from confroute.cache import CachedModel, GenerationCache

    lm = _lm(model_tok)
    calls = _count_generate_multi(lm)
    cached = CachedModel(lm, GenerationCache(tmp_path / "c.sqlite"))
    first = cached.generate_multi(PROMPTS, [GREEDY, SAMPLING])
    assert calls == [2] and cached.n_model_calls == 1
    assert len(cached.calls) == 2 and all(r.n_hits == 0 for r in cached.calls)
    again = CachedModel(lm, GenerationCache(tmp_path / "c.sqlite")).generate_multi(
        PROMPTS, [GREEDY, SAMPLING])
    assert calls == [2]
    assert _ids(again[0]) == _ids(first[0]) and _ids(again[1]) == _ids(first[1])
    # A new configuration alongside a cached one: only the new one is generated.
    other = GenerationConfig(max_new_tokens=4, temperature=1.0, n=2, seed=1)
    mixed = cached.generate_multi(PROMPTS, [GREEDY, other])
    assert calls == [2]  # generate (one configuration), not generate_multi
    assert _ids(mixed[1]) == _ids(lm.generate(PROMPTS, other))


def test_models_without_cache_or_positions_are_unsupported():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    with pytest.raises(_decode.UnsupportedModel, match="no cache argument"):
        _decode.forward_params(NoCache())
    with pytest.raises(_decode.UnsupportedModel, match="no position_ids"):
        _decode.forward_params(NoPositions())


@pytest.mark.parametrize("shared", [True, False])
def test_sample_statistics_equal_teacher_forced_scores(peaked_pair, shared):
    """Every token of every row was scored in its own context: right cache row,
    positions and mask after rows shared a history, diverged or left the batch."""
    lm = _lm(peaked_pair, shared_prefill=shared)
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, n=5, seed=4)
    fused = lm.generate_multi(PROMPTS, [GREEDY, cfg])
    for per_config in fused:
        for prompt, per in zip(PROMPTS, per_config):
            scored = lm.score([prompt] * len(per), [list(s.token_ids) for s in per])
            for s, ref in zip(per, scored):
                np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4)


def test_lazy_model_passes_generate_multi_through(model_tok):
    from confroute.evaluation.harness import LazyModel

    lm = _lm(model_tok)
    lazy = LazyModel("tiny", lambda: lm)
    got = lazy.generate_multi(PROMPTS, [GREEDY, SAMPLING])
    assert lazy.loaded
    assert _ids(got[0]) == _ids(lm.generate(PROMPTS, GREEDY))
    assert _ids(got[1]) == _ids(lm.generate(PROMPTS, SAMPLING))
