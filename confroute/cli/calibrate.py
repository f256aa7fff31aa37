"""``confroute calibrate``: fit a router on labelled prompts (or on prompts alone, with a
labeler) and save it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from confroute._validation import check_float
from confroute.cli._common import (
    add_policy_options,
    build_policy,
    calibrate_and_save,
    edge_samples,
    fit_and_save,
    load_model,
    parse_estimator,
    read_jsonl,
)
from confroute.errors import InvalidParameterError

__all__ = ["cmd_calibrate", "register"]


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Entry point of ``confroute calibrate``."""
    from confroute.router import Router

    owner = "confroute calibrate"
    policy = build_policy(args, owner)
    label_free = args.labeler is not None or args.labels_in is not None
    if label_free:
        check_label_free_args(args)
    if args.data:
        rows = _read_data(args.data)
        source = args.data
    else:
        from confroute.calibration_data import default_calibration_set

        rows = default_calibration_set()
        source = "the built-in calibration set"
    reuse = _labels_in(args.labels_in, rows) if args.labels_in else None
    names = args.estimator or ["sequence_logprob"]
    estimators = [parse_estimator(spec) for spec in names]
    calibrator = args.calibrator or ("platt" if len(estimators) > 1 else "isotonic")
    edge = load_model(args.edge, role="edge")
    router = Router(estimators if len(estimators) > 1 else estimators[0], calibrator, policy,
                    edge=edge)
    print(f"calibrating on {len(rows)} prompts from {source} with {', '.join(names)} -> "
          f"{calibrator} -> {type(router.policy).__name__}", file=sys.stderr)
    if label_free:
        cal = _calibrate_label_free(router, rows, args, reuse)
    else:
        cal = calibrate_and_save(router, rows, source, args.grader, args.out)
    print(f"saved {args.out}: edge accuracy {cal.get('edge_accuracy', float('nan')):.3f} on "
          f"{cal.get('n')} prompts ({cal.get('n_unscored')} unscorable, "
          f"{cal.get('n_unlabeled', 0)} without a label)")
    if args.max_cloud_fraction is not None:
        print(_budget_note(router.policy), file=sys.stderr)
    return 0


# ------------------------------------------------------------------------ label-free
_NEEDS = {"cloud_agreement": ("cloud",), "judge": ("cloud", "judge"), "se_preference": ("cloud",)}


def check_label_free_args(args: argparse.Namespace) -> None:
    """Check the labeler options before any model is loaded or any prompt generated."""
    owner = "confroute calibrate"
    if not args.data:
        raise InvalidParameterError(f"The '--data' option of {owner} is required with "
                                    "--labeler / --labels-in (a JSONL file of prompts).")
    if args.labels_in is not None:
        if args.labeler is not None:
            raise InvalidParameterError(f"The '--labels-in' and '--labeler' options of {owner} "
                                        "exclude each other (reused labels need no labeler).")
        return
    from confroute.labeling import labeler_registry

    if args.labeler not in labeler_registry.names():
        raise InvalidParameterError(
            f"The '--labeler' option of {owner} must be one of "
            f"{', '.join(labeler_registry.names())}. Got {args.labeler!r}.")
    for need in _NEEDS.get(args.labeler, ()):
        if not getattr(args, need):
            raise InvalidParameterError(
                f"The '--labeler {args.labeler}' option of {owner} needs '--{need}' (the "
                f"{'model that answers each prompt' if need == 'cloud' else 'judge model'}). "
                "Got none.")
    eq = args.equivalence
    if args.labeler == "judge" and (eq or args.threshold is not None or args.nli_model):
        raise InvalidParameterError(f"The '--equivalence', '--threshold' and '--nli-model' "
                                    f"options of {owner} do not apply to '--labeler judge'.")
    if args.labeler == "cloud_agreement" and args.threshold is not None:
        if eq != "embedding":
            raise InvalidParameterError(
                f"The '--threshold' option of {owner} with '--labeler cloud_agreement' needs "
                f"'--equivalence embedding' (the cosine threshold). Got --equivalence {eq}.")
        check_float(args.threshold, "--threshold", owner, min_value=-1.0, max_value=1.0)
    if args.labeler == "se_preference" and args.threshold is not None:
        check_float(args.threshold, "--threshold", owner, min_value=0.0)
    if eq == "nli" and not args.nli_model:
        raise InvalidParameterError(f"The '--equivalence nli' option of {owner} needs "
                                    "'--nli-model PATH' (a local NLI model directory). Got none.")
    if args.nli_model and eq != "nli":
        raise InvalidParameterError(f"The '--nli-model' option of {owner} needs "
                                    f"'--equivalence nli'. Got --equivalence {eq}.")
    if args.nli_model and not Path(args.nli_model).is_dir():
        raise InvalidParameterError(f"The '--nli-model' option of {owner} must be an existing "
                                    f"local model directory. Got {args.nli_model!r}.")


