"""A fitted probe is refused on a model of another hidden size or architecture."""

from __future__ import annotations

import numpy as np
import pytest

from confroute.errors import InvalidParameterError
from confroute.estimators import HiddenStateProbe, PromptProbe
from confroute.models import HFLanguageModel
from tests.tiny_models import make_causal_lm, make_tokenizer

WORDS = ["apple", "river", "stone", "cloud", "paris", "seven", "green", "music"]
PROMPTS = [f"tell me {i} about the {WORDS[i % 8]} {WORDS[(i * 3) % 8]}" for i in range(24)]
LABELS = np.array([i % 2 for i in range(24)])


def _wide_llama() -> HFLanguageModel:
    """The tiny llama, but 48 wide (same architecture name, other hidden size)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return HFLanguageModel(model, tok, device="cpu", use_chat_template=False)


def _tiny(arch: str) -> HFLanguageModel:
    model, tok = make_causal_lm(arch, seed=0)
    return HFLanguageModel(model, tok, device="cpu", use_chat_template=False)


@pytest.mark.parametrize("other", ["wider llama", "gpt2"])
@pytest.mark.parametrize("kind", [HiddenStateProbe, PromptProbe])
def test_probe_is_refused_on_another_model(kind: type, other: str) -> None:
    lm = _tiny("llama")
    probe = (kind(layers=(1,), n_folds=3, max_new_tokens=3) if kind is HiddenStateProbe
             else kind(layers=(1,), n_folds=3)).fit(PROMPTS, labels=LABELS, model=lm)
    assert probe.signature_ == {**lm.architecture(), **probe.signature_}
    assert np.isfinite(probe.estimate(PROMPTS[:2], lm).scores).all()  # its own model: fine
    target = _wide_llama() if other == "wider llama" else _tiny("gpt2")
    got = target.architecture()
    with pytest.raises(InvalidParameterError, match=(
            rf"'model' parameter of {kind.__name__}.*hidden size 32.*Got "
            rf"{got['architecture']} with hidden size {got['hidden_size']}")):
        probe.estimate(PROMPTS[:2], target)
