"""``confroute evaluate`` and ``confroute evaluate-report`` (the library side is
:mod:`confroute.evaluation.harness` and :mod:`confroute.evaluation.report`).

Examples
--------
::

    confroute evaluate --dataset nq_open --path ../shared/data/nq_open/dev.jsonl \\
        --limit 200 --estimators all --cloud assume-correct --out runs/nq \\
        --cache runs/cache.sqlite
    confroute evaluate --dataset gsm8k_solutions \\
        --path ../shared/data/gsm8k/example_model_solutions.jsonl \\
        --edge recorded:6b_finetuning --cloud recorded:175b_finetuning --out runs/gsm8k
    confroute evaluate-report --data-dir ../shared/data --out runs/report \\
        --cache runs/cache.sqlite --results docs/results.md
    confroute evaluate-report --learned --n-train 40 --n-trivia-train 0 --n-test 40 --n-se 20
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from confroute.cli._common import load_model
from confroute.errors import InvalidParameterError
from confroute.evaluation.report import SUITE_DEFAULTS

__all__ = ["cmd_evaluate", "cmd_evaluate_report", "register"]

RECORDED = "recorded:"


def _edge_model(spec: str, cache_path: str | None) -> Any:
    """The edge model for a spec, loaded lazily (embedded) and wrapped in a cache when asked."""
    if spec == "embedded":
        from confroute.evaluation.report import embedded_edge_model

        return embedded_edge_model(cache_path)
    model = load_model(spec, role="edge")
    if cache_path is None:
        return model
    from confroute.cache import CachedModel, GenerationCache

    return CachedModel(model, GenerationCache(cache_path), model_id=str(model.name))


def _load_examples(args: argparse.Namespace) -> list[Any]:
    from confroute.evaluation.datasets import load_dataset
    from confroute.evaluation.harness import arithmetic_examples, subsample

    if args.dataset == "arithmetic":
        return arithmetic_examples(args.limit or 105, args.arith_seed)
    if not args.path:
        raise InvalidParameterError(f"--path is required for --dataset {args.dataset}.")
    exs = load_dataset(args.dataset, args.path)
    return subsample(exs, args.limit, seed=args.split_seed)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from confroute.evaluation.harness import ASSUME_CORRECT, evaluate, evaluate_pair

    examples = _load_examples(args)
    cloud = args.cloud
    if cloud != ASSUME_CORRECT and not cloud.startswith(RECORDED):
        raise InvalidParameterError(
            f"--cloud must be 'assume-correct' or 'recorded:MODEL'. Got {cloud!r}.")
    cloud_name = cloud[len(RECORDED):] if cloud.startswith(RECORDED) else cloud
    name = args.name or args.dataset
    if args.edge.startswith(RECORDED):
        if cloud == ASSUME_CORRECT:
            raise InvalidParameterError("A recorded edge needs --cloud recorded:MODEL.")
        report = evaluate_pair(examples, args.edge[len(RECORDED):], cloud_name,
                               grader=args.grader, n_boot=args.n_boot, dataset=name,
                               out_dir=args.out, plots=not args.no_plots)
    else:
        model = _edge_model(args.edge, args.cache)
        report = evaluate(
            examples, model, estimators=args.estimators, cloud=cloud_name,
            calibration_fraction=args.calibration_fraction, split_seed=args.split_seed,
            grader=args.grader, n_boot=args.n_boot, n_samples=args.n_samples,
            max_new_tokens=args.max_new_tokens, equivalence=args.equivalence,
            dataset=name, out_dir=args.out, plots=not args.no_plots,
        )
    print(f"wrote {Path(args.out) / 'report.json'} and report.md "
          f"({report['n']} questions, {report['wall_seconds']:.1f} s)")
    return 0


def cmd_evaluate_report(args: argparse.Namespace) -> int:
    from confroute.evaluation.report import run_results_suite

    if args.learned:
        from confroute.evaluation.report_learned_suite import run_learned_suite

        run_learned_suite(args.data_dir, args.out, args.cache, args.results,
                          n_train=args.n_train, n_trivia=args.n_trivia_train,
                          n_test=args.n_test, n_se=args.n_se, n_mc=args.n_mc,
                          layers=args.layers, max_new_tokens=args.max_new_tokens,
                          n_samples=args.n_samples, n_boot=args.n_boot, img=args.img)
        return 0
    run_results_suite(args.data_dir, args.out, args.cache, args.results, n_nq=args.n_nq,
                      n_trivia=args.n_trivia, n_arith=args.n_arith, n_samples=args.n_samples,
                      max_new_tokens=args.max_new_tokens, n_boot=args.n_boot)
    return 0


def register(sub: Any) -> None:
    """Add ``evaluate`` and ``evaluate-report`` to the ``confroute`` command."""
    e = sub.add_parser(
        "evaluate", help="evaluate estimators, calibration and routing on a dataset",
        description="Answer a dataset with the edge model (cached), score every estimator on "
        "one shared generation, calibrate on a split by id, and report AUROC, PRR, ECE, "
        "Brier, CPT, APGR with bootstrap intervals. With --edge recorded:A --cloud "
        "recorded:B, evaluate two recorded models (random and oracle routing).",
    )
    e.add_argument("--dataset", required=True,
                   help="nq_open, triviaqa, gsm8k, gsm8k_solutions, helm_mmlu, arc, "
                   "mmlu_redux, or arithmetic (generated)")
    e.add_argument("--path", help="dataset file or folder (not needed for arithmetic)")
    e.add_argument("--limit", type=int, help="seeded subsample of this many questions")
    e.add_argument("--split-seed", type=int, default=0)
    e.add_argument("--calibration-fraction", type=float, default=0.5)
    e.add_argument("--estimators", default="all", help="'all' or comma-separated names")
    e.add_argument("--edge", default="embedded",
                   help="edge model spec (as in 'confroute route') or recorded:MODEL")
    e.add_argument("--cloud", default="assume-correct", help="assume-correct or recorded:MODEL")
    e.add_argument("--grader", help="grader for every question (default: by question kind)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--cache", help="sqlite generation cache (resumable)")
    e.add_argument("--n-samples", type=int, default=5)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--equivalence", default="embedding", help="embedding, nli or exact")
    e.add_argument("--n-boot", type=int, default=1000)
    e.add_argument("--arith-seed", type=int, default=1)
    e.add_argument("--name", help="dataset name in the report")
    e.add_argument("--no-plots", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser(
        "evaluate-report", help="run the full evaluation suite and write docs/results.md",
        description="The evaluation behind docs/results.md (see docs/evaluation.md).",
    )
    r.add_argument("--data-dir", default="../shared/data")
    r.add_argument("--out", default="runs/report")
    r.add_argument("--cache", default="runs/cache.sqlite")
    r.add_argument("--results", default="docs/results.md")
    r.add_argument("--n-nq", type=int, default=SUITE_DEFAULTS["nq"])
    r.add_argument("--n-trivia", type=int, default=SUITE_DEFAULTS["trivia"])
    r.add_argument("--n-arith", type=int, default=SUITE_DEFAULTS["arith"])
    r.add_argument("--n-samples", type=int, default=SUITE_DEFAULTS["n_samples"])
    r.add_argument("--max-new-tokens", type=int, default=SUITE_DEFAULTS["max_new_tokens"])
    r.add_argument("--n-boot", type=int, default=1000)
    _learned_args(r)
    r.set_defaults(func=cmd_evaluate_report)


def _learned_args(r: Any) -> None:
    """Flags of ``evaluate-report --learned`` (defaults: the full sizes of issue 15)."""
    from confroute.evaluation.report_learned_data import LEARNED_DEFAULTS

    g = r.add_argument_group(
        "learned estimators (--learned)",
        "Run only the learned-estimators section (hidden-state probes, learning curves, "
        "option entropy) and replace it in --results; greedy answers and hidden states are "
        "stored in <cache>.hidden, so a re-run or a larger run computes only what is missing.")
    g.add_argument("--learned", action="store_true",
                   help="run the learned-estimators section instead of the main suite")
    g.add_argument("--n-train", type=int, default=LEARNED_DEFAULTS["n_train"],
                   help="NQ-open dev.jsonl training questions")
    g.add_argument("--n-trivia-train", dest="n_trivia_train", type=int,
                   default=LEARNED_DEFAULTS["n_trivia"], help="TriviaQA training questions")
    g.add_argument("--n-test", type=int, default=LEARNED_DEFAULTS["n_test"],
                   help="efficientqa_dev.jsonl test questions")
    g.add_argument("--n-se", type=int, default=LEARNED_DEFAULTS["n_se"],
                   help="train and test questions of the semantic-entropy subset")
    g.add_argument("--n-mc", type=int, default=LEARNED_DEFAULTS["n_mc"],
                   help="multiple-choice questions per set (three sets; 0: all)")
    g.add_argument("--layers", type=int, nargs="+", default=list(LEARNED_DEFAULTS["layers"]),
                   help="candidate probe layers")
    g.add_argument("--img", default="docs/img/learned.png", help="learning-curve plot")