def _read_data(path: str) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"The '--data' option of confroute calibrate must be a "
                                    f"JSONL file with at least one prompt: {exc}") from None


def build_labeler(args: argparse.Namespace, edge: Any) -> Any:
    """The labeler named by ``--labeler`` with the models of ``--cloud`` / ``--judge``."""
    from confroute.labeling import CloudAgreementLabeler, JudgeLabeler, SEPreferenceLabeler

    cloud = load_model(args.cloud, role="cloud")
    if args.labeler == "judge":
        return JudgeLabeler(load_model(args.judge, role="judge"), cloud)
    if args.labeler == "se_preference":
        eq: Any = args.equivalence or "embedding"
        if eq == "nli":
            from confroute.estimators.equivalence import NLIEquivalence

            eq = NLIEquivalence(args.nli_model)
        tau = 0.1 if args.threshold is None else args.threshold
        return SEPreferenceLabeler(cloud, edge=edge, tau=tau, equivalence=eq)
    if args.labeler == "cloud_agreement":
        return CloudAgreementLabeler(cloud, backend=args.equivalence or "exact",
                                     threshold=args.threshold, model_path=args.nli_model)
    from confroute.labeling import labeler_registry

    return labeler_registry.resolve(args.labeler, "--labeler", "confroute calibrate")


def _labels_in(path: str, rows: list[dict[str, Any]]) -> np.ndarray:
    """Labels (n_rows,) read from a label file, matched to the data rows by prompt."""
    from confroute.labeling import read_labels_jsonl
    from confroute.types import prompt_key

    prompts, labels, _ = read_labels_jsonl(path)
    by_key = {prompt_key(p): float(v) for p, v in zip(prompts, labels)}
    missing = [i for i, r in enumerate(rows) if prompt_key(r["prompt"]) not in by_key]
    if missing:
        raise InvalidParameterError(
            f"The '--labels-in' option of confroute calibrate must hold a label for every "
            f"prompt of --data. Got {path!r}, with no label for {len(missing)} of them (first: "
            f"row {missing[0]}).")
    return np.array([by_key[prompt_key(r["prompt"])] for r in rows], dtype=np.float64)


def _calibrate_label_free(router: Any, rows: list[dict[str, Any]], args: argparse.Namespace,
                          reuse: np.ndarray | None) -> dict[str, Any]:
    """Label the edge answers (or reuse labels), report, write labels, fit and save."""
    prompts = [r["prompt"] for r in rows]
    labeler = build_labeler(args, router.edge) if reuse is None else None
    samples = edge_samples(router, prompts, greedy=True)
    if labeler is not None:
        labels = np.asarray(labeler.label(prompts, samples), dtype=np.float64)
        meta = labeler.describe()
        print(_labeler_report(meta), file=sys.stderr)
    else:
        assert reuse is not None
        labels, meta = reuse, {"labeler": "labels-in", "path": args.labels_in}
    good, bad = int(np.sum(labels == 1.0)), int(np.sum(labels == 0.0))
    print(f"labels: {good} good, {bad} bad, {len(labels) - good - bad} unknown", file=sys.stderr)
    if args.labels_out:
        from confroute.labeling import write_labels_jsonl

        write_labels_jsonl(args.labels_out, prompts, labels, meta=meta)
        print(f"wrote labels to {args.labels_out}", file=sys.stderr)
    return fit_and_save(router, prompts, labels, samples, args.out, {"labeler": meta})


