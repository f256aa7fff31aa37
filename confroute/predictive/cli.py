"""Predictive-routing commands of ``confroute`` (picked up by :mod:`confroute.cli`).

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
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confroute.errors import InvalidParameterError

__all__ = ["register_cli"]

_KINDS = ("sw", "mf", "mlp", "knn")


# --------------------------------------------------------------------------- helpers


def _rows(path: str, limit: int | None) -> list[dict[str, Any]]:
    from confroute.cli import _read_jsonl

    rows = _read_jsonl(path)
    if limit is not None:
        if limit < 1:
            raise InvalidParameterError(f"The '--limit' option must be >= 1. Got {limit}.")
        rows = rows[:limit]
    return rows


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


def _references(rows: Sequence[dict[str, Any]], path: str) -> list[list[str]]:
    refs = []
    for i, r in enumerate(rows):
        ans = r.get("answers", r.get("answer"))
        if ans is None:
            raise InvalidParameterError(
                f"{path}: row {i} has no 'answers' (or 'answer'); '--labels accuracy' grades "
                "each model's answer against them."
            )
        refs.append([ans] if isinstance(ans, str) else [str(a) for a in ans])
    return refs


def _model(spec: str, role: str, cache: Any) -> Any:
    from confroute.cli import load_model

    model = load_model(spec, role=role)
    if cache is None:
        return model
    from confroute.cache import CachedModel

    return CachedModel(model, cache)


def _split_mask(ids: Sequence[Any], fraction: float, seed: int) -> np.ndarray:
    """True for held-out rows: ``sha256(seed, id) < fraction`` (order-independent)."""
    out = np.zeros(len(ids), dtype=bool)
    for i, rid in enumerate(ids):
        digest = hashlib.sha256(f"{seed}\x00{rid}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64 < fraction
    return out


def _parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidParameterError(
                f"The '--param' option must look like NAME=VALUE (e.g. k=10). Got {item!r}."
            )
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


def _query_embedder(path: str | None, cache: str | None) -> Any:
    from confroute.predictive.embed import QueryEmbedder

    enc = None
    if path is not None:
        from confroute.models.embedded import Embedder

        enc = Embedder(path)
    return QueryEmbedder(enc, cache_path=cache)


# --------------------------------------------------------------------------- label


def cmd_label(args: argparse.Namespace) -> int:
    from confroute.predictive.labels import make_se_labels

    rows = _rows(args.data, args.limit)
    prompts = [r["prompt"] for r in rows]
    ids = _ids(rows, args.data)
    cache = None
    if args.cache:
        from confroute.cache import GenerationCache

        cache = GenerationCache(args.cache)
    weak = _model(args.weak, "weak", cache)
    strong = _model(args.strong, "strong", cache)
    if args.labels == "se":
        from confroute.estimators import SemanticEntropy

        est = SemanticEntropy(n_samples=args.n_samples, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens,
                              equivalence=args.equivalence, seed=args.seed)
        out = make_se_labels(prompts, ids, weak, strong, est, args.tau, args.out,
                             batch_size=args.batch_size, progress=True)
    else:
        out = accuracy_label_file(prompts, ids, _references(rows, args.data), weak, strong,
                                  args.out, grader=args.grader,
                                  max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size)
    from confroute.predictive.labels import row_label

    counts = {k: 0 for k in ("strong", "weak", "tie")}
    for r in out:
        counts[row_label(r)] += 1
    print(f"wrote {args.out}: {len(out)} rows ({counts['strong']} strong wins, "
          f"{counts['weak']} weak wins, {counts['tie']} ties)")
    return 0


def accuracy_label_file(
    prompts: Sequence[Any],
    ids: Sequence[str | int],
    references: Sequence[Sequence[str]],
    weak: Any,
    strong: Any,
    out_path: str | Path,
    *,
    grader: str = "contains",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy preference labels (greedy answers graded against references), resumable.

    Both models answer greedily; each answer is graded with ``grader``; the
    label is :func:`~confroute.predictive.labels.accuracy_labels` of the two
    grades. Rows are appended batch by batch and ids already in ``out_path``
    are skipped, as in :func:`~confroute.predictive.labels.make_se_labels`.

    Returns
    -------
    list of dict
        Every row now in ``out_path``.
    """
    from tqdm.auto import tqdm

    from confroute.grading import resolve_grader
    from confroute.predictive.labels import (
        accuracy_labels,
        preference_rows,
        read_labels_jsonl,
        write_labels_jsonl,
    )
    from confroute.types import GenerationConfig

    grade = resolve_grader(grader, "confroute label")
    strong_name, weak_name = str(strong.name), str(weak.name)
    p = Path(out_path)
    done: set[tuple[str, Any]] = set()
    if p.exists():
        for r in read_labels_jsonl(p, allow_truncated_tail=True):
            if (r["model_a"], r["model_b"]) != (strong_name, weak_name):
                raise InvalidParameterError(
                    f"The '--out' option points to labels made with model_a={r['model_a']!r}, "
                    f"model_b={r['model_b']!r}, not {strong_name!r} / {weak_name!r}; use "
                    "another file."
                )
            done.add((type(r["id"]).__name__, r["id"]))
    todo = [i for i, r in enumerate(ids) if (type(r).__name__, r) not in done]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    bar = tqdm(total=len(todo), desc="accuracy labels", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            batch = [prompts[i] for i in idx]
            ws = [o[0].text for o in weak.generate(batch, cfg)]
            ss = [o[0].text for o in strong.generate(batch, cfg)]
            cw = [grade(a, references[i]) >= 0.5 for a, i in zip(ws, idx)]
            cs = [grade(a, references[i]) >= 0.5 for a, i in zip(ss, idx)]
            labels = accuracy_labels(cs, cw)
            rows = preference_rows([ids[i] for i in idx], batch, labels,
                                   strong_name=strong_name, weak_name=weak_name)
            write_labels_jsonl(rows, p, append=True)
            bar.update(len(idx))
    finally:
        bar.close()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    return read_labels_jsonl(p)


# --------------------------------------------------------------------------- train


def cmd_train_router(args: argparse.Namespace) -> int:
    from confroute.evaluation.metrics import auroc
    from confroute.predictive.labels import label_credits, read_labels_jsonl, row_label
    from confroute.predictive.routers import router_registry
    from confroute.types import prompt_text

    rows = read_labels_jsonl(args.labels)
    if len(rows) < 2:
        raise InvalidParameterError(f"{args.labels}: need at least 2 label rows to train.")
    params = _parse_params(args.param)
    cls = router_registry.get_class(args.kind)
    try:
        cls(**params)
    except TypeError as exc:
        raise InvalidParameterError(
            f"The '--param' options do not fit the {args.kind!r} router: {exc}."
        ) from None
    labels = [row_label(r) for r in rows]
    y = label_credits(labels, "confroute train-router")
    texts = [prompt_text(r["prompt"]) for r in rows]
    emb = _query_embedder(args.embedder, args.cache)
    print(f"embedding {len(texts)} prompts with {emb.name}", file=sys.stderr)
    X = emb.encode(texts)
    held = _split_mask([r["id"] for r in rows], args.test_fraction, args.seed)
    if held.all() or not held.any():
        raise InvalidParameterError(
            f"The '--test-fraction' option left {int((~held).sum())} training and "
            f"{int(held.sum())} held-out rows; both must be non-empty."
        )
    router = cls(**params).fit(X[~held], y[~held])
    p = router.p_strong(X[held])
    decisive = held & (y != 0.5)
    yd = (y[decisive] == 1.0).astype(int)
    pd = p[(y[held] != 0.5)]
    if len(np.unique(yd)) == 2:
        msg = (f"held-out AUROC (strong vs weak wins, ties left out) {auroc(pd, yd):.3f} on "
               f"{len(yd)} rows ({int(held.sum())} held out, seed {args.seed})")
    else:
        msg = (f"held-out AUROC undefined: the {int(held.sum())} held-out rows have "
               f"{len(yd)} decisive labels of one class only")
    print(msg)
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


def _policy(args: argparse.Namespace) -> Any:
    from confroute.policies import BudgetPolicy, ThresholdPolicy

    if args.max_cloud_fraction is not None:
        return BudgetPolicy(max_cloud_fraction=args.max_cloud_fraction)
    return ThresholdPolicy(min_p_good=args.min_p_good)


def cmd_calibrate_predictive(args: argparse.Namespace) -> int:
    from confroute.cli import load_model
    from confroute.predictive.routers import QueryRouter, QueryRouterEstimator
    from confroute.router import Router

    path = str(Path(args.query_router).resolve())
    QueryRouter.load(path)  # fail early on a bad file
    rows = _rows(args.data, None)
    prompts = [r["prompt"] for r in rows]
    est = QueryRouterEstimator(router=path)
    router = Router(est, args.calibrator, _policy(args), edge=load_model(args.edge, role="edge"))
    if all("label" in r for r in rows):
        router.calibrate(prompts, [int(r["label"]) for r in rows])
    else:
        router.calibrate(prompts, references=_references(rows, args.data), grader=args.grader)
    router.save(args.out)
    cal = router.calibration_ or {}
    print(f"saved {args.out}: pre-generation router on {path}; edge accuracy "
          f"{cal.get('edge_accuracy', float('nan')):.3f} on {cal.get('n')} prompts "
          "(use it with 'confroute route --router')")
    return 0


def cmd_two_stage(args: argparse.Namespace) -> int:
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
        rows = _rows(args.data, None)
        ts.calibrate_gate([r["prompt"] for r in rows])
        lo, hi = ts.gate_share_interval_ or (float("nan"), float("nan"))
        print(f"gate threshold {ts.gate_threshold_:.4f}: stage-1 cloud share on new, similar "
              f"traffic in [{lo:.3f}, {hi:.3f}] (95%)")
    ts.save(args.out)
    print(f"saved {args.out}")
    return 0


def cmd_route_two_stage(args: argparse.Namespace) -> int:
    from confroute.cli import load_model
    from confroute.predictive.two_stage import TwoStageRouter

    if args.input:
        rows = _rows(args.input, None)
    elif args.prompts:
        rows = [{"prompt": p} for p in args.prompts]
    else:
        raise InvalidParameterError("Give prompts as arguments or a file with --input.")
    edge = load_model(args.edge, role="edge")
    cloud = load_model(args.cloud, role="cloud") if args.cloud else None
    emb = None
    if args.embedder:
        emb = _query_embedder(args.embedder, args.cache)
    elif args.cache:
        emb = _query_embedder(None, args.cache)
    ts = TwoStageRouter.load(args.router, edge=edge, cloud=cloud, embedder=emb)
    prompts = [r["prompt"] for r in rows]
    out: list[dict[str, Any]] = []
    if cloud is not None:
        for resp in ts(prompts):
            d = resp.decision
            out.append({"prompt": d.prompt, "source": resp.source, "answer": resp.text,
                        "p_good": d.p_good, "scores": dict(d.scores), "reason": d.reason,
                        "degraded": resp.degraded, "error": resp.error})
    else:
        for d in ts.route(prompts):
            out.append({"prompt": d.prompt, "source": d.source, "p_good": d.p_good,
                        "scores": dict(d.scores), "edge_answer": d.edge_answer,
                        "reason": d.reason})
    for row, src in zip(out, rows):
        if "id" in src:
            row["id"] = src["id"]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    print(json.dumps({"stats": ts.stats.as_dict()}), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser


def register_cli(sub: Any) -> None:
    """Add ``label``, ``train-router``, ``calibrate-predictive``, ``two-stage`` and
    ``route-two-stage`` to the ``confroute`` command."""
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
    g = cp.add_mutually_exclusive_group()
    g.add_argument("--min-p-good", type=float, default=0.5)
    g.add_argument("--max-cloud-fraction", type=float)
    cp.set_defaults(func=cmd_calibrate_predictive)

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
