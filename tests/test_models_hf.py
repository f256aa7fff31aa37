"""HFLanguageModel on tiny real (randomly initialised) Llama and GPT-2 models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confroute.errors import InvalidParameterError, InvalidTypeError, ModelLoadError
from confroute.models.base import LanguageModel, ScoringLanguageModel
from confroute.models.hf import HFLanguageModel
from confroute.types import GenerationConfig
from tests.tiny_models import make_tokenizer, save_causal_lm

PROMPTS = [
    "The capital of France is",
    "Two plus two",
    "Question: who wrote Hamlet? Answer:",
    "hello",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_llama, tiny_gpt2):
    """(arch, model, tokenizer) for both architectures."""
    model, tok = tiny_llama if request.param == "llama" else tiny_gpt2
    return request.param, model, tok


@pytest.fixture(scope="module")
def lm(pair):
    _, model, tok = pair
    return HFLanguageModel(model, tok, device="cpu")


@pytest.fixture(scope="module")
def peaked(pair):
    """A copy whose output distribution is peaked and whose EOS is likely at some
    steps and not others, so sequences in a batch end at different lengths."""
    _, model, tok = pair
    model = copy.deepcopy(model)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(8.0)
        emb[tok.eos_token_id].mul_(4.0)
    return HFLanguageModel(model, tok, device="cpu", use_chat_template=False)


def _reference_greedy(hf: HFLanguageModel, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate on the unpadded prompt."""
    text = hf.render_prompt(prompt)
    enc = hf.tokenizer([text], add_special_tokens=not hf.templated, return_tensors="pt")
    out = hf.model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=hf.tokenizer.pad_token_id,
    )
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_implements_protocols(lm):
    assert isinstance(lm, LanguageModel)
    assert isinstance(lm, ScoringLanguageModel)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(peaked, prompt):
    out = peaked.generate([prompt], GenerationConfig(max_new_tokens=10))
    assert len(out) == 1 and len(out[0]) == 1
    s = out[0][0]
    assert list(s.token_ids) == _reference_greedy(peaked, prompt, 10)
    assert s.text == peaked.tokenizer.decode(list(s.token_ids), skip_special_tokens=True)


@pytest.mark.parametrize("config", [
    GenerationConfig(max_new_tokens=7),
    GenerationConfig(max_new_tokens=7, temperature=0.8, top_p=0.9, top_k=20, n=4, seed=3),
])
def test_token_statistics_shapes_bounds_and_teacher_forcing(lm, config):
    out = lm.generate(PROMPTS, config)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    assert [len(o) for o in out] == [config.n] * len(PROMPTS)
    for prompt, samples in zip(PROMPTS, out):
        rescored = lm.score([prompt] * len(samples), [list(s.token_ids) for s in samples])
        for s, ref in zip(samples, rescored):
            assert s.token_logprobs is not None and s.token_entropies is not None
            assert s.token_logprobs.dtype == np.float32
            assert s.token_logprobs.shape == s.token_entropies.shape == (len(s.token_ids),)
            assert np.all(s.token_entropies >= 0.0)
            assert np.all(s.token_entropies <= math.log(vocab) + 1e-4)
            assert np.all(s.token_logprobs <= 0.0)
            # Raw (unprocessed) distribution: independent of temperature/top-p/top-k.
            np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4)
            assert s.prompt_tokens == len(lm._encode_prompts([prompt])[0])


def test_entropy_equals_direct_computation(lm):
    s = lm.generate(["hello"], GenerationConfig(max_new_tokens=3))[0][0]
    ids = lm._encode_prompts(["hello"])[0] + list(s.token_ids)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].double()
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log(p)).sum(-1).numpy()
    start = len(ids) - len(s.token_ids) - 1
    np.testing.assert_allclose(s.token_entropies, ent[start:start + len(s.token_ids)], atol=1e-4)


