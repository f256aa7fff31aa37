"""B5: end to end ``Router.route`` on the embedded model, per estimator, batch sizes 1
and 16: queries per second, p50/p99 latency, and the router's own overhead over the
estimator alone (both on the same precomputed generations, so no decoding noise)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from benchmarks._common import MAX_NEW_TOKENS, Context, Row, interleave


def _estimators(ctx: Context) -> dict[str, Any]:
    from confroute.estimators import (
        EmbeddingEquivalence,
        MeanTokenEntropy,
        SemanticEntropy,
        SequenceLogProb,
    )

    return {
        "sequence_logprob": SequenceLogProb(MAX_NEW_TOKENS),
        "mean_token_entropy": MeanTokenEntropy(MAX_NEW_TOKENS),
        "semantic_entropy": SemanticEntropy(
            n_samples=10, max_new_tokens=MAX_NEW_TOKENS, seed=0,
            equivalence=EmbeddingEquivalence(embedder=ctx.embedder()),
        ),
    }


def run(ctx: Context) -> list[Row]:
    from confroute import Router
    from confroute.estimators import estimate_many

    edge = ctx.edge()
    batch16 = ctx.prompts(16, offset=200)
    rows: list[Row] = []
    for name, est in _estimators(ctx).items():
        router = Router(est, "isotonic", "threshold", edge=edge,
                        edge_max_new_tokens=MAX_NEW_TOKENS)
        samples = estimate_many([est], batch16, edge)[est.name].samples
        labels = np.arange(len(batch16)) % 2
        router.calibrate(batch16, labels, samples=samples)

        # Latency and throughput, with generation (the deployed path).
        sizes = (1, 16) if name != "semantic_entropy" else (1,)
        for bs in sizes:
            prompts = batch16[:bs] if bs > 1 else batch16[:1]
            lat: list[float] = []
            reps = ctx.repeats if bs == 1 else max(1, ctx.repeats - 1)
            for _ in range(reps):
                t0 = time.perf_counter()
                router.route(prompts)
                dt = time.perf_counter() - t0
                lat.append(dt)
            rows.append(Row("B5", f"{name}, batch {bs}: queries/s",
                            [bs / t for t in lat], "q/s"))
            if bs == 1:
                rows.append(Row("B5", f"{name}, batch 1: latency p50 / p99",
                                [float(np.percentile(lat, 50)), float(np.percentile(lat, 99))],
                                "s", note=f"{len(lat)} requests (p99 ~ max)"))

        # Overhead of the router over the estimator alone, same precomputed samples.
        def alone(s: Any = samples, est: Any = est) -> None:
            estimate_many([est], batch16, edge, samples=s)

        def routed(s: Any = samples, router: Any = router) -> None:
            router.route(batch16, samples=s)

        wall, _ = interleave({"alone": alone, "routed": routed}, max(5, ctx.repeats))
        over = [1000 * (r - a) / len(batch16) for r, a in zip(wall["routed"], wall["alone"])]
        rows.append(Row("B5", f"{name}: Router.route overhead per query", over, "ms",
                        note=f"median estimator-alone scoring "
                             f"{1000 * statistics.median(wall['alone']) / 16:.2f} ms/query")
                    .check("<=", 5.0))
    return rows
