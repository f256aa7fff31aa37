"""Bench L (probe costs) runs on a tiny in-test model and reports its three ratios."""

from __future__ import annotations

import math

from confroute.models import HFLanguageModel
from tests.tiny_models import make_causal_lm

WORDS = ["apple", "river", "stone", "cloud", "paris", "seven", "green", "music", "table",
         "horse", "light", "north", "winter", "bread", "glass", "money"]


def test_bench_l_measures_every_ratio_side_by_side() -> None:
    from benchmarks.probes import measure_probe_costs

    model, tok = make_causal_lm("llama", seed=0)
    lm = HFLanguageModel(model, tok, device="cpu", use_chat_template=False)
    prompts = [f"tell me {i} about the {WORDS[i % 16]} {WORDS[(i * 7) % 16]}"
               for i in range(24)]
    rows = measure_probe_costs(lm, prompts[:16], prompts[16:20], repeats=2, layer=1,
                               max_new_tokens=4)
    assert [r.name for r in rows] == [
        "greedy answer", "greedy + HiddenStateProbe / greedy", "PromptProbe decision / greedy",
        "SemanticEntropyProbe / greedy"]
    assert [r.target for r in rows] == ["", "<= 1.05", "<= 0.2", "<= 1.05"]
    for r in rows:
        assert len(r.values) == 2 and all(math.isfinite(v) and v > 0 for v in r.values)