def test_eos_truncation_in_a_batch(peaked):
    eos = peaked.tokenizer.eos_token_id
    max_new = 12
    cfg = GenerationConfig(max_new_tokens=max_new, temperature=1.0, n=10, seed=0)
    samples = peaked.generate(["hello world", "A B C"], cfg)
    flat = [s for group in samples for s in group]
    lengths = {len(s.token_ids) for s in flat}
    assert len(lengths) > 1, "the biased model should end some samples early"
    assert any(s.finish_reason == "stop" for s in flat)
    for prompt, group in zip(["hello world", "A B C"], samples):
        rescored = peaked.score([prompt] * len(group), [list(s.token_ids) for s in group])
        for s, ref in zip(group, rescored):
            ids = list(s.token_ids)
            assert len(s.token_logprobs) == len(s.token_entropies) == len(ids)
            if s.finish_reason == "stop":
                assert ids[-1] == eos and eos not in ids[:-1]  # EOS kept, nothing after it
            else:
                assert len(ids) == max_new and eos not in ids
            np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4)


def test_left_padding_matches_single_prompt(peaked):
    prompts = ["hi", "Question: who wrote Hamlet? Answer:", "2 + 2 ="]
    cfg = GenerationConfig(max_new_tokens=8)
    batched = peaked.generate(prompts, cfg)
    for p, b in zip(prompts, batched):
        single = peaked.generate([p], cfg)[0][0]
        assert b[0].token_ids == single.token_ids
        assert b[0].text == single.text
        assert b[0].finish_reason == single.finish_reason
        np.testing.assert_allclose(b[0].token_logprobs, single.token_logprobs, atol=1e-4)
        np.testing.assert_allclose(b[0].token_entropies, single.token_entropies, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(lm):
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, n=5, seed=11)
    before = torch.get_rng_state()
    a = lm.generate(PROMPTS[:2], cfg)
    b = lm.generate(PROMPTS[:2], cfg)
    assert torch.equal(before, torch.get_rng_state())
    c = lm.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=6, temperature=1.0, n=5,
                                                  seed=12))
    ids = lambda out: [[s.token_ids for s in g] for g in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    # Samples of one prompt are not all identical (near-uniform tiny model).
    assert len({s.token_ids for s in a[0]}) > 1


def _count_generate_calls(monkeypatch, hf: HFLanguageModel) -> list[int]:
    calls: list[int] = []
    real = hf.model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf.model, "generate", counting)
    return calls


def _count_prefills(monkeypatch, hf: HFLanguageModel) -> list[int]:
    """Rows of every multi-token forward pass (the prefills of the own decoding loop)."""
    calls: list[int] = []
    real = hf.model.forward

    def counting(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:
            calls.append(ids.shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf.model, "forward", counting)
    return calls


def test_n_samples_of_one_prompt_is_one_generate_call(pair, monkeypatch):
    _, model, tok = pair
    hf = HFLanguageModel(model, tok, device="cpu", decoding="transformers")
    calls = _count_generate_calls(monkeypatch, hf)
    out = hf.generate(["hello"], GenerationConfig(max_new_tokens=4, temperature=0.7, n=10,
                                                  seed=0))
    assert calls == [1]
    assert len(out[0]) == 10


def test_n_samples_of_one_prompt_is_one_pass_of_the_own_loop(lm, monkeypatch):
    generate_calls = _count_generate_calls(monkeypatch, lm)
    prefills = _count_prefills(monkeypatch, lm)
    out = lm.generate(["hello"], GenerationConfig(max_new_tokens=4, temperature=0.7, n=10,
                                                  seed=0))
    assert generate_calls == [] and prefills == [1]  # the prompt is encoded once
    assert len(out[0]) == 10


@pytest.mark.parametrize(("n_prompts", "batch_size", "expected"), [
    (5, 2, [2, 2, 1]),
    (3, 16, [3]),
    (4, 4, [4]),
])
@pytest.mark.parametrize("decoding", ["transformers", "confroute"])
def test_batching_over_prompts(pair, monkeypatch, n_prompts, batch_size, expected, decoding):
    _, model, tok = pair
    hf = HFLanguageModel(model, tok, device="cpu", batch_size=batch_size, decoding=decoding)
    if decoding == "transformers":
        calls = _count_generate_calls(monkeypatch, hf)
    else:
        calls = _count_prefills(monkeypatch, hf)
    prompts = (PROMPTS * 2)[:n_prompts]
    out = hf.generate(prompts, GenerationConfig(max_new_tokens=3, temperature=1.0, n=2, seed=1))
    assert calls == expected
    assert [len(o) for o in out] == [2] * n_prompts


def test_chat_template_used_when_present(pair):
    _, model, tok = pair
    hf = HFLanguageModel(model, tok, device="cpu", system_prompt="Be brief.")
    assert hf.templated
    text = hf.render_prompt("Two plus two")
    assert text == "<|system|>Be brief.</s><|user|>Two plus two</s><|assistant|>"
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "2+2?"}]
    # A conversation is templated whole; its own system message wins.
    assert hf.render_prompt(conv) == (
        "<|system|>S</s><|user|>Hi</s><|assistant|>Yo</s><|user|>2+2?</s><|assistant|>"
    )
    out = hf.generate([conv, "Two plus two"], GenerationConfig(max_new_tokens=3))
    assert out[0][0].prompt_tokens == len(tok(hf.render_prompt(conv),
                                              add_special_tokens=False)["input_ids"])
    assert out[1][0].prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])


