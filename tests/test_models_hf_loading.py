"""HFLanguageModel loading models as users load them: from_pretrained arguments,
pre-placed objects, unavailable devices, hub ids offline, quantisation, offload.

Every model is a tiny real one (tests/tiny_models.py) loaded by the real
transformers / accelerate / bitsandbytes code."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from confroute.errors import (
    InvalidParameterError,
    InvalidTypeError,
    MissingDependencyError,
    ModelLoadError,
)
from confroute.models import _decode
from confroute.models.device import check_available, input_device
from confroute.models.hf import HFLanguageModel
from confroute.types import GenerationConfig
from tests.tiny_models import make_causal_lm, make_tokenizer, save_causal_lm

PROMPTS = ["The capital of France is", "Two plus two", "hello"]
GREEDY = GenerationConfig(max_new_tokens=6)
SAMPLING = GenerationConfig(max_new_tokens=6, temperature=1.0, n=3, seed=5)
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_causal_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


@pytest.fixture(scope="module")
def reference(model_dir) -> HFLanguageModel:
    return HFLanguageModel(model_dir, device="cpu", use_chat_template=False)


def _tokens(lm: HFLanguageModel, cfg: GenerationConfig) -> list[list[tuple[int, ...]]]:
    return [[s.token_ids for s in group] for group in lm.generate(PROMPTS, cfg)]


def _assert_same(a: HFLanguageModel, b: HFLanguageModel) -> None:
    for cfg in (GREEDY, SAMPLING):
        got, want = a.generate(PROMPTS, cfg), b.generate(PROMPTS, cfg)
        for g_group, w_group in zip(got, want):
            for g, w in zip(g_group, w_group):
                assert g.token_ids == w.token_ids
                np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=1e-4)
                np.testing.assert_allclose(g.token_entropies, w.token_entropies, atol=1e-4)


# ------------------------------------------------------------------ device_map


def test_device_map_cpu_loads_and_generates_like_a_plain_load(model_dir, reference):
    mapped = HFLanguageModel(model_dir, device_map={"": "cpu"}, use_chat_template=False)
    assert mapped.device == torch.device("cpu")
    assert mapped.model.dtype == torch.float32  # the CPU default
    assert mapped.from_pretrained_kwargs == {"device_map": {"": "cpu"}}
    _assert_same(mapped, reference)


def test_offloaded_map_decodes_with_inputs_on_the_first_real_device(
    model_dir, reference, tmp_path
):
    # The (tied) input embeddings live on disk, their weight on the meta device: inputs
    # must still go to where the embedding layer runs, and the own loop must agree
    # with a plain load.
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "disk"}
    offloaded = HFLanguageModel(model_dir, device_map=device_map, use_chat_template=False,
                                offload_folder=str(tmp_path / "offload"),
                                decoding="confroute")
    assert offloaded.model.get_input_embeddings().weight.device.type == "meta"
    assert offloaded.device == torch.device("cpu") == input_device(offloaded.model)
    _assert_same(offloaded, reference)


def test_attn_implementation_and_dtype_pass_through(model_dir):
    eager = HFLanguageModel(model_dir, attn_implementation="eager", dtype="float64")
    assert eager.model.config._attn_implementation == "eager"
    assert eager.model.dtype == torch.float64
    sdpa = HFLanguageModel(model_dir, attn_implementation="sdpa")
    assert sdpa.model.config._attn_implementation == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(MissingDependencyError, match="FlashAttention2"):
            HFLanguageModel(model_dir, attn_implementation="flash_attention_2")


def test_trust_remote_code_is_off_unless_set(model_dir, tmp_path):
    # A checkpoint that ships its own modeling code: it runs only when asked to.
    custom = Path(shutil.copytree(model_dir, tmp_path / "custom"))
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_llama.CustomLlama"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "custom_llama.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\n"
        "class CustomLlama(LlamaForCausalLM):\n    pass\n"
    )
    assert type(HFLanguageModel(custom).model).__name__ == "LlamaForCausalLM"
    trusted = HFLanguageModel(custom, trust_remote_code=True)
    assert type(trusted.model).__name__ == "CustomLlama"
    with pytest.raises(InvalidTypeError, match="'trust_remote_code' parameter"):
        HFLanguageModel(custom, trust_remote_code="yes")


# -------------------------------------------------------------- pre-placed model


def test_a_pre_placed_model_is_never_moved_or_cast():
    model, tok = make_causal_lm("llama", seed=1)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    hf = HFLanguageModel(model, tok, use_chat_template=False)  # device="auto"
    hf.generate(PROMPTS, SAMPLING)
    assert hf.model is model
    assert hf.device == torch.device("cpu")
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The same device named explicitly is fine; a cast would change the user's object.
    HFLanguageModel(model, tok, device="cpu")
    with pytest.raises(InvalidParameterError, match=r"'dtype' parameter.*never cast"):
        HFLanguageModel(model, tok, dtype="float64")
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before


def test_from_pretrained_arguments_are_refused_with_a_model_object(tiny_llama):
    with pytest.raises(InvalidParameterError, match=r"'device_map' parameter.*model object"):
        HFLanguageModel(*tiny_llama, device_map="auto")


# ------------------------------------------------------------ unavailable devices


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_on_a_cpu_only_torch_is_a_typed_error(model_dir, tiny_llama, device):
    match = r"'device' parameter of HFLanguageModel must be a device this machine has"
    with pytest.raises(InvalidParameterError, match=match):
        HFLanguageModel(model_dir, device=device)
    with pytest.raises(InvalidParameterError, match=match):
        HFLanguageModel(*tiny_llama, device=device)


@needs_no_cuda
@pytest.mark.parametrize("device_map", [{"": "cuda"}, {"": 0}, "cuda:0",
                                        {"model": "cpu", "lm_head": 1}])
def test_device_map_naming_a_missing_gpu_is_a_typed_error(model_dir, device_map):
    with pytest.raises(InvalidParameterError, match=r"'device_map.*must be a device this"):
        HFLanguageModel(model_dir, device_map=device_map)


def test_unavailable_mps_and_conflicting_device_arguments(model_dir, monkeypatch):
    from confroute.models import device as device_mod

    monkeypatch.setattr(device_mod, "mps_available", lambda: False)
    with pytest.raises(InvalidParameterError, match=r"'device'.*MPS is not available"):
        check_available(torch.device("mps"), "HFLanguageModel")
    with pytest.raises(InvalidParameterError, match=r"'device' parameter.*'auto' when "
                                                    "'device_map' is given"):
        HFLanguageModel(model_dir, device="cpu", device_map={"": "cpu"})
    with pytest.raises(InvalidParameterError, match="'device_map' parameter"):
        HFLanguageModel(model_dir, device_map="everywhere")
    with pytest.raises(InvalidParameterError, match=r"'torch_dtype'.*use 'dtype'"):
        HFLanguageModel(model_dir, torch_dtype=torch.float32)


# ------------------------------------------------------------------- hub ids


def _fake_hub_cache(root: Path, repo_id: str, model_dir: Path) -> None:
    """The layout huggingface_hub writes when it downloads ``repo_id``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_an_uncached_hub_id_offline_is_a_typed_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_id = "confroute-tests/no-such-model"
    with pytest.raises(ModelLoadError, match=rf"'{repo_id}'.*not in the local cache.*"
                                             rf"HF_HUB_OFFLINE=1.*hf download {repo_id}"):
        HFLanguageModel(repo_id, cache_dir=str(tmp_path))
    with pytest.raises(ModelLoadError, match=repr(repo_id)):
        HFLanguageModel(repo_id)  # the default cache
    with pytest.raises(ModelLoadError, match="no such directory"):
        HFLanguageModel(str(tmp_path / "missing" / "folder"))


