"""Per-query routing latency of the predictive (query-only) routers, embedding included.

Each router is trained on recorded MMLU accuracy labels (Mixtral-8x22B weak vs
GPT-4-0613 strong, HELM predictions joined to MMLU-Redux questions), then every
test question is routed **one at a time** (batch size 1) through
:class:`~confroute.predictive.QueryRouterEstimator` with the default MiniLM
embedder and no embedding cache, so each timing covers tokenisation, the
encoder forward pass and the router. p50 and p99 over the queries are printed.

Run::

    python benchmarks/bench_predictive_latency.py --data-dir ../shared/data --n-queries 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WEAK = "mistralai_mixtral-8x22b"
STRONG = "openai_gpt-4-0613"


def make_routers(seed: int = 0) -> dict[str, Any]:
    """The four query routers with the fixed (untuned) settings used in the comparison."""
    from confroute.predictive import (
        KNNRouter,
        MatrixFactorizationRouter,
        MLPRouter,
        SWRankingRouter,
    )

    return {
        "sw": SWRankingRouter(),
        "mf": MatrixFactorizationRouter(seed=seed),
        "mlp": MLPRouter(seed=seed),
        "knn": KNNRouter(k=10),
    }


def measure_latency(
    routers: Mapping[str, Any], texts: Sequence[str], embedder: Any, *, warmup: int = 5,
    progress: bool = True, threads: int | None = 1,
) -> dict[str, dict[str, float]]:
    """p50/p99/mean milliseconds per query (batch size 1, embedding included).

    One query at a time gains nothing from intra-op parallelism, and on a shared,
    loaded CPU several torch threads wait on each other, so the encoder runs on
    ``threads`` torch threads (None leaves torch's setting alone).

    Parameters
    ----------
    routers : mapping of name to fitted QueryRouter
    texts : sequence of str
        Queries, each routed alone.
    embedder : TextEncoder
        The encoder (no cache in front of it, so every query is embedded).

    Returns
    -------
    dict
        ``{name: {"p50_ms", "p99_ms", "mean_ms", "n"}}``.
    """
    import torch
    from tqdm.auto import tqdm

    from confroute.predictive import QueryEmbedder, QueryRouterEstimator

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    out: dict[str, dict[str, float]] = {}
    for name, router in routers.items():
        est = QueryRouterEstimator(router, embedder=QueryEmbedder(embedder))
        for t in texts[:warmup]:
            est.estimate([t])
        times = []
        for t in tqdm(texts, desc=f"latency {name}", unit="query", disable=not progress):
            t0 = time.perf_counter()
            est.estimate([t])
            times.append((time.perf_counter() - t0) * 1000.0)
        arr = np.asarray(times)
        out[name] = {"p50_ms": float(np.percentile(arr, 50)),
                     "p99_ms": float(np.percentile(arr, 99)),
                     "mean_ms": float(arr.mean()), "n": len(arr),
                     "torch_threads": torch.get_num_threads()}
    torch.set_num_threads(before)
    return out


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


def latency_table(lat: Mapping[str, Mapping[str, float]]) -> str:
    lines = ["| router | p50 (ms) | p99 (ms) | mean (ms) | queries |", "|---|---|---|---|---|"]
    for name, m in lat.items():
        lines.append(f"| {name} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['mean_ms']:.1f} | "
                     f"{int(m['n'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--n-queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="runs/predictive/emb.sqlite",
                    help="embedding cache for training only (timed queries bypass it)")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)

    from confroute.evaluation.datasets import load_helm_combined, split
    from confroute.models.embedded import load_default_embedder
    from confroute.predictive import QueryEmbedder, accuracy_labels

    d = args.data_dir
    ex = load_helm_combined(f"{d}/mmlu_redux/helm_combined", f"{d}/mmlu_redux/questions",
                            models=[WEAK, STRONG])
    ex = [e for e in ex if WEAK in e.recorded and STRONG in e.recorded]
    train, test = split(ex, 0.7, seed=args.seed)
    y = accuracy_labels([e.recorded[STRONG] in e.gold for e in train],
                        [e.recorded[WEAK] in e.gold for e in train])
    enc = load_default_embedder()
    X = QueryEmbedder(enc, cache_path=args.cache).encode([str(e.meta["question"]) for e in train])
    routers = {k: r.fit(X, y) for k, r in make_routers(args.seed).items()}
    texts = [str(e.meta["question"]) for e in test[: args.n_queries]]
    lat = measure_latency(routers, texts, enc)
    print(f"n_train={len(train)}, machine={machine()}")
    print(latency_table(lat))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"n_train": len(train), "machine": machine(), "latency": lat}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