def test_raw_text_without_template(pair):
    _, model, _ = pair
    tok = make_tokenizer(chat=False)
    hf = HFLanguageModel(model, tok, device="cpu")
    assert not hf.templated
    assert hf.render_prompt("Two plus two") == "Two plus two"
    conv = [{"role": "user", "content": "Hi"}]
    assert hf.render_prompt(conv) == "user: Hi\nassistant:"
    out = hf.generate(["Two plus two", conv], GenerationConfig(max_new_tokens=3))
    assert out[0][0].prompt_tokens == len(tok("Two plus two")["input_ids"])
    assert len(out[1][0].token_ids) > 0
    forced = HFLanguageModel(model, make_tokenizer(chat=True), device="cpu",
                             use_chat_template=False)
    assert forced.render_prompt("Two plus two") == "Two plus two"


@pytest.mark.parametrize("seed", [0, 1])
def test_stop_string_cuts_text_and_tokens(lm, seed):
    prompt = "Question: who wrote Hamlet? Answer:"
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=seed)
    full = lm.generate([prompt], cfg)[0][0]
    # A stop string that first appears strictly inside the generated text.
    candidates = [full.text[k:k + 2] for k in range(1, len(full.text) - 2)]
    stop = next(c for c in candidates if c.isalpha() and c.isascii() and full.text.find(c) > 0)
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=seed, stop=(stop,))
    cut = lm.generate([prompt], cfg)[0][0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    k = len(cut.token_ids)
    assert cut.token_ids == full.token_ids[:k]
    decode = lm.tokenizer.decode
    # Minimal prefix of tokens that covers the kept text.
    assert decode(list(cut.token_ids), skip_special_tokens=True).startswith(cut.text)
    assert not decode(list(cut.token_ids[:-1]), skip_special_tokens=True).startswith(cut.text)
    np.testing.assert_allclose(cut.token_logprobs, full.token_logprobs[:k], atol=1e-5)
    assert len(cut.token_entropies) == k


def test_score_text_and_empty_continuation(lm):
    res = lm.score(["The capital of France is", "hello"], [" Paris.", ""])
    n_tok = len(lm.tokenizer(" Paris.", add_special_tokens=False)["input_ids"])
    assert res[0].shape == (n_tok,) and np.all(res[0] <= 0.0)
    assert res[1].shape == (0,)
    # Batched scoring equals one-at-a-time scoring (right padding is harmless).
    alone = lm.score(["The capital of France is"], [" Paris."])[0]
    np.testing.assert_allclose(res[0], alone, atol=1e-5)


def test_continuations_of_one_prompt_share_its_prefill(lm):
    """The options of one prompt are scored from one prefill (its cache repeated)
    and give the same log-probs as scoring each pair on its own."""
    prompt = "Question: which is a colour?\nA. red\nB. table\nAnswer:"
    conts = [" A", " red and blue", "", " a long wooden table", " B"]
    prompts = [prompt] * len(conts) + ["another prompt"]
    conts = [*conts, " alone"]
    got = lm.score(prompts, conts)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        ref = lm.score([p], [c])[0]  # a prompt scored alone: the plain batched pass
        n_tok = len(lm.tokenizer(c, add_special_tokens=False)["input_ids"])
        assert got[i].shape == ref.shape == (n_tok,)
        np.testing.assert_allclose(got[i], ref, atol=1e-5)


def test_load_from_path(tmp_path, tiny_llama):
    path = save_causal_lm(tmp_path / "m", "llama", seed=0)
    hf = HFLanguageModel(path, device="cpu", dtype="float64")
    assert hf.name == str(path)
    assert hf.model.dtype == torch.float64
    assert hf.device == torch.device("cpu")
    obj = HFLanguageModel(tiny_llama[0], tiny_llama[1], device="cpu")
    cfg = GenerationConfig(max_new_tokens=5)
    from_disk = hf.generate(["hello"], cfg)[0][0]
    assert from_disk.token_ids == obj.generate(["hello"], cfg)[0][0].token_ids
    # Tokenizer found through config._name_or_path when the model object came from disk.
    again = HFLanguageModel(hf.model, device="cpu", name="tiny")
    assert again.name == "tiny" and again.tokenizer is not None


def test_device_auto_and_default_name(tiny_llama):
    hf = HFLanguageModel(*tiny_llama)
    # "auto" with a model object: where the object already is (it is never moved).
    assert hf.device == torch.device("cpu")
    assert hf.name == "LlamaForCausalLM"


def test_pad_token_falls_back_to_eos(tiny_gpt2):
    tok = make_tokenizer(chat=False, padding_side="right")
    tok.pad_token = None
    hf = HFLanguageModel(tiny_gpt2[0], tok, device="cpu")
    assert hf.tokenizer.pad_token == hf.tokenizer.eos_token
    assert hf.tokenizer.padding_side == "left"
    out = hf.generate(["hello", "The capital of France is"], GenerationConfig(max_new_tokens=4))
    assert all(len(o[0].token_logprobs) == len(o[0].token_ids) for o in out)


@pytest.mark.parametrize(("prompts", "error", "match"), [
    ([], InvalidParameterError, "'prompts'.*non-empty"),
    ("hello", InvalidTypeError, "'prompts'.*wrap a single prompt"),
    ([""], InvalidParameterError, r"'prompts\[0\]'"),
    (["ok", "   "], InvalidParameterError, r"'prompts\[1\]'"),
    ([3], InvalidTypeError, r"'prompts\[0\]'"),
    ([[{"role": "user"}]], InvalidTypeError, r"'prompts\[0\]\[0\]'"),
])
def test_bad_prompts(lm, prompts, error, match):
    with pytest.raises(error, match=match):
        lm.generate(prompts, GenerationConfig())
    with pytest.raises(error, match=match):
        lm.score(prompts, ["x"] * (len(prompts) if isinstance(prompts, list) else 1))


def test_bad_config_and_settings(pair, lm):
    _, model, tok = pair
    with pytest.raises(InvalidTypeError, match=r"'config' parameter of HFLanguageModel\.generate"):
        lm.generate(["hi"], {"max_new_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="'n' parameter of GenerationConfig"):
        GenerationConfig(n=0, temperature=1.0)
    with pytest.raises(InvalidParameterError, match="'batch_size'"):
        HFLanguageModel(model, tok, device="cpu", batch_size=0).generate(["hi"], GenerationConfig())
    no_template = HFLanguageModel(model, make_tokenizer(chat=False), device="cpu",
                                  use_chat_template=True)
    with pytest.raises(InvalidParameterError, match="'use_chat_template'"):
        no_template.generate(["hi"], GenerationConfig())
    with pytest.raises(InvalidParameterError, match=r"inputs of HFLanguageModel\.score"):
        lm.score(["a", "b"], ["x"])
    with pytest.raises(InvalidTypeError, match=r"'continuations\[0\]'"):
        lm.score(["a"], [3.5])  # type: ignore[list-item]
    with pytest.raises(InvalidParameterError, match=r"'continuations\[0\]'"):
        lm.score(["a"], [[10**7]])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"device": "banana"}, InvalidParameterError, "'device'"),
    ({"device": 3}, InvalidTypeError, "'device'"),
    ({"dtype": "int8"}, InvalidParameterError, "'dtype'"),
    ({"dtype": "nonsense"}, InvalidParameterError, "'dtype'"),
    ({"name": 5}, InvalidTypeError, "'name'"),
])
def test_bad_constructor_arguments(tiny_llama, kwargs, error, match):
    with pytest.raises(error, match=match):
        HFLanguageModel(*tiny_llama, **kwargs)


