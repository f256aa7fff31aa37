from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.tiny_models import make_causal_lm


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer) of a tiny random Llama."""
    return make_causal_lm("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return make_causal_lm("gpt2", seed=0)
