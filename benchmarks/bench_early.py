"""E: early escalation on NQ-open dev questions with the embedded edge model.

A router (SequenceLogProb with total NLL, isotonic, threshold) is calibrated on
NQ-open dev questions graded against their references ("contains"); on the first
``early_n`` dev questions (disjoint from the calibration ones) it routes once with
full greedy answers and once with :class:`confroute.early.EarlyEscalation`. Reported:
identical decisions, the share of edge decode steps saved per query (the batch-1
serving case: each stopped answer stops its own decoding), and wall time of
batch-1 routing on a few of the questions, interleaved.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from benchmarks._common import MAX_NEW_TOKENS, Context, Row, interleave, nq_rows, ratios

N_CALIBRATION = 100


def run(ctx: Context) -> list[Row]:
    from confroute import Router
    from confroute.early import EarlyEscalation
    from confroute.estimators import SequenceLogProb
    from confroute.policies import ThresholdPolicy

    edge = ctx.edge()
    n = int(ctx.extra.get("early_n", 100))
    test = nq_rows(n)
    cal = nq_rows(N_CALIBRATION, offset=n)
    est = SequenceLogProb(MAX_NEW_TOKENS, normalize=False)
    router = Router(est, "isotonic", ThresholdPolicy(), edge=edge,
                    edge_max_new_tokens=MAX_NEW_TOKENS)
    router.calibrate([r["question"] for r in cal], references=[r["answer"] for r in cal],
                     grader="contains")
    p_cal = router.calibrator.p_good(router.calibrator.X_thresholds_)
    prompts = [r["question"] for r in test]
    full_tokens = np.array([len(d_tokens) for d_tokens in _greedy_ids(router, prompts)])
    rows: list[Row] = []
    acc = router.calibration_["edge_accuracy"] if router.calibration_ else float("nan")
    # Thresholds spanning the calibrated range, so the cloud share varies.
    levels = sorted(set(np.round(np.quantile(p_cal, [0.25, 0.5, 0.75]), 4)))
    for tau in levels:
        router.policy = ThresholdPolicy(min_p_good=float(tau))
        full = router.route(prompts, samples=_samples(router, prompts))
        early = EarlyEscalation(router)
        samples = early.generate(prompts)
        stopped = router.route(prompts, samples=samples)
        same = [a.source for a in full] == [b.source for b in stopped]
        used = np.array([s.greedy.n_tokens for s in samples])
        cloud = sum(d.source == "cloud" for d in full)
        saved = 1.0 - used.sum() / full_tokens.sum()
        rows.append(Row(
            "E", f"min_p_good {tau:.3f}: edge decode steps saved", [100 * saved], "%",
            note=f"{cloud}/{n} escalated; {early.n_early_stopped_} stopped early; s*="
                 f"{early.stop_score_:.2f}; decisions "
                 + ("identical" if same else "DIFFER"),
        ))
        rows.append(Row("E", f"min_p_good {tau:.3f}: identical decisions", [float(same)], ""))
    # Wall time, batch 1, the middle threshold, on questions that escalate.
    router.policy = ThresholdPolicy(min_p_good=float(levels[len(levels) // 2]))
    early = EarlyEscalation(router)
    sub = prompts[: max(2, ctx.n_prompts)]

    def full_route() -> None:
        for p in sub:
            router.route([p])

    def early_route() -> None:
        for p in sub:
            early.route([p])

    wall, _ = interleave({"full": full_route, "early": early_route}, ctx.repeats, warmup=0)
    rows.append(Row("E", "batch-1 route time, early / full", ratios(wall["early"], wall["full"]),
                    "x", note=f"{len(sub)} questions; median full "
                              f"{statistics.median(wall['full']) / len(sub):.2f} s/query"))
    rows.insert(0, Row("E", "edge accuracy on calibration questions", [acc], "",
                       note=f"{N_CALIBRATION} NQ-open dev questions, 'contains' grader"))
    return rows


def _samples(router: Any, prompts: list[str]) -> Any:
    cache = router.__dict__.setdefault("_bench_full_samples", {})
    key = tuple(prompts)
    if key not in cache:
        from confroute.estimators import estimate_many

        cache[key] = estimate_many(router.estimators, prompts, router.edge)[
            router.estimators[0].name].samples
    return cache[key]


def _greedy_ids(router: Any, prompts: list[str]) -> list[tuple[int, ...]]:
    return [s.greedy.token_ids for s in _samples(router, prompts)]
