"""B1: greedy answer + token-statistic estimators vs plain ``model.generate``.

Both variants template and tokenize the prompt, decode the same greedy tokens and
detokenize the answer, one prompt per call (the per-query routing case). The
confroute variant goes through ``HFLanguageModel.generate`` (raw logits kept,
per-token log-probabilities and entropies computed) and scores MeanTokenEntropy and
SequenceLogProb from the one shared generation with ``estimate_many``.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import MAX_NEW_TOKENS, Context, Row, interleave, ratios


def _eos(edge: Any) -> list[int]:
    """The end-of-sequence ids HFLanguageModel stops at: generation config + tokenizer."""
    gen = getattr(edge.model.generation_config, "eos_token_id", None)
    ids = set(gen if isinstance(gen, (list, tuple)) else [] if gen is None else [gen])
    if edge.tokenizer.eos_token_id is not None:
        ids.add(edge.tokenizer.eos_token_id)
    return sorted(int(i) for i in ids)


def _plain_generate(edge: Any, ids: list[int]) -> list[int]:
    import torch

    from confroute.models._decode import left_pad

    pad = int(edge.tokenizer.pad_token_id)
    input_ids, mask = (t.to(edge.device) for t in left_pad([ids], pad))
    with torch.inference_mode():
        out = edge.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False, pad_token_id=pad,
            eos_token_id=_eos(edge), repetition_penalty=1.0, no_repeat_ngram_size=0,
            min_length=0,
        )
    return [int(t) for t in out[0, input_ids.shape[1]:].tolist()]


def run(ctx: Context) -> list[Row]:
    from confroute.estimators import MeanTokenEntropy, SequenceLogProb, estimate_many

    edge = ctx.edge()
    prompts = ctx.prompts()
    encoded = edge._encode_prompts(prompts)
    estimators = [MeanTokenEntropy(MAX_NEW_TOKENS), SequenceLogProb(MAX_NEW_TOKENS)]

    # Same tokens on both paths (checked once, outside the timing).
    ours = estimate_many(estimators, prompts, edge)
    first = next(iter(ours.values()))
    same = all(
        list(s.greedy.token_ids) == _trim_eos(edge, _plain_generate(edge, ids))
        for s, ids in zip(first.samples, encoded) if s.greedy is not None
    )
    n_tokens = sum(s.greedy.n_tokens for s in first.samples if s.greedy is not None)

    def plain() -> None:
        # What a plain transformers user does too: template, tokenize, generate, decode.
        for p in prompts:
            ids = edge._encode_prompts([p])[0]
            edge.tokenizer.decode(_plain_generate(edge, ids), skip_special_tokens=True)

    def confroute() -> None:
        for p in prompts:
            estimate_many(estimators, [p], edge)

    wall, cpu = interleave({"plain": plain, "confroute": confroute}, ctx.repeats, warmup=0)
    note = f"{len(prompts)} prompts x {MAX_NEW_TOKENS} new tokens, {n_tokens} tokens"
    return [
        Row("B1", "greedy+MTE+SLP / plain generate (wall)", ratios(wall["confroute"],
            wall["plain"]), "x", note=note + ("; same tokens" if same else "; TOKENS DIFFER"))
        .check("<=", 1.02),
        Row("B1", "greedy+MTE+SLP / plain generate (CPU time)",
            ratios(cpu["confroute"], cpu["plain"]), "x"),
        Row("B1", "plain generate, s per prompt", [t / len(prompts) for t in wall["plain"]],
            "s"),
        Row("B1", "greedy+estimators, s per prompt",
            [t / len(prompts) for t in wall["confroute"]], "s"),
    ]


def _trim_eos(edge: Any, ids: list[int]) -> list[int]:
    eos = set(_eos(edge))
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids
