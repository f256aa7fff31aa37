"""Probe costs (bench L of ``nox -s bench``) and a small probe-vs-logprob AUROC run.

``run(ctx)`` (bench **L**, via ``python -m benchmarks.run_all --only L``) times, side
by side and interleaved in one process, on the embedded edge model: the greedy
answer alone; the greedy answer with the hidden states captured in its decoding
passes plus a fitted HiddenStateProbe's score (goal <= 1.05x); the pre-generation
decision of a fitted PromptProbe, one prefill and nothing decoded (goal <= 0.2x);
and a fitted SemanticEntropyProbe, which at serving time reads only the greedy
answer's states (goal <= 1.05x). The probes are fitted on a few NQ-open dev
questions with labels from a median split of their log-prob (only their cost is
measured here; their quality is in docs/results.md).

``main()`` is the older small AUROC run:

Trains on the first ``--train`` questions of ``nq_open/dev.jsonl`` and reports on
the first ``--test`` of ``nq_open/efficientqa_dev.jsonl`` (never the test file),
graded by alias containment like every other row. One greedy pass per question
captures the answer's hidden states; the prompt probe reads one prefill. Data is
read from ``$CONFROUTE_DATA`` (default /work/shared/data) and never copied.

    python -m benchmarks.probes --train 200 --test 100
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks._common import MAX_NEW_TOKENS, Context, Row, interleave, ratios
from confroute.estimators import HiddenStateProbe, PromptProbe, estimate_many
from confroute.estimators.logprob import SequenceLogProb
from confroute.evaluation.datasets import format_short_prompt
from confroute.grading import grade_contains
from confroute.models.base import SampleRequest, collect_samples
from confroute.models.embedded import load_default_edge_model


def measure_probe_costs(edge: Any, fit_prompts: list[str], prompts: list[str], *,
                        repeats: int, layer: int = 22, max_new_tokens: int = 32) -> list[Row]:
    """Bench L rows: probe costs against the greedy answer, interleaved (A B C D ...)."""
    from confroute.estimators import SemanticEntropy, SemanticEntropyProbe
    from confroute.types import GenerationConfig, Samples

    used = collect_samples(edge, fit_prompts, [SampleRequest(True, max_new_tokens,
                                                             hidden_layers=(layer,))])
    lp = SequenceLogProb().estimate(fit_prompts, samples=used).scores
    y = (lp <= np.median(lp)).astype(int)  # cost only: any labels with both classes
    post = HiddenStateProbe((layer,), n_folds=3, max_new_tokens=max_new_tokens).fit(
        fit_prompts, used, y, edge)
    pre = PromptProbe((layer,), n_folds=3).fit(fit_prompts, used, y, edge)
    semantic = SemanticEntropy(n_samples=5, max_new_tokens=max_new_tokens, equivalence="exact",
                               variant="weighted", seed=0)
    sep = SemanticEntropyProbe((layer,), semantic=semantic, n_folds=3,
                               max_new_tokens=max_new_tokens).fit(fit_prompts, used, None, edge)
    plain = GenerationConfig(max_new_tokens=max_new_tokens)
    captured = GenerationConfig(max_new_tokens=max_new_tokens, hidden_layers=(layer,))

    def scored(probe: Any) -> Any:
        out = edge.generate(prompts, captured)
        return probe.estimate(prompts, edge, samples=[
            Samples(prompt=p, greedy=o[0]) for p, o in zip(prompts, out)])

    wall, _ = interleave({"greedy": lambda: edge.generate(prompts, plain),
                          "probe": lambda: scored(post), "prefill": lambda: pre.estimate(
                              prompts, edge), "se_probe": lambda: scored(sep)}, repeats)
    n = f"{len(prompts)} NQ questions per call, layer {layer}"
    return [
        Row("L", "greedy answer", [w / len(prompts) for w in wall["greedy"]], "s/query",
            note=n),
        Row("L", "greedy + HiddenStateProbe / greedy", ratios(wall["probe"], wall["greedy"]),
            "x", note="states captured in the decoding passes").check("<=", 1.05),
        Row("L", "PromptProbe decision / greedy", ratios(wall["prefill"], wall["greedy"]),
            "x", note="one prefill, nothing decoded").check("<=", 0.2),
        Row("L", "SemanticEntropyProbe / greedy", ratios(wall["se_probe"], wall["greedy"]),
            "x", note="no sampling at serving time").check("<=", 1.05),
    ]


def run(ctx: Context) -> list[Row]:
    """Bench L on the embedded edge model (``python -m benchmarks.run_all --only L``)."""
    return measure_probe_costs(ctx.edge(), ctx.prompts(24, offset=400),
                               ctx.prompts(max(ctx.n_prompts, 4)), repeats=ctx.repeats,
                               max_new_tokens=MAX_NEW_TOKENS)


def _load(path: Path, n: int) -> tuple[list[str], list[list[str]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [format_short_prompt(r["question"]) for r in rows], [r["answer"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 15, 22, 29])
    args = ap.parse_args()
    data = Path(os.environ.get("CONFROUTE_DATA", "/work/shared/data")) / "nq_open"
    edge = load_default_edge_model(device="cpu")
    layers = tuple(args.layers)
    out: dict[str, float] = {}
    sets = {"train": _load(data / "dev.jsonl", args.train),
            "test": _load(data / "efficientqa_dev.jsonl", args.test)}
    feats = {}
    for name, (prompts, refs) in sets.items():
        t0 = time.perf_counter()
        used = collect_samples(edge, prompts, [SampleRequest(True, 32, hidden_layers=layers)])
        out[f"{name}_greedy_s_per_q"] = (time.perf_counter() - t0) / len(prompts)
        y = np.array([grade_contains(s.greedy.text, r) for s, r in zip(used, refs)])  # type: ignore[union-attr]
        feats[name] = (prompts, used, y)
        out[f"{name}_accuracy"] = float(y.mean())
    prompts, used, y = feats["train"]
    post = HiddenStateProbe(layers=layers).fit(prompts, used, y, edge)
    pre = PromptProbe(layers=layers)
    t0 = time.perf_counter()
    used = pre.prepare_samples(list(used), edge)
    out["prefill_s_per_q"] = (time.perf_counter() - t0) / len(prompts)
    pre.fit(prompts, used, y, edge)
    tp, tu, ty = feats["test"]
    res = estimate_many([post, pre, SequenceLogProb()], tp, edge, samples=tu)
    for key, est in res.items():
        out[f"auroc_{key}"] = float(roc_auc_score(1 - ty, est.scores))
    out["post_layer"], out["pre_layer"] = post.layer_, pre.layer_
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
