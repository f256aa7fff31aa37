"""Tiny real models built in-process for tests: a BPE tokenizer trained on a few
lines, and randomly initialised Llama / GPT-2 causal LMs and a BERT-style
sequence classifier. Everything runs the real transformers code paths."""

from __future__ import annotations

import functools
from pathlib import Path

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome.",
    "Two plus two is four. 2 + 2 = 4.",
    "What is the answer? The answer is 42.",
    "I am confident: 90. Confidence: 75%",
    "Question: who wrote Hamlet? Answer: William Shakespeare.",
    "A B C D yes no maybe true false 0 1 2 3 4 5 6 7 8 9 #### 10",
    "user assistant system hello world, this is a tiny model!",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def _tokenizer_json(vocab_size: int = 300) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>",
                        "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tokenizer(chat: bool = True, padding_side: str = "left"):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side=padding_side,
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_causal_lm(arch: str = "llama", seed: int = 0, vocab_size: int | None = None):
    """A randomly initialised causal LM with about 50k parameters."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = make_tokenizer()
    v = vocab_size or len(tok)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model, tok


def save_causal_lm(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    model, tok = make_causal_lm(arch, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_nli_model(path: Path, seed: int = 0) -> Path:
    """A tiny BERT sequence classifier with NLI label names, saved to ``path``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(chat=False, padding_side="right")
    tok.cls_token = "<s>"
    tok.sep_token = "</s>"
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        num_labels=3,
        id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
        label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2},
    )
    model = BertForSequenceClassification(cfg)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def split_router(edge, prompts, cloud=None, policy="threshold", **router_kwargs):
    """A Router over ``edge`` calibrated so that it keeps the more confident half of
    ``prompts`` and escalates the other half.

    The labels are chosen from the edge model's own scores (1 for the half with the
    lowest sequence_logprob uncertainty), so the isotonic calibrator maps the
    confident half to p_good 1 and the rest to 0. Returns (router, kept, escalated).
    """
    import numpy as np

    from confroute.router import Router

    router = Router("sequence_logprob", "isotonic", policy, edge=edge, cloud=cloud,
                    edge_max_new_tokens=4, **router_kwargs)
    router.calibrate(prompts, [i % 2 for i in range(len(prompts))])
    scores = np.array([d.scores["sequence_logprob"] for d in router.route(prompts)])
    labels = (scores <= np.median(scores)).astype(int)
    router.calibrate(prompts, labels)
    decisions = router.route(prompts)
    kept = [p for p, d in zip(prompts, decisions) if d.source == "edge"]
    escalated = [p for p, d in zip(prompts, decisions) if d.source == "cloud"]
    return router, kept, escalated
