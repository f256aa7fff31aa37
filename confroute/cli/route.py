"""``confroute route``: decide edge or cloud for prompts (and answer them with ``--cloud``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from confroute._serialization import write_atomic
from confroute._validation import check_float
from confroute.cli._common import default_router_path, load_router, prompts_from
from confroute.errors import InvalidParameterError

__all__ = ["cmd_route", "enforced_budget", "register"]

OWNER = "confroute route"

BUDGET_HELP = (
    "replace the saved router's policy by a budget policy refitted on the router's recorded "
    "calibration p_good and enforced online by an exact ledger (enforce='total'): after N "
    "prompts of this run at most floor(F * N) have been escalated, at every prefix, however "
    "the prompts differ from the calibration data. Needs a router saved by "
    "'confroute calibrate'"
)


def enforced_budget(calibration: dict[str, Any], fraction: float, source: str) -> Any:
    """An enforced BudgetPolicy fitted on a saved router's calibration p_good.

    Parameters
    ----------
    calibration : dict
        The router's ``calibration_`` record; needs ``"p_good"``, a list of shape
        (n,) of floats (null for unscorable prompts), as written by
        ``confroute calibrate``.
    fraction : float in [0, 1]
        The budget :math:`b`.
    source : str
        The router file, named in the error.

    Returns
    -------
    BudgetPolicy
        ``BudgetPolicy(max_cloud_fraction=fraction, enforce="total")``, fitted.
    """
    import numpy as np

    from confroute.policies import BudgetPolicy

    check_float(fraction, "--max-cloud-fraction", OWNER, min_value=0.0, max_value=1.0)
    recorded = calibration.get("p_good")
    if not isinstance(recorded, list) or not recorded:
        raise InvalidParameterError(
            f"The '--max-cloud-fraction' option of {OWNER} refits the budget on the "
            f"calibration p_good recorded in the saved router, and {source} records none (it "
            "was not saved by 'confroute calibrate' or 'confroute calibrate-predictive'). "
            "Re-calibrate it with 'confroute calibrate --max-cloud-fraction F --out FILE'."
        )
    p = np.array([np.nan if v is None else v for v in recorded], dtype=np.float64)
    return BudgetPolicy(max_cloud_fraction=fraction, enforce="total").fit(p)


def _decision_rows(router: Any, chunk: list[Any], has_cloud: bool) -> list[dict[str, Any]]:
    if has_cloud:
        out = []
        for resp in router(chunk):
            d = resp.decision
            out.append({
                "prompt": d.prompt, "source": resp.source, "p_good": d.p_good,
                "scores": dict(d.scores), "answer": resp.text, "edge_answer": d.edge_answer,
                "degraded": resp.degraded, "error": resp.error, "cost": resp.cost,
                "reason": d.reason,
            })
        return out
    return [{
        "prompt": d.prompt, "source": d.source, "p_good": d.p_good, "scores": dict(d.scores),
        "answer": d.edge_answer if d.source == "edge" else None,
        "edge_answer": d.edge_answer, "reason": d.reason,
    } for d in router.route(chunk)]


def _load(args: argparse.Namespace) -> Any:
    policy = None
    if args.max_cloud_fraction is not None:  # refuse before any model is loaded
        from confroute.router import Router

        path = args.router or str(default_router_path())
        policy = enforced_budget(Router.load(path).calibration_ or {},
                                 args.max_cloud_fraction, path)
    router = load_router(args.router, args.edge, args.cloud)
    if policy is not None:
        router.policy = policy
    return router


def cmd_route(args: argparse.Namespace) -> int:
    """Entry point of ``confroute route``."""
    rows = prompts_from(args)
    router = _load(args)
    prompts = [r["prompt"] for r in rows]
    out_rows: list[dict[str, Any]] = []
    batch = max(1, args.batch_size)
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="routing", unit="prompt", disable=len(prompts) <= batch,
               file=sys.stderr)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out_rows += _decision_rows(router, chunk, bool(args.cloud))
        bar.update(len(chunk))
    bar.close()
    for row, src in zip(out_rows, rows):
        if "id" in src:
            row["id"] = src["id"]
    _emit(args, out_rows)
    return 0


def _emit(args: argparse.Namespace, out_rows: list[dict[str, Any]]) -> None:
    if args.output:
        write_atomic(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                          for row in out_rows), owner="confroute route")
        n_cloud = sum(r["source"] == "cloud" for r in out_rows)
        print(f"wrote {len(out_rows)} decisions to {args.output} "
              f"({n_cloud} escalated, {len(out_rows) - n_cloud} kept on edge)")
    elif args.json:
        for row in out_rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        for row in out_rows:
            _print_row(row, has_cloud=bool(args.cloud))


def _print_row(row: dict[str, Any], *, has_cloud: bool) -> None:
    from confroute.types import prompt_text

    q = prompt_text(row["prompt"])
    p = row["p_good"]
    ptxt = "nan" if p != p else f"{p:.2f}"
    print(f"Q: {q}")
    if row["source"] == "edge":
        print(f"   -> EDGE  (p_good={ptxt}) {row['answer']!r}")
    elif has_cloud:
        tag = "CLOUD" if not row.get("degraded") else "EDGE (cloud failed, degraded)"
        print(f"   -> {tag} (p_good={ptxt}) {row['answer']!r}")
        if row.get("error"):
            print(f"      error: {row['error']}")
    else:
        print(f"   -> ESCALATE to cloud (p_good={ptxt}); edge would have said "
              f"{row['edge_answer']!r}")
    print(f"      why: {row['reason']}")


def register(sub: Any) -> None:
    """Add ``route`` to the ``confroute`` command."""
    r = sub.add_parser(
        "route", help="decide edge or cloud for prompts (and answer them with --cloud)",
        description="Score each prompt's edge answer and decide whether to keep it or escalate. "
        "Without --router, uses the router calibrated on the built-in calibration set for the "
        "embedded model. Without --cloud, prints the decisions only. The saved router's policy "
        "decides; a budget policy saved with online enforcement guarantees its cloud share "
        "within this run, a threshold-only one does not.",
    )
    r.add_argument("prompts", nargs="*", help="prompts to route")
    r.add_argument("--input", help="JSONL file with a 'prompt' per line (optional 'id')")
    r.add_argument("--output", help="write decisions as JSONL here instead of printing them")
    r.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    r.add_argument("--router", help="saved router file (default: the built-in one)")
    r.add_argument("--edge", default="embedded", help="edge model spec (default: embedded)")
    r.add_argument("--cloud", help="cloud model spec; when given, escalated prompts are answered")
    r.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    r.add_argument("--max-cloud-fraction", type=float, metavar="F", help=BUDGET_HELP)
    r.set_defaults(func=cmd_route)