def _labeler_report(meta: dict[str, Any]) -> str:
    c, n = meta.get("cost", {}), meta.get("counts", {})
    return (f"labeler {meta.get('labeler')} ({meta.get('backend')}): "
            f"{int(c.get('cloud_requests', 0))} cloud + {int(c.get('judge_requests', 0))} judge "
            f"requests ({int(c.get('failed_requests', 0))} failed), "
            f"{int(c.get('prompt_tokens', 0))} + {int(c.get('completion_tokens', 0))} tokens, "
            f"cost {float(c.get('cloud_cost', 0.0)):.4g}, {float(c.get('seconds', 0.0)):.1f} s; "
            f"{n.get('good', 0)} good / {n.get('bad', 0)} bad / {n.get('unknown', 0)} unknown")


def _budget_note(policy: Any) -> str:
    b = policy.max_cloud_fraction
    lo, hi = policy.cloud_fraction_interval_
    if policy.enforce == "total":
        return (f"budget {b}: enforced online, at most floor({b} * N) of the first N prompts "
                f"routed by this router (per process) go to the cloud")
    return (f"budget {b}, threshold only (not enforced): threshold {policy.threshold_:.4f}, "
            f"cloud share on traffic like the calibration data in [{lo:.3f}, {hi:.3f}] (95%)")


def register(sub: Any) -> None:
    """Add ``calibrate`` to the ``confroute`` command."""
    c = sub.add_parser(
        "calibrate", help="fit a router on labelled prompts and save it",
        description="Generate edge answers for labelled prompts, grade them, fit the calibrator "
        "and the policy, and save the router. Data: JSONL with 'prompt' and either 'label' (1 = "
        "the edge answer is good) or 'answers' (accepted answers; graded with --grader or a "
        "per-row 'grader'). Without --data, the built-in calibration set is used. The "
        "calibrated p_good of the calibration prompts is saved with the router, so that "
        "'confroute route --max-cloud-fraction' can refit a budget on it.",
    )
    c.add_argument("--data", help="labelled JSONL (default: the built-in calibration set); "
                   "with --labeler, prompts alone ({\"prompt\": ...} per line)")
    c.add_argument("--out", required=True, help="where to save the router (JSON)")
    c.add_argument("--edge", default="embedded", help="edge model spec (default: embedded)")
    c.add_argument("--estimator", action="append",
                   help="estimator name, optionally with parameters "
                   "(sequence_logprob:normalize=false); repeat to combine several "
                   "(default sequence_logprob)")
    c.add_argument("--calibrator", help="isotonic or platt (default: isotonic, platt for several)")
    c.add_argument("--grader", default="contains",
                   help="contains, exact, number or choice (default contains)")
    add_policy_options(c, risk_control=True)
    g = c.add_argument_group(
        "calibration without labels",
        "Label the edge answers of prompt-only data with a labeler (see "
        "confroute.labeling): cloud_agreement (the edge answer agrees with the --cloud "
        "answer), judge (an LLM --judge compares the two answers) or se_preference (the "
        "paper's semantic-entropy preference: edge vs --cloud samples).")
    g.add_argument("--labeler", metavar="NAME",
                   help="cloud_agreement, judge or se_preference")
    g.add_argument("--cloud", help="model spec of the cloud model the labeler asks")
    g.add_argument("--judge", help="model spec of the judge (--labeler judge)")
    g.add_argument("--equivalence", choices=("exact", "embedding", "nli"),
                   help="how answers are compared (cloud_agreement default exact; "
                   "se_preference default embedding)")
    g.add_argument("--threshold", type=float,
                   help="cosine threshold of --equivalence embedding (cloud_agreement, default "
                   "0.8) or tau (se_preference, default 0.1)")
    g.add_argument("--nli-model", metavar="PATH",
                   help="local NLI model directory for --equivalence nli")
    g.add_argument("--labels-out", metavar="FILE",
                   help="write the labels (JSONL, with the labeler's cost) for review")
    g.add_argument("--labels-in", metavar="FILE",
                   help="reuse labels written by --labels-out (no labeler, no cloud call)")
    c.set_defaults(func=cmd_calibrate)