def test_bad_model_and_tokenizer(tiny_llama, tmp_path):
    with pytest.raises(InvalidTypeError, match="'model' parameter of HFLanguageModel"):
        HFLanguageModel(3)
    with pytest.raises(InvalidParameterError, match="'tokenizer' parameter of HFLanguageModel"):
        HFLanguageModel(tiny_llama[0], device="cpu")
    with pytest.raises(ModelLoadError, match="local files only"):
        HFLanguageModel(tmp_path / "does-not-exist", device="cpu")


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(0.1, 2.0),
    top_k=st.integers(0, 50),
    n=st.integers(1, 4),
    max_new=st.integers(1, 8),
)
def test_sampling_invariants(peaked, seed, temperature, top_k, n, max_new):
    cfg = GenerationConfig(max_new_tokens=max_new, temperature=temperature, top_k=top_k, n=n,
                           seed=seed)
    out = peaked.generate(["hello world", "A B C"], cfg)
    eos = peaked.tokenizer.eos_token_id
    for group in out:
        assert len(group) == n
        for s in group:
            k = len(s.token_ids)
            assert 1 <= k <= max_new
            assert s.token_logprobs.shape == s.token_entropies.shape == (k,)
            assert np.all(np.isfinite(s.token_logprobs)) and np.all(s.token_entropies >= 0)
            assert (s.finish_reason == "stop") == (s.token_ids[-1] == eos)
            if top_k == 1:
                # Only the argmax can be drawn: its logprob is the max of the raw distribution.
                assert np.all(s.token_logprobs >= -math.log(len(peaked.tokenizer)) - 1e-4)