def test_a_cached_hub_id_loads_offline_at_a_revision(model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(tmp_path, "confroute-tests/tiny-llama", model_dir)
    hf = HFLanguageModel("confroute-tests/tiny-llama", cache_dir=str(tmp_path),
                         revision="main", use_chat_template=False)
    assert hf.name == "confroute-tests/tiny-llama"
    assert _tokens(hf, GREEDY)  # tokenizer found in the same cache
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        HFLanguageModel("confroute-tests/tiny-llama", cache_dir=str(tmp_path),
                        revision="v9")


# ---------------------------------------------------------------- quantisation


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """A tiny Llama 64 wide: bitsandbytes' 4-bit CPU kernels need 64-element blocks."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("wide") / "llama64"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantised_load_on_cpu(wide_dir, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    quantised = HFLanguageModel(wide_dir, quantization_config=cfg, device_map={"": "cpu"},
                                use_chat_template=False)
    q_proj = quantised.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    # The own loop and transformers' generate agree on the quantised weights.
    plain = HFLanguageModel(quantised.model, quantised.tokenizer, use_chat_template=False,
                            decoding="transformers")
    own = HFLanguageModel(quantised.model, quantised.tokenizer, use_chat_template=False,
                          decoding="confroute")
    assert _tokens(own, GREEDY) == _tokens(plain, GREEDY)


def test_quantisation_without_bitsandbytes_is_a_clear_error(model_dir, monkeypatch):
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_8bit=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # injected: not installed
    with pytest.raises(MissingDependencyError, match=r"'quantization_config'.*"
                                                     r"confroute\[quantization\]"):
        HFLanguageModel(model_dir, quantization_config=cfg)
    with pytest.raises(InvalidTypeError, match="'quantization_config' parameter"):
        HFLanguageModel(model_dir, quantization_config="8bit")


# ------------------------------------------------------------- logged fallback


def test_fallback_to_generate_is_logged_once(reference, model_dir, monkeypatch, caplog):
    def unsupported(cache):
        raise _decode.UnsupportedModel("injected: no row selection")

    monkeypatch.setattr(_decode, "check_cache", unsupported)
    lm = HFLanguageModel(reference.model, reference.tokenizer, use_chat_template=False)
    with caplog.at_level(logging.WARNING, logger="confroute.models.hf"):
        lm.generate(PROMPTS, GREEDY)
        lm.generate(PROMPTS, GREEDY)
    logged = [r.getMessage() for r in caplog.records if "model.generate" in r.getMessage()]
    assert len(logged) == 1 and "injected: no row selection" in logged[0]
