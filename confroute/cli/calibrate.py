"""``confroute calibrate``: fit a router on labelled prompts and save it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from confroute.cli._common import (
    add_policy_options,
    build_policy,
    calibrate_and_save,
    load_model,
    parse_estimator,
    read_jsonl,
)

__all__ = ["cmd_calibrate", "register"]


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Entry point of ``confroute calibrate``."""
    from confroute.router import Router

    policy = build_policy(args, "confroute calibrate")
    if args.data:
        rows = read_jsonl(args.data)
        source = args.data
    else:
        from confroute.calibration_data import default_calibration_set

        rows = default_calibration_set()
        source = "the built-in calibration set"
    names = args.estimator or ["sequence_logprob"]
    estimators = [parse_estimator(spec) for spec in names]
    calibrator = args.calibrator or ("platt" if len(estimators) > 1 else "isotonic")
    edge = load_model(args.edge, role="edge")
    router = Router(estimators if len(estimators) > 1 else estimators[0], calibrator, policy,
                    edge=edge)
    print(f"calibrating on {len(rows)} prompts from {source} with {', '.join(names)} -> "
          f"{calibrator} -> {type(router.policy).__name__}", file=sys.stderr)
    cal = calibrate_and_save(router, rows, source, args.grader, args.out)
    print(f"saved {args.out}: edge accuracy {cal.get('edge_accuracy', float('nan')):.3f} on "
          f"{cal.get('n')} prompts ({cal.get('n_unscored')} unscorable)")
    if args.max_cloud_fraction is not None:
        print(_budget_note(router.policy), file=sys.stderr)
    return 0


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
    c.add_argument("--data", help="labelled JSONL (default: the built-in calibration set)")
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
    c.set_defaults(func=cmd_calibrate)
