"""Probe AUROC vs sequence log-prob on NQ-open with the embedded edge model (small).

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

import numpy as np
from sklearn.metrics import roc_auc_score

from confroute.estimators import HiddenStateProbe, PromptProbe, estimate_many
from confroute.estimators.logprob import SequenceLogProb
from confroute.evaluation.datasets import format_short_prompt
from confroute.grading import grade_contains
from confroute.models.base import SampleRequest, collect_samples
from confroute.models.embedded import load_default_edge_model


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
