"""P: the speed options of ``HFLanguageModel``, each against its plain path, interleaved.

- shared prefill: N = 10 samples of one prompt with the prompt encoded once and its
  key/value cache copied to the 10 rows, vs the prompt encoded 10 times; on a short
  NQ prompt and on a long prompt (a few-shot context of GSM8K problems).
- length bucketing: greedy answers for a mix of short (NQ) and long (GSM8K) prompts
  with ``batch_size=4``, prompts sorted by length before batching vs input order.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks._common import (
    MAX_NEW_TOKENS,
    ROOT,
    Context,
    Row,
    interleave,
    nq_questions,
    ratios,
)


def _gsm8k(n: int) -> list[str]:
    out = []
    with open(ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["question"])
            if len(out) >= n:
                break
    return out


def _twin(edge: Any, **kwargs: Any) -> Any:
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(edge.model, edge.tokenizer, device="cpu",
                           system_prompt=edge.system_prompt, name=edge.name, **kwargs)


def run(ctx: Context) -> list[Row]:
    from confroute.types import GenerationConfig

    edge = ctx.edge()
    plain, shared = _twin(edge, shared_prefill=False), _twin(edge, shared_prefill=True)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.95,
                           top_k=50, n=10, seed=0)
    long_prompt = "\n\n".join(_gsm8k(6)) + "\n\nNow answer briefly: " + nq_questions(1)[0]
    rows: list[Row] = []
    for label, prompt in [("short", nq_questions(1)[0]), ("long", long_prompt)]:
        n_tok = len(edge._encode_prompts([prompt])[0])
        a = plain.generate([prompt], cfg)
        b = shared.generate([prompt], cfg)
        same = all(x.token_ids == y.token_ids for x, y in zip(a[0], b[0]))
        wall, _ = interleave({"plain": lambda p=prompt: plain.generate([p], cfg),
                              "shared": lambda p=prompt: shared.generate([p], cfg)},
                             ctx.repeats, warmup=0)
        rows.append(Row("P", f"shared prefill / plain, N=10, {label} prompt",
                        ratios(wall["shared"], wall["plain"]), "x",
                        note=f"{n_tok} prompt tokens; "
                             + ("same samples" if same else "samples differ")))

    mixed = [p for pair in zip(nq_questions(4, offset=300), _gsm8k(4)) for p in pair]
    greedy = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    ordered = _twin(edge, batch_size=4, bucket_by_length=False)
    bucketed = _twin(edge, batch_size=4, bucket_by_length=True)
    same = [s[0].token_ids for s in ordered.generate(mixed, greedy)] == [
        s[0].token_ids for s in bucketed.generate(mixed, greedy)]
    wall, _ = interleave({"ordered": lambda: ordered.generate(mixed, greedy),
                          "bucketed": lambda: bucketed.generate(mixed, greedy)},
                         ctx.repeats, warmup=0)
    rows.append(Row("P", "length buckets / input order, greedy, 8 mixed prompts, batch 4",
                    ratios(wall["bucketed"], wall["ordered"]), "x",
                    note="same answers" if same else "answers differ (padding changes "
                    "float rounding)"))
    return rows
