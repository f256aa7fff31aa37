"""``confroute recalibrate``: refit a saved router's calibrator and policy on a decision log."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from confroute._validation import check_int
from confroute.errors import InvalidParameterError

__all__ = ["cmd_recalibrate", "register"]

_OWNER = "confroute recalibrate"


def register(sub: Any) -> None:
    """Add ``recalibrate`` to the ``confroute`` command (cheap: imports nothing heavy)."""
    p = sub.add_parser(
        "recalibrate", help="refit a router on the labels of its decision log",
        description="Refit the calibrator and the policy of a saved router on the labelled rows "
        "of the decision log it wrote (confroute serve --decision-log ... --shadow-rate ...), "
        "and save the result to --out. The estimators and every parameter are kept. The log "
        "must have been written by this very router (its fingerprint is checked). Nothing is "
        "written unless the refit succeeds (the new file is replaced atomically).",
    )
    p.add_argument("--log", required=True, help="the decision log (SQLite) written by serve")
    p.add_argument("--router", required=True, help="the saved router that wrote the log")
    p.add_argument("--out", required=True, help="where to save the recalibrated router")
    p.add_argument("--merge-calibration", action="store_true",
                   help="also fit on the router's own calibration set (recorded by confroute "
                   "calibrate), weighted like the oldest logged label")
    p.add_argument("--min-labels", type=int, default=50,
                   help="refuse to refit with fewer labelled rows (default 50)")
    p.add_argument("--weight-recent", type=int, metavar="H",
                   help="recency weights with a half-life of H labelled rows (default: equal)")
    p.add_argument("--policy-window", type=int, metavar="N",
                   help="refit the policy on the last N logged rows (default: all)")
    p.set_defaults(func=cmd_recalibrate)


def _merge_set(router: Any) -> tuple[Any, Any]:
    """(scores (n, k), labels (n,)) of the router's calibration set, as calibrate recorded them."""
    import numpy as np

    cal = router.calibration_ or {}
    scores, labels = cal.get("scores"), cal.get("labels")
    if not scores or not labels or len(scores) != len(labels):
        raise InvalidParameterError(
            f"The '--merge-calibration' option of {_OWNER} needs a router whose calibration "
            "set was recorded (scores and labels, written by this version's confroute "
            "calibrate). Got a router file without them; drop --merge-calibration.")
    x = np.array([[np.nan if v is None else v for v in row] for row in scores], dtype=float)
    keep = ~np.isnan(x).any(axis=1)
    return x[keep], np.asarray(labels, dtype=float)[keep]


def open_log(path: str, router: Any) -> Any:
    """The existing decision log at ``path``, checked to be written by ``router``."""
    from confroute.recalibration import fingerprint
    from confroute.traffic import DecisionLog

    if not Path(path).is_file():
        raise InvalidParameterError(f"The '--log' option of {_OWNER} must be an existing "
                                    f"decision log file. Got {path!r}, which does not exist.")
    fp = fingerprint(router)
    try:
        return DecisionLog(path, router_fingerprint=fp, store_prompts=None)
    except InvalidParameterError as exc:
        raise InvalidParameterError(
            f"The '--log' option of {_OWNER} must be a decision log written by the router in "
            f"--router (fingerprint {fp!r}). Got {path!r}: {exc}") from None


def cmd_recalibrate(args: argparse.Namespace) -> int:
    """Entry point of ``confroute recalibrate``."""
    from confroute.router import Router

    check_int(args.min_labels, "--min-labels", _OWNER, min_value=2)
    check_int(args.weight_recent, "--weight-recent", _OWNER, min_value=1, allow_none=True)
    check_int(args.policy_window, "--policy-window", _OWNER, min_value=1, allow_none=True)
    router = Router.load(args.router)
    merge = _merge_set(router) if args.merge_calibration else None
    with open_log(args.log, router) as log:
        try:
            new = router.recalibrate(log, min_labels=args.min_labels,
                                     weight_recent=args.weight_recent, merge_calibration=merge,
                                     policy_window=args.policy_window)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"confroute recalibrate --log {args.log}: {exc}") \
                from None
        n_rows = len(log)
    new.save(args.out)
    cal = new.calibration_ or {}
    print(f"saved {args.out}: refitted on {cal.get('n')} labelled of {n_rows} logged requests"
          f"{' + the calibration set' if merge is not None else ''}; edge accuracy "
          f"{cal.get('edge_accuracy', float('nan')):.3f}", file=sys.stderr)
    return 0
