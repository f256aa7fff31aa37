"""Predictive-routing commands of ``confroute``: ``label``, ``train-router``,
``calibrate-predictive``, ``two-stage`` and ``route-two-stage``.

Examples
--------
::

    # 1. preference labels from semantic entropy (resumable; --cache reuses generations)
    confroute label --weak embedded --strong /models/gemma-3-270m --data train.jsonl \\
        --out labels.jsonl --tau 0.1 --n-samples 5 --cache gen.sqlite
    # ... or from graded answers (rows need 'answers')
    confroute label --labels accuracy --weak embedded --strong openai:gpt-4o-mini \\
        --data train.jsonl --out labels.jsonl
    # 2. a query router on prompt embeddings (prints a held-out AUROC)
    confroute train-router --kind mf --labels labels.jsonl --out qrouter.json \\
        --cache emb.sqlite
    # 3a. a Router that decides before generation (usable by 'confroute route --router')
    confroute calibrate-predictive --query-router qrouter.json --data calib.jsonl \\
        --out router.json --max-cloud-fraction 0.3
    # 3b. or a two-stage router: the query router gates, a post-generation router decides
    confroute calibrate --data calib.jsonl --out post.json
    confroute two-stage --gate qrouter.json --router post.json --gate-share 0.2 \\
        --data calib.jsonl --out two_stage.json
    confroute route-two-stage --router two_stage.json --cloud openai:gpt-4o-mini "Who ..."
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confroute._serialization import write_atomic
from confroute.cli._common import (
    add_policy_options,
    build_policy,
    calibrate_and_save,
    id_split,
    load_model,
    parse_params,
    prompts_from,
    read_jsonl,
    references,
)
from confroute.errors import InvalidParameterError

__all__ = [
    "cmd_calibrate_predictive",
    "cmd_label",
    "cmd_route_two_stage",
    "cmd_train_router",
    "cmd_two_stage",
    "register",
]

_KINDS = ("sw", "mf", "mlp", "knn")


# --------------------------------------------------------------------------- helpers
def _ids(rows: Sequence[dict[str, Any]], path: str) -> list[str | int]:
    ids: list[str | int] = []
    for i, r in enumerate(rows):
        rid = r.get("id", i)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise InvalidParameterError(f"{path}: row {i} has an 'id' that is not a str or int.")
        ids.append(rid)
    if len(set(ids)) != len(ids):
        raise InvalidParameterError(f"{path}: the 'id' values must be unique.")
    return ids


def _model(spec: str, role: str, cache: Any) -> Any:
    model = load_model(spec, role=role)
    if cache is None:
        return model
    from confroute.cache import CachedModel

    return CachedModel(model, cache)


def _query_embedder(path: str | None, cache: str | None) -> Any:
    from confroute.predictive.embed import QueryEmbedder

    enc = None
    if path is not None:
        from confroute.models.embedded import Embedder

        enc = Embedder(path)
    return QueryEmbedder(enc, cache_path=cache)


# --------------------------------------------------------------------------- label
def cmd_label(args: argparse.Namespace) -> int:
    """Entry point of ``confroute label``."""
    from confroute.predictive.labels import accuracy_label_file, make_se_labels, row_label

    rows = read_jsonl(args.data, args.limit)
    prompts = [r["prompt"] for r in rows]
    ids = _ids(rows, args.data)
    refs = None
    if args.labels == "accuracy":
        refs = references(rows, args.data, "; '--labels accuracy' grades each model's answer "
                          "against them.")
    cache = None
    if args.cache:
        from confroute.cache import GenerationCache

        cache = GenerationCache(args.cache)
    weak = _model(args.weak, "weak", cache)
    strong = _model(args.strong, "strong", cache)
    if refs is None:
        from confroute.estimators import SemanticEntropy

        est = SemanticEntropy(n_samples=args.n_samples, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens,
                              equivalence=args.equivalence, seed=args.seed)
        out = make_se_labels(prompts, ids, weak, strong, est, args.tau, args.out,
                             batch_size=args.batch_size, progress=True)
    else:
        out = accuracy_label_file(prompts, ids, refs, weak, strong, args.out,
                                  grader=args.grader, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size)
    counts = {k: 0 for k in ("strong", "weak", "tie")}
    for r in out:
        counts[row_label(r)] += 1
    print(f"wrote {args.out}: {len(out)} rows ({counts['strong']} strong wins, "
          f"{counts['weak']} weak wins, {counts['tie']} ties)")
    return 0


# --------------------------------------------------------------------------- train
def _router_class(kind: str, params: dict[str, Any]) -> Any:
    from confroute.predictive.routers import router_registry

    cls = router_registry.get_class(kind)
    try:
        cls(**params)
    except TypeError as exc:
        raise InvalidParameterError(
            f"The '--param' options do not fit the {kind!r} router: {exc}."
        ) from None
    return cls


def _held_out_auroc(p: np.ndarray, y_held: np.ndarray, n_held: int, seed: int) -> str:
    """One line on the held-out AUROC of strong vs weak wins (ties left out)."""
    from sklearn.metrics import roc_auc_score

    decisive = y_held != 0.5
    yd = (y_held[decisive] == 1.0).astype(int)
    if len(np.unique(yd)) == 2:
        return (f"held-out AUROC (strong vs weak wins, ties left out) "
                f"{roc_auc_score(yd, p[decisive]):.3f} on {len(yd)} rows ({n_held} held out, "
                f"seed {seed})")
    return (f"held-out AUROC undefined: the {n_held} held-out rows have "
            f"{len(yd)} decisive labels of one class only")


def cmd_train_router(args: argparse.Namespace) -> int:
    """Entry point of ``confroute train-router``."""
    from confroute.predictive.labels import label_credits, read_labels_jsonl, row_label
    from confroute.types import prompt_text

    rows = read_labels_jsonl(args.labels)
    if len(rows) < 2:
        raise InvalidParameterError(f"{args.labels}: need at least 2 label rows to train.")
    params = parse_params(args.param)
    cls = _router_class(args.kind, params)
    y = label_credits([row_label(r) for r in rows], "confroute train-router")
    held = id_split([r["id"] for r in rows], args.test_fraction, args.seed)
    if held.all() or not held.any():
        raise InvalidParameterError(
            f"The '--test-fraction' option left {int((~held).sum())} training and "
            f"{int(held.sum())} held-out rows; both must be non-empty."
        )
    emb = _query_embedder(args.embedder, args.cache)
    print(f"embedding {len(rows)} prompts with {emb.name}", file=sys.stderr)
    X = emb.encode([prompt_text(r["prompt"]) for r in rows])
    router = cls(**params).fit(X[~held], y[~held])
    print(_held_out_auroc(router.p_strong(X[held]), y[held], int(held.sum()), args.seed))
    if args.no_refit:
        final = router
        note = f"fitted on the {int((~held).sum())} training rows"
    else:
        final = cls(**params).fit(X, y)
        note = f"refitted on all {len(rows)} rows"
    final.save(args.out)
    print(f"saved {args.out}: {args.kind} router {note}")
    return 0


# --------------------------------------------------------------------------- build routers
def cmd_calibrate_predictive(args: argparse.Namespace) -> int:
    """Entry point of ``confroute calibrate-predictive``."""
    from confroute.predictive.routers import QueryRouter, QueryRouterEstimator
    from confroute.router import Router

    policy = build_policy(args, "confroute calibrate-predictive")
    path = str(Path(args.query_router).resolve())
    QueryRouter.load(path)  # fail early on a bad file
    rows = read_jsonl(args.data)
    est = QueryRouterEstimator(router=path)
    router = Router(est, args.calibrator, policy, edge=load_model(args.edge, role="edge"))
    cal = calibrate_and_save(router, rows, args.data, args.grader, args.out)
    print(f"saved {args.out}: pre-generation router on {path}; edge accuracy "
          f"{cal.get('edge_accuracy', float('nan')):.3f} on {cal.get('n')} prompts "
          "(use it with 'confroute route --router')")
    return 0


def cmd_two_stage(args: argparse.Namespace) -> int:
    """Entry point of ``confroute two-stage``."""
    from confroute.predictive.routers import QueryRouter
    from confroute.predictive.two_stage import TwoStageRouter
    from confroute.router import Router

    if (args.gate_threshold is None) == (args.gate_share is None):
        raise InvalidParameterError("Give exactly one of '--gate-threshold' or '--gate-share'.")
    gate = QueryRouter.load(args.gate)
    post = Router.load(args.router)
    emb = _query_embedder(args.embedder, args.cache)
    ts = TwoStageRouter(gate, post, gate_threshold=args.gate_threshold,
                        gate_share=args.gate_share, embedder=emb)
    if args.gate_share is not None:
        if not args.data:
            raise InvalidParameterError(
                "The '--gate-share' option needs '--data' (representative prompts) to choose "
                "the gate threshold."
            )
        rows = read_jsonl(args.data)
        ts.calibrate_gate([r["prompt"] for r in rows])
        lo, hi = ts.gate_share_interval_ or (float("nan"), float("nan"))
        print(f"gate threshold {ts.gate_threshold_:.4f}: stage-1 cloud share on new, similar "
              f"traffic in [{lo:.3f}, {hi:.3f}] (95%)")
    ts.save(args.out)
    print(f"saved {args.out}")
    return 0


def _two_stage_rows(ts: Any, prompts: list[Any], has_cloud: bool) -> list[dict[str, Any]]:
    if has_cloud:
        return [{"prompt": resp.decision.prompt, "source": resp.source, "answer": resp.text,
                 "p_good": resp.decision.p_good, "scores": dict(resp.decision.scores),
                 "reason": resp.decision.reason, "degraded": resp.degraded,
                 "error": resp.error} for resp in ts(prompts)]
    return [{"prompt": d.prompt, "source": d.source, "p_good": d.p_good,
             "scores": dict(d.scores), "edge_answer": d.edge_answer, "reason": d.reason}
            for d in ts.route(prompts)]


def cmd_route_two_stage(args: argparse.Namespace) -> int:
    """Entry point of ``confroute route-two-stage``."""
    from confroute.predictive.two_stage import TwoStageRouter

    rows = prompts_from(args)
    edge = load_model(args.edge, role="edge")
    cloud = load_model(args.cloud, role="cloud") if args.cloud else None
    emb = _query_embedder(args.embedder, args.cache) if args.embedder or args.cache else None
    ts = TwoStageRouter.load(args.router, edge=edge, cloud=cloud, embedder=emb)
    out = _two_stage_rows(ts, [r["prompt"] for r in rows], cloud is not None)
    for row, src in zip(out, rows):
        if "id" in src:
            row["id"] = src["id"]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    if args.output:
        write_atomic(args.output, lines, owner="confroute predictive route")
    else:
        sys.stdout.write(lines)
    print(json.dumps({"stats": ts.stats.as_dict()}), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser
def _register_label(sub: Any) -> None:
    lab = sub.add_parser(
        "label", help="preference labels (strong vs weak model) for training a query router",
        description="Sample the weak and strong models on the prompts of --data (JSONL with "
        "'prompt' or 'question', optional 'id') and write preference rows (model_a = strong). "
        "--labels se compares semantic entropies (Zhang et al. 2025: the model with lower SE "
        "wins when |(SE_strong - SE_weak) / SE_strong| > tau, else tie); --labels accuracy "
        "grades both greedy answers against the rows' 'answers'. Resumable: ids already in "
        "--out are skipped.",
    )
    lab.add_argument("--weak", required=True, help="weak (edge) model spec")
    lab.add_argument("--strong", required=True, help="strong (cloud) model spec")
    lab.add_argument("--data", required=True, help="JSONL prompts")
    lab.add_argument("--out", required=True, help="label rows (JSONL, appended)")
    lab.add_argument("--labels", choices=("se", "accuracy"), default="se")
    lab.add_argument("--tau", type=float, default=0.1, help="SE relative-difference threshold")
    lab.add_argument("--n-samples", type=int, default=5, help="samples per model for SE")
    lab.add_argument("--temperature", type=float, default=0.7, help="SE sampling temperature")
    lab.add_argument("--equivalence", default="embedding", help="embedding, nli or exact")
    lab.add_argument("--max-new-tokens", type=int, default=32)
    lab.add_argument("--seed", type=int, default=0, help="sampling seed")
    lab.add_argument("--grader", default="contains", help="for --labels accuracy")
    lab.add_argument("--limit", type=int, help="label only the first N rows")
    lab.add_argument("--batch-size", type=int, default=8)
    lab.add_argument("--cache", help="sqlite generation cache shared by both models")
    lab.set_defaults(func=cmd_label)


def _register_train_router(sub: Any) -> None:
    tr = sub.add_parser(
        "train-router", help="train a query router (sw, mf, mlp, knn) on preference labels",
        description="Embed the label rows' prompts, fit the router on a seeded 80%% split, "
        "print its AUROC on the held-out 20%% (strong vs weak wins), then refit on all rows "
        "and save it.",
    )
    tr.add_argument("--kind", required=True, choices=_KINDS)
    tr.add_argument("--labels", required=True, help="label rows (JSONL)")
    tr.add_argument("--out", required=True, help="where to save the router (JSON)")
    tr.add_argument("--embedder", help="local encoder folder (default: all-MiniLM-L6-v2)")
    tr.add_argument("--cache", help="sqlite embedding cache")
    tr.add_argument("--param", action="append", metavar="NAME=VALUE",
                    help="router parameter, e.g. k=10 or epochs=50 (repeatable)")
    tr.add_argument("--test-fraction", type=float, default=0.2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-refit", action="store_true",
                    help="save the router fitted on the training split only")
    tr.set_defaults(func=cmd_train_router)


def _register_calibrate_predictive(sub: Any) -> None:
    cp = sub.add_parser(
        "calibrate-predictive",
        help="calibrate a Router that decides with a query router before any generation",
        description="Build a Router whose estimator is the saved query router (default "
        "embedder), calibrate it on --data ('label' or 'answers' per row) and save it; "
        "'confroute route --router OUT' then generates edge answers only for kept prompts.",
    )
    cp.add_argument("--query-router", required=True, help="router saved by train-router")
    cp.add_argument("--data", required=True, help="labelled JSONL")
    cp.add_argument("--out", required=True)
    cp.add_argument("--edge", default="embedded")
    cp.add_argument("--calibrator", default="isotonic")
    cp.add_argument("--grader", default="contains")
    add_policy_options(cp, risk_control=False)
    cp.set_defaults(func=cmd_calibrate_predictive)


def _register_two_stage(sub: Any) -> None:
    ts = sub.add_parser(
        "two-stage", help="combine a query-router gate and a calibrated Router",
        description="Stage 1: the gate escalates queries whose P(strong wins) exceeds a "
        "threshold, without running the edge model; stage 2: the saved post-generation "
        "router decides the rest.",
    )
    ts.add_argument("--gate", required=True, help="query router saved by train-router")
    ts.add_argument("--router", required=True, help="router saved by 'confroute calibrate'")
    ts.add_argument("--gate-threshold", type=float)
    ts.add_argument("--gate-share", type=float, help="target stage-1 cloud share")
    ts.add_argument("--data", help="representative prompts (JSONL) for --gate-share")
    ts.add_argument("--embedder", help="the gate's encoder folder (default: MiniLM)")
    ts.add_argument("--cache", help="sqlite embedding cache")
    ts.add_argument("--out", required=True)
    ts.set_defaults(func=cmd_two_stage)


def _register_route_two_stage(sub: Any) -> None:
    rt = sub.add_parser(
        "route-two-stage", help="route (and answer, with --cloud) with a two-stage router",
        description="Print one JSON line per prompt; per-stage cost accounting goes to stderr.",
    )
    rt.add_argument("prompts", nargs="*")
    rt.add_argument("--router", required=True, help="file saved by 'confroute two-stage'")
    rt.add_argument("--input", help="JSONL prompts")
    rt.add_argument("--output", help="write JSONL here")
    rt.add_argument("--edge", default="embedded")
    rt.add_argument("--cloud", help="cloud model spec; when given, escalated prompts are answered")
    rt.add_argument("--embedder", help="the gate's encoder folder, if not the default")
    rt.add_argument("--cache", help="sqlite embedding cache")
    rt.set_defaults(func=cmd_route_two_stage)


def register(sub: Any) -> None:
    """Add ``label``, ``train-router``, ``calibrate-predictive``, ``two-stage`` and
    ``route-two-stage`` to the ``confroute`` command."""
    _register_label(sub)
    _register_train_router(sub)
    _register_calibrate_predictive(sub)
    _register_two_stage(sub)
    _register_route_two_stage(sub)
