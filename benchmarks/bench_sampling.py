"""B2: N-sample estimators. One batched call vs N sequential calls vs one greedy answer,
and a whole semantic-entropy estimate (greedy + N samples + embedding clustering).

Batched calls use confroute's own decoding loop (the default); the same N = 10
batch through transformers' ``generate`` is measured alongside. The SE estimate is
measured on the first NQ-open dev question (interleaved repeats) and, one question
at a time, on the first 20 (each question once: greedy answer, then SE estimate).

B3 (embedding part): the clustering share of the SE estimate, and the number of
equivalence checks made against the N(N-1)/2 of an all-pairs comparison.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks._common import MAX_NEW_TOKENS, Context, Row, interleave, ratios, timed


def _cfg(n: int, seed: int = 0) -> Any:
    from confroute.types import GenerationConfig

    return GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.95,
                            top_k=50, n=n, seed=seed)


def run(ctx: Context) -> list[Row]:
    from confroute.estimators import EmbeddingEquivalence, SemanticEntropy
    from confroute.types import GenerationConfig

    edge = ctx.edge()
    prompt = ctx.prompts(1)
    greedy_cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    equiv = EmbeddingEquivalence(embedder=ctx.embedder())
    rows: list[Row] = []
    tokens: dict[str, int] = {}

    def count(name: str, out: list[list[Any]]) -> None:
        tokens[name] = sum(s.n_tokens for per in out for s in per)

    def greedy() -> None:
        count("greedy", edge.generate(prompt, greedy_cfg))

    hf_edge = ctx.extra.setdefault("edge:transformers", _transformers_twin(edge))

    def hf10() -> None:
        count("hf10", hf_edge.generate(prompt, _cfg(10)))

    def fused() -> None:
        outs = edge.generate_multi(prompt, [greedy_cfg, _cfg(10)])
        tokens["fused"] = sum(s.n_tokens for out in outs for per in out for s in per)

    variants: dict[str, Any] = {"greedy": greedy, "hf10": hf10, "fused": fused}
    for n in (5, 10):
        def batched(n: int = n) -> None:
            count(f"batched{n}", edge.generate(prompt, _cfg(n)))

        def sequential(n: int = n) -> None:
            out = [edge.generate(prompt, _cfg(1, seed=i))[0][0] for i in range(n)]
            tokens[f"sequential{n}"] = sum(s.n_tokens for s in out)

        variants[f"batched{n}"] = batched
        variants[f"sequential{n}"] = sequential

    se = SemanticEntropy(n_samples=10, max_new_tokens=MAX_NEW_TOKENS, equivalence=equiv, seed=0)

    def se_estimate() -> None:
        ctx.extra["se_estimate"] = se.estimate(prompt, edge)

    variants["se10"] = se_estimate
    wall, _ = interleave(variants, ctx.repeats, warmup=0)
    g = wall["greedy"]
    for n in (5, 10):
        b, s = wall[f"batched{n}"], wall[f"sequential{n}"]
        rows += [
            Row("B2", f"N={n}: batched / greedy", ratios(b, g), "x"),
            Row("B2", f"N={n}: sequential / batched", ratios(s, b), "x"),
            Row("B2", f"N={n}: batched tokens/s", [tokens[f"batched{n}"] / t for t in b],
                "tok/s"),
            Row("B2", f"N={n}: sequential tokens/s",
                [tokens[f"sequential{n}"] / t for t in s], "tok/s"),
        ]
    rows.append(Row("B2", "greedy tokens/s", [tokens["greedy"] / t for t in g], "tok/s",
                    note=f"{tokens['greedy']} tokens"))
    rows.append(Row("B2", "N=10 via transformers generate / greedy", ratios(wall["hf10"], g),
                    "x", note="the same batch through model.generate"))
    rows.append(Row("B2", "N=10 own loop / transformers generate",
                    ratios(wall["batched10"], wall["hf10"]), "x"))
    rows.append(Row("B2", "greedy + N=10 in one pass / greedy", ratios(wall["fused"], g), "x",
                    note=f"generate_multi, {tokens['fused']} tokens"))
    rows.append(Row("B2", "SE estimate N=10 (embedding) / greedy", ratios(wall["se10"], g),
                    "x", note="greedy + 10 samples + clustering").check("<=", 2.5))

    rows += _many_questions(ctx, edge, se, greedy_cfg)

    # B3, embedding backend: clustering time against the whole estimate, on the
    # samples of the last estimate (scoring again re-runs only the clustering).
    est = ctx.extra["se_estimate"]
    cluster_times = []
    for _ in range(ctx.repeats):
        cluster_times.append(timed(lambda: se.score_samples(est.samples))[0])
    share = [c / w for c, w in zip(cluster_times, wall["se10"])]
    n_checks = float(est.details["n_checks"][0])
    rows.append(Row("B3", "embedding clustering share of SE estimate", [100 * x for x in share],
                    "%", note=f"median clustering {statistics.median(cluster_times):.3f} s")
                .check("<=", 10.0))
    rows.append(Row("B3", "embedding checks made / N(N-1)/2", [n_checks / 45.0], "",
                    note=f"{n_checks:.0f} of 45 pairs; "
                         f"{int(est.details['n_clusters'][0])} clusters"))
    return rows


def _transformers_twin(edge: Any) -> Any:
    """The same loaded model, decoding with transformers' generate."""
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(edge.model, edge.tokenizer, device=edge.device,
                           decoding="transformers", name=edge.name)


def _many_questions(ctx: Context, edge: Any, se: Any, greedy_cfg: Any, n: int = 20) -> list[Row]:
    """SE estimate / greedy answer, one question at a time, over ``n`` questions."""
    greedy_s, se_s, lengths = [], [], []
    for q in ctx.prompts(n):
        t, out = timed(lambda q=q: edge.generate([q], greedy_cfg))
        greedy_s.append(t)
        lengths.append(out[0][0].n_tokens)
        se_s.append(timed(lambda q=q: se.estimate([q], edge))[0])
    per = ratios(se_s, greedy_s)
    return [
        Row("B2", f"SE estimate N=10 / greedy, {n} questions (per question)", per, "x",
            note=f"greedy answers of {min(lengths)}-{max(lengths)} tokens"),
        Row("B2", f"SE estimate N=10 / greedy, {n} questions (total time)",
            [sum(se_s) / sum(greedy_s)], "x", note="sum of SE times / sum of greedy times")
        .check("<=", 2.5),
    ]