# ----------------------------------------------------------------------------- device


def test_resolve_device_parses_and_rejects() -> None:
    from confroute.models.device import resolve_device

    assert resolve_device("cpu", "X") == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), "X") == torch.device("cpu")
    # Parsing only; whether this machine has the device is checked by default.
    assert resolve_device("cuda:1", "X", available=False) == torch.device("cuda", 1)
    with pytest.raises(InvalidParameterError, match=r"'device' parameter of X.*Got 'gpu please'"):
        resolve_device("gpu please", "X")
    with pytest.raises(InvalidTypeError, match="'device' parameter of X"):
        resolve_device(3, "X")


@pytest.mark.parametrize(
    ("cuda", "mps", "allow_mps", "expected"),
    [
        (True, True, True, "cuda"),
        (False, True, True, "mps"),
        (False, True, False, "cpu"),
        (False, False, True, "cpu"),
    ],
)
def test_resolve_device_auto_order(monkeypatch, cuda, mps, allow_mps, expected) -> None:
    # The machine's accelerators are the environment, injected here: CUDA, then
    # MPS when the caller allows it, else CPU.
    from confroute.models import device as device_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device_mod, "mps_available", lambda: mps)
    got = device_mod.resolve_device("auto", "X", mps=allow_mps)
    assert got == torch.device(expected)


def test_auto_device_of_hf_model_never_picks_mps(monkeypatch, tiny_llama) -> None:
    from confroute.models import device as device_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "mps_available", lambda: True)
    hf = HFLanguageModel(tiny_llama[0], tiny_llama[1], device="auto")
    assert hf.device == torch.device("cpu")
