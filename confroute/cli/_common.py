"""Helpers shared by the ``confroute`` commands.

Everything heavy (models, routers, estimators, policies) is imported inside the
functions, so building the parser stays light.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from confroute._stats import id_split
from confroute._validation import check_float, check_int
from confroute.errors import InvalidParameterError
from confroute.types import Prompt

__all__ = [
    "DEFAULT_ROUTER",
    "add_policy_options",
    "build_policy",
    "calibrate_and_save",
    "default_router_path",
    "edge_samples",
    "fit_and_save",
    "grade_rows",
    "id_split",
    "load_model",
    "load_router",
    "parse_estimator",
    "parse_params",
    "prompts_from",
    "read_jsonl",
    "references",
]

DEFAULT_ROUTER = "default_router.json"

BUDGET_HELP = (
    "budget policy: at most this fraction of prompts go to the cloud. Enforced online by an "
    "exact all-time ledger (enforce='total'): in every process that uses the saved router, "
    "after N prompts at most floor(F * N) have been escalated, at every prefix, whatever the "
    "traffic. Add --threshold-only to save only the fitted threshold instead"
)
THRESHOLD_ONLY_HELP = (
    "with --max-cloud-fraction: save only the threshold fitted on the calibration data, with "
    "no online ledger. NOT a guarantee: the cloud share on new traffic is near the budget only "
    "while that traffic looks like the calibration data"
)


# ----------------------------------------------------------------------------- models
def load_model(spec: str, *, role: str = "edge") -> Any:
    """Build a LanguageModel from a CLI spec string.

    Parameters
    ----------
    spec : str
        ``embedded``, ``openai:MODEL[@URL]``, ``hf:PATH`` or a local model folder.
    role : str, default="edge"
        The option the spec came from (``--ROLE``), named in errors.
    """
    if spec == "embedded":
        from confroute.models.embedded import load_default_edge_model

        return load_default_edge_model()
    if spec.startswith("openai:"):
        from confroute.models.openai import OpenAIModel

        body = spec[len("openai:"):]
        model, _, base = body.partition("@")
        if not model:
            raise InvalidParameterError(
                f"The '--{role}' option must name a model after 'openai:'. Got {spec!r}."
            )
        return OpenAIModel(model, base_url=base) if base else OpenAIModel(model)
    path = spec[len("hf:"):] if spec.startswith("hf:") else spec
    if not Path(path).exists():
        raise InvalidParameterError(
            f"The '--{role}' option must be 'embedded', 'openai:MODEL[@URL]' or a local model "
            f"folder. Got {spec!r}, which is not an existing path."
        )
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(path)


def default_router_path() -> Path:
    """The router calibrated for the embedded model that ships with confroute."""
    return Path(str(resources.files("confroute.data").joinpath(DEFAULT_ROUTER)))


def load_router(path: str | None, edge_spec: str, cloud_spec: str | None) -> Any:
    """Load a saved Router (the built-in one when ``path`` is None) with its models."""
    from confroute.router import Router

    edge = load_model(edge_spec, role="edge")
    cloud = load_model(cloud_spec, role="cloud") if cloud_spec else None
    router_path = Path(path) if path else default_router_path()
    return Router.load(router_path, edge=edge, cloud=cloud)


# ------------------------------------------------------------------------------- data
def _parse_row(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(f"{where}: not valid JSON ({exc}).") from None
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict) or not isinstance(
        row.get("prompt", row.get("question")), (str, list)
    ):
        raise InvalidParameterError(
            f"{where}: each line must be an object with a 'prompt' (or 'question') "
            f"string or message list."
        )
    row.setdefault("prompt", row.get("question"))
    return row


def read_jsonl(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a prompts file: one JSON object (or string) per line.

    Parameters
    ----------
    path : str
    limit : int >= 1, optional
        Keep only the first ``limit`` rows.

    Returns
    -------
    list of dict, length n_rows
        Each with a ``prompt`` (copied from ``question`` when missing).
    """
    check_int(limit, "--limit", "confroute", min_value=1, allow_none=True)
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidParameterError(f"Cannot read {path!r}: {exc.strerror or exc}.") from None
    with f:
        rows = [_parse_row(line, f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
    if not rows:
        raise InvalidParameterError(f"{path}: no rows.")
    return rows if limit is None else rows[:limit]


def prompts_from(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows to route: ``--input`` FILE, else the positional prompts."""
    if args.input:
        return read_jsonl(args.input)
    if args.prompts:
        return [{"prompt": p} for p in args.prompts]
    raise InvalidParameterError("Give prompts as arguments or a file with --input.")


def references(rows: Sequence[dict[str, Any]], path: str, hint: str) -> list[list[str]]:
    """Accepted answers per row (``answers`` or ``answer``), shape (n_rows, *).

    ``hint`` ends the error for a row without them (why they are needed).
    """
    refs = []
    for i, r in enumerate(rows):
        ans = r.get("answers", r.get("answer"))
        if ans is None:
            raise InvalidParameterError(f"{path}: row {i} has no 'answers' (or 'answer'){hint}")
        refs.append([ans] if isinstance(ans, str) else [str(a) for a in ans])
    return refs


# ----------------------------------------------------------------------------- parts
def _json_or_str(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_params(items: Sequence[str] | None, option: str = "--param") -> dict[str, Any]:
    """``NAME=VALUE`` items as a dict; values read as JSON when they parse, else strings."""
    params: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidParameterError(
                f"The '{option}' option must look like NAME=VALUE (e.g. k=10). Got {item!r}."
            )
        params[name.strip()] = _json_or_str(value)
    return params


def parse_estimator(spec: str) -> Any:
    """Build an estimator from ``NAME`` or ``NAME:key=value,key=value``.

    Values are read as JSON when they parse (``true``, ``5``, ``0.7``), else as
    strings: ``sequence_logprob:normalize=false``, ``semantic_entropy:n_samples=5``.
    """
    from confroute._persist import import_parts
    from confroute.estimators import estimator_registry

    name, _, rest = spec.partition(":")
    items = [i for i in rest.split(",") if i]
    if any("=" not in i or not i.partition("=")[0].strip() for i in items):
        raise InvalidParameterError(
            f"The '--estimator' option must be NAME or NAME:key=value,... Got {spec!r}."
        )
    kwargs = parse_params(items, "--estimator")
    import_parts("estimator")
    cls = estimator_registry.get_class(name.strip())
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidParameterError(f"Bad parameters for estimator {name!r}: {exc}.") from None


# -------------------------------------------------------------------------- policies
def add_policy_options(parser: argparse.ArgumentParser, *, risk_control: bool) -> None:
    """The policy flags of ``calibrate`` and ``calibrate-predictive``."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--min-p-good", type=float, default=0.5,
                   help="threshold policy: keep edge answers with p_good >= this (default 0.5)")
    g.add_argument("--max-cloud-fraction", type=float, metavar="F", help=BUDGET_HELP)
    if risk_control:
        g.add_argument("--max-edge-error", type=float,
                       help="risk-control policy: bound on the error rate of kept edge answers")
        parser.add_argument("--delta", type=float, default=0.1,
                            help="risk-control policy: failure probability of the bound "
                            "(default 0.1)")
    parser.add_argument("--threshold-only", action="store_true", help=THRESHOLD_ONLY_HELP)


def build_policy(args: argparse.Namespace, owner: str) -> Any:
    """The policy named by the flags of :func:`add_policy_options`, checked before any work.

    ``--max-cloud-fraction F`` gives ``BudgetPolicy(max_cloud_fraction=F,
    enforce="total")`` (``enforce="none"`` with ``--threshold-only``).
    """
    from confroute.policies import BudgetPolicy, RiskControlPolicy, ThresholdPolicy

    if args.threshold_only and args.max_cloud_fraction is None:
        raise InvalidParameterError(
            f"The '--threshold-only' option of {owner} only applies with "
            "'--max-cloud-fraction'."
        )
    if args.max_cloud_fraction is not None:
        check_float(args.max_cloud_fraction, "--max-cloud-fraction", owner, min_value=0.0,
                    max_value=1.0)
        enforce = "none" if args.threshold_only else "total"
        return BudgetPolicy(max_cloud_fraction=args.max_cloud_fraction, enforce=enforce)
    if getattr(args, "max_edge_error", None) is not None:
        check_float(args.max_edge_error, "--max-edge-error", owner, min_value=0.0,
                    max_value=1.0)
        check_float(args.delta, "--delta", owner, min_value=0.0, max_value=1.0,
                    min_inclusive=False, max_inclusive=False)
        return RiskControlPolicy(max_edge_error=args.max_edge_error, delta=args.delta)
    check_float(args.min_p_good, "--min-p-good", owner, min_value=0.0, max_value=1.0)
    return ThresholdPolicy(min_p_good=args.min_p_good)


# ------------------------------------------------------------------------- calibrate
def edge_samples(router: Any, prompts: Sequence[Prompt], *, greedy: bool) -> list[Any] | None:
    """The edge generations every estimator needs (plus the greedy answer when asked),
    made in one pass; None when nothing needs generating."""
    from confroute.models.base import SampleRequest, collect_samples

    requests = [q for e in router.estimators if e.needs_generation for q in e.sample_requests()]
    if greedy:
        requests.append(SampleRequest(greedy=True, max_new_tokens=router.edge_max_new_tokens))
    return list(collect_samples(router.edge, list(prompts), requests)) if requests else None


def grade_rows(rows: Sequence[dict[str, Any]], samples: Sequence[Any], grader: str
               ) -> np.ndarray:
    """0/1 labels of shape (n_rows,): each edge answer graded against the row's
    ``answers`` with the row's ``grader`` (else ``grader``), as Router.calibrate does."""
    from confroute.grading import resolve_grader

    refs = references(rows, "the data", " and no 'label': give a 0/1 'label' per row, or "
                      "accepted answers to grade the edge answer against.")
    out = []
    for r, s, ref in zip(rows, samples, refs):
        g = resolve_grader(r.get("grader", grader), "confroute calibrate")
        text = s.greedy.text if s.greedy is not None else ""
        out.append(int(g(text, ref) >= 0.5))
    return np.array(out, dtype=np.float64)


def fit_and_save(router: Any, prompts: Sequence[Prompt], labels: np.ndarray,
                 samples: Sequence[Any] | None, out: str,
                 record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate on the labelled prompts (NaN labels left out), record the calibration
    set, save the router.

    Recorded in ``router.calibration_``: ``p_good`` (n,) of the calibration prompts
    (so ``confroute route --max-cloud-fraction`` can refit a budget), ``scores``
    (n, k) and ``labels`` (n,) (the reference of the drift monitor's PSI and the
    set ``confroute recalibrate --merge-calibration`` merges), NaN written as null,
    plus ``record``.

    Returns
    -------
    dict
        ``router.calibration_``.
    """
    from confroute.estimators import estimate_many

    keep = [i for i, y in enumerate(labels) if not math.isnan(float(y))]
    kp = [prompts[i] for i in keep]
    ks = None if samples is None else [samples[i] for i in keep]
    y = labels[keep].astype(np.int64)
    router.calibrate(kp, y, samples=ks)
    results = estimate_many(router.estimators, kp, router.edge, samples=ks)
    feats = np.column_stack([r.scores for r in results.values()])
    p = router.predict_proba(kp, samples=ks)
    router.calibration_.update({
        "p_good": [_json_float(v) for v in p],
        "scores": [[_json_float(v) for v in row] for row in feats],
        "labels": [int(v) for v in y],
        "n_unlabeled": len(prompts) - len(keep),
        **(record or {}),
    })
    router.save(out)
    return dict(router.calibration_)


def _json_float(v: Any) -> float | None:
    return None if math.isnan(float(v)) else float(v)


def calibrate_and_save(router: Any, rows: Sequence[dict[str, Any]], source: str,
                       grader: str, out: str) -> dict[str, Any]:
    """Calibrate ``router`` on labelled rows, record the calibration set, save it.

    Rows carry ``label`` (1 = the edge answer is good) or ``answers`` (graded with
    each row's ``grader``, else ``grader``). The edge model generates once; see
    :func:`fit_and_save` for what is recorded.

    Returns
    -------
    dict
        ``router.calibration_``.
    """
    prompts: list[Prompt] = [r["prompt"] for r in rows]
    if all("label" in r for r in rows):
        samples = edge_samples(router, prompts, greedy=False)
        labels = np.array([int(r["label"]) for r in rows], dtype=np.float64)
    else:
        references(rows, source, " and no 'label': give a 0/1 'label' per row, or "
                   "accepted answers to grade the edge answer against.")  # before generating
        samples = edge_samples(router, prompts, greedy=True)
        assert samples is not None
        labels = grade_rows(rows, samples, grader)
    return fit_and_save(router, prompts, labels, samples, out)
