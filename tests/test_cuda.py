"""The CUDA path of HFLanguageModel, on tiny real models: bf16 + SDPA against float32,
the own decoding loop on the GPU, device_map loads (sharded over two GPUs when there
are two), a pre-placed GPU model left where it is.

Marked ``cuda`` and skipped without a CUDA GPU; ``nox -s gpu`` runs them (see
docs/performance.md, "GPU check")."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from confroute.models.hf import HFLanguageModel
from confroute.types import GenerationConfig
from tests.tiny_models import make_causal_lm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = ["The capital of France is", "Two plus two", "Question: who wrote Hamlet? Answer:",
           "hello"]
GREEDY = GenerationConfig(max_new_tokens=8)
SAMPLING = GenerationConfig(max_new_tokens=8, temperature=1.0, n=4, seed=3)


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a peaked output distribution (clear argmax margins), so
    that bf16 rounding does not flip greedy choices."""
    model, tok = make_causal_lm("llama", seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    path = tmp_path_factory.mktemp("cuda") / "peaked"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cpu_reference(peaked_dir) -> HFLanguageModel:
    return HFLanguageModel(peaked_dir, device="cpu", use_chat_template=False)


def _ids(groups) -> list[list[tuple[int, ...]]]:
    return [[s.token_ids for s in g] for g in groups]


def _close(a, b, atol: float) -> None:
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga, gb):
            assert sa.token_ids == sb.token_ids
            np.testing.assert_allclose(sa.token_logprobs, sb.token_logprobs, atol=atol)
            np.testing.assert_allclose(sa.token_entropies, sb.token_entropies, atol=atol)


def test_bf16_sdpa_greedy_matches_float32_within_tolerance(peaked_dir, cpu_reference):
    gpu = HFLanguageModel(peaked_dir, device="cuda", attn_implementation="sdpa",
                          use_chat_template=False)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert gpu.model.dtype == expected  # the CUDA default
    assert gpu.model.config._attn_implementation == "sdpa"
    assert gpu.device.type == "cuda"
    want = cpu_reference.generate(PROMPTS, GREEDY)
    got = gpu.generate(PROMPTS, GREEDY)
    assert _ids(got) == _ids(want)
    # Statistics in float32 from bf16 logits: close to the float32 model's.
    _close(got, want, atol=0.15)
    rescored = gpu.score(PROMPTS, [list(g[0].token_ids) for g in want])
    for r, w in zip(rescored, want):
        np.testing.assert_allclose(r, w[0].token_logprobs, atol=0.15)


def test_own_decoding_loop_on_cuda_matches_generate_and_cpu(peaked_dir, cpu_reference):
    own = HFLanguageModel(peaked_dir, device="cuda", dtype="float32", decoding="confroute",
                          use_chat_template=False)
    hf = HFLanguageModel(own.model, own.tokenizer, decoding="transformers",
                         use_chat_template=False)
    assert hf.device == own.device and own.device.type == "cuda"
    _close(own.generate(PROMPTS, GREEDY), hf.generate(PROMPTS, GREEDY), atol=1e-3)
    _close(own.generate(PROMPTS, GREEDY), cpu_reference.generate(PROMPTS, GREEDY), atol=1e-3)
    # Seeded samples: reproducible, and (own loop) the same as on CPU.
    first = own.generate(PROMPTS, SAMPLING)
    assert _ids(first) == _ids(own.generate(PROMPTS, SAMPLING))
    _close(first, cpu_reference.generate(PROMPTS, SAMPLING), atol=1e-3)
    multi = own.generate_multi(PROMPTS, [GREEDY, SAMPLING])
    assert _ids(multi[0]) == _ids(own.generate(PROMPTS, GREEDY))


def test_device_map_auto_load(peaked_dir, cpu_reference):
    auto = HFLanguageModel(peaked_dir, device_map="auto", dtype="float32",
                           use_chat_template=False)
    assert auto.device.type == "cuda"
    _close(auto.generate(PROMPTS, GREEDY), cpu_reference.generate(PROMPTS, GREEDY), atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_sharded_over_two_gpus_own_loop_equals_generate(peaked_dir, cpu_reference):
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "model.rotary_emb": 1, "lm_head": 0}
    sharded = HFLanguageModel(peaked_dir, device_map=device_map, dtype="float32",
                              decoding="confroute", use_chat_template=False)
    assert sharded.device == torch.device("cuda", 0)
    assert {p.device for p in sharded.model.parameters()} == {
        torch.device("cuda", 0), torch.device("cuda", 1)}
    plain = HFLanguageModel(sharded.model, sharded.tokenizer, decoding="transformers",
                            use_chat_template=False)
    _close(sharded.generate(PROMPTS, SAMPLING), cpu_reference.generate(PROMPTS, SAMPLING),
           atol=1e-3)
    _close(sharded.generate(PROMPTS, GREEDY), plain.generate(PROMPTS, GREEDY), atol=1e-3)


def test_pre_placed_gpu_model_is_not_moved(tiny_llama):
    model = copy.deepcopy(tiny_llama[0]).to("cuda")
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    hf = HFLanguageModel(model, tiny_llama[1], use_chat_template=False)
    hf.generate(PROMPTS, SAMPLING)
    assert hf.device.type == "cuda" and hf.model is model
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
