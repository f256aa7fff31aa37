"""k-model routing on recorded answers: MMLU-Redux x helm_combined (docs/results-cascade.md).

No model is run: every answer is HELM's recorded prediction. Questions are the
MMLU-Redux questions annotated "ok" that join helm_combined and have an answer
from all eight priced models (gold = the MMLU label). Split by question id
(:func:`confroute.evaluation.datasets.split`): 40% **train** (fits one query-only
success predictor per model), 20% **calibration** (chooses thresholds, pairs,
tiers), 40% **test** (everything reported).

* Confidence signal per tier: the recorded data has no log-probabilities
  (HELM's ``logprob`` is always 0), so a tier's ``p_good`` is a query-only
  predictor's P(this model is right): :class:`~confroute.predictive.KNNRouter`
  (k = 40) on all-MiniLM-L6-v2 embeddings of the question, fitted on the train
  part on the model's 0/1 correctness. The cascade also stops when a tier's
  letter agrees with the previous tier's (answer agreement).
* Cost: approximate mid-2024 list prices (:mod:`confroute.prices`); prompt
  tokens = ceil(chars / 4) of the zero-shot prompt, 1 output token (a letter).
  Reported as US dollars per 1,000 questions.

Usage: ``python benchmarks/cascade_recorded.py --data-dir ../shared/data
--out runs/cascade --write-doc docs/results-cascade.md`` (``nox -s cascade``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confroute.cascade import (
    KWaySelector,
    OperatingPoint,
    fit_cascade_thresholds,
    fit_selector_threshold,
    measure,
    select_models,
    simulate_cascade,
)
from confroute.errors import InvalidParameterError
from confroute.evaluation.datasets import Example, load_helm_combined, split
from confroute.prices import estimate_tokens, lookup_price

COLUMNS = {  # helm_combined column -> short name, cheapest first
    "google_gemini-1.5-flash-preview-0514": "gemini-1.5-flash",
    "meta_llama-3-70b": "llama-3-70b",
    "mistralai_mixtral-8x22b": "mixtral-8x22b",
    "google_gemini-1.5-pro-preview-0409": "gemini-1.5-pro",
    "openai_gpt-4o-2024-05-13": "gpt-4o",
    "openai_gpt-4-1106-preview": "gpt-4-1106-preview",
    "anthropic_claude-3-opus-20240229": "claude-3-opus",
    "openai_gpt-4-0613": "gpt-4-0613",
}
CAP_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 0.8, 1.0)
K_NEIGHBOURS = 40
PER_K = 1000.0  # report dollars per 1,000 questions


def load(data_dir: str) -> list[Example]:
    ex = load_helm_combined(f"{data_dir}/mmlu_redux/helm_combined",
                            f"{data_dir}/mmlu_redux/questions", models=list(COLUMNS))
    return [x for x in ex if x.meta.get("error_type") == "ok"
            and all(c in x.recorded for c in COLUMNS)]


def arrays(part: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct (n, k), per-query cost (n, k) in $ per 1,000 questions, letters (n, k))."""
    letters = np.array([[x.recorded[c].strip() for c in COLUMNS] for x in part])
    gold = [set(x.gold) for x in part]
    correct = np.array([[a in g for a in row] for row, g in zip(letters, gold)], dtype=float)
    prices = [lookup_price(c) for c in COLUMNS]
    cost = np.array([[p.cost(estimate_tokens(x.prompt), 1) * PER_K for p in prices]
                     for x in part])
    return correct, cost, letters


def embed(parts: Sequence[Sequence[Example]], out: Path) -> list[np.ndarray]:
    from confroute.models.embedded import load_default_embedder
    from confroute.predictive import QueryEmbedder

    qe = QueryEmbedder(load_default_embedder(), cache_path=out / "emb.sqlite")
    return [qe.encode([str(x.meta["question"]) for x in p]) for p in parts]


def point_dict(name: str, pt: OperatingPoint, extra: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    return {"method": name, "quality": pt.quality, "quality_ci": pt.quality_ci,
            "cost": pt.cost, "cost_ci": pt.cost_ci, "params": pt.params,
            "shares": pt.shares, **(extra or {})}


def singles(q: np.ndarray, c: np.ndarray) -> list[dict[str, Any]]:
    names = list(COLUMNS.values())
    rows = []
    for m, name in enumerate(names):
        share = np.eye(len(names))[m]
        rows.append(point_dict(name, measure((), q[:, m], c[:, m], share)))
    return rows


def oracle(q: np.ndarray, c: np.ndarray) -> dict[str, Any]:
    """Cheapest correct model per question (the cheapest model when none is right)."""
    pick = np.where(q.any(axis=1), np.argmax(q > 0, axis=1), 0)
    rows = np.arange(len(q))
    share = np.bincount(pick, minlength=q.shape[1]) / len(q)
    return point_dict("oracle", measure((), q[rows, pick], c[rows, pick], share))


def selector_points(name: str, cols: list[int], P: dict[str, np.ndarray], data: dict[str, Any],
                    caps: Sequence[float], *, on: str = "test") -> list[dict[str, Any]]:
    """A k-way selector over ``cols`` (threshold rule, chosen on calibration), one point per cap.

    The predicted success probabilities ``P`` are computed once; this is what
    :meth:`KWaySelector.fit_threshold` and :meth:`KWaySelector.select` do on embeddings.
    """
    out = []
    c_cal = data["cal_c"][:, cols]
    for cap in caps:
        try:
            pt = fit_selector_threshold(P["cal"][:, cols], data["cal_q"][:, cols], c_cal,
                                        max_cost=cap)
        except InvalidParameterError:
            continue
        if on == "test":
            pick = select_models(P["test"][:, cols], c_cal.mean(axis=0), "threshold",
                                 pt.params[0])
            rows = np.arange(len(pick))
            share = np.bincount(pick, minlength=len(cols)) / len(pick)
            pt = measure(pt.params, data["test_q"][:, cols][rows, pick],
                         data["test_c"][:, cols][rows, pick], share)
        out.append(point_dict(name, pt, {"cap": cap, "models": [_name(m) for m in cols]}))
    return out


def _name(m: int) -> str:
    return list(COLUMNS.values())[m]


def best_pair_points(P: dict[str, np.ndarray], data: dict[str, Any], caps: Sequence[float]
                     ) -> list[dict[str, Any]]:
    """Per cap: the 2-model pre-generation router whose calibration quality is best."""
    out = []
    for cap in caps:
        best: tuple[float, list[int]] | None = None
        for a, b in itertools.combinations(range(len(COLUMNS)), 2):
            pts = selector_points("pair", [a, b], P, data, [cap], on="cal")
            if pts and (best is None or pts[0]["quality"] > best[0]):
                best = (pts[0]["quality"], [a, b])
        if best is not None:
            out += selector_points("best 2-model router", best[1], P, data, [cap])
    return out


def cascade_points(P: dict[str, np.ndarray], data: dict[str, Any], caps: Sequence[float],
                   n_tiers: int = 3) -> list[dict[str, Any]]:
    """Per cap: the n-tier cascade (tiers, thresholds) best on calibration, measured on test."""
    out = []
    for cap in caps:
        best: tuple[float, tuple[int, ...], tuple[float, ...]] | None = None
        for tiers in itertools.combinations(range(len(COLUMNS)), n_tiers):
            cols = list(tiers)
            agree = _agree(data["cal_l"][:, cols])
            try:
                pt = fit_cascade_thresholds(P["cal"][:, cols], data["cal_q"][:, cols],
                                            data["cal_c"][:, cols], max_cost=cap, agree=agree,
                                            n_grid=15)
            except InvalidParameterError:
                continue
            if best is None or pt.quality > best[0]:
                best = (pt.quality, tiers, pt.params)
        if best is None:
            continue
        cols = list(best[1])
        res = simulate_cascade(P["test"][:, cols], data["test_q"][:, cols],
                               data["test_c"][:, cols], list(best[2]),
                               agree=_agree(data["test_l"][:, cols]))
        pt = measure(best[2], res.quality, res.cost, res.tier_shares(len(cols)))
        out.append(point_dict(f"{n_tiers}-tier cascade", pt,
                              {"cap": cap, "models": [_name(m) for m in cols]}))
    return out


def _agree(letters: np.ndarray) -> np.ndarray:
    return letters[:, 1:] == letters[:, :-1]


def run(data_dir: str, out: Path, seed: int) -> dict[str, Any]:
    from confroute.predictive import KNNRouter

    t0 = time.perf_counter()
    ex = load(data_dir)
    dev, test = split(ex, 0.6, seed=seed)
    train, cal = split(dev, 2 / 3, seed=seed + 1)
    X_tr, X_cal, X_te = embed([train, cal, test], out)
    data: dict[str, Any] = {}
    for key, part in (("train", train), ("cal", cal), ("test", test)):
        data[f"{key}_q"], data[f"{key}_c"], data[f"{key}_l"] = arrays(part)
    # the k-way selector's per-model success predictors, applied once to each part
    selector = KWaySelector(KNNRouter(k=K_NEIGHBOURS),
                            costs=data["cal_c"].mean(axis=0)).fit(X_tr, data["train_q"])
    P = {"cal": selector.p_success(X_cal), "test": selector.p_success(X_te)}
    single = singles(data["test_q"], data["test_c"])
    best_single = max(single, key=lambda r: r["quality"])
    ref_cost = float(data["cal_c"][:, list(COLUMNS.values()).index(best_single["method"])]
                     .mean())
    caps = [f * ref_cost for f in CAP_FRACTIONS]
    results = {
        "n": len(ex), "n_train": len(train), "n_cal": len(cal), "n_test": len(test),
        "seed": seed, "singles": single, "oracle": oracle(data["test_q"], data["test_c"]),
        "pair": best_pair_points(P, data, caps),
        "cascade3": cascade_points(P, data, caps, 3),
        "selector": selector_points("k-way selector", list(range(len(COLUMNS))), P, data, caps),
        "best_single": best_single["method"],
    }
    results["seconds"] = time.perf_counter() - t0
    return results


def _fmt_pt(r: dict[str, Any]) -> str:
    q, (ql, qh) = r["quality"], r["quality_ci"]
    c, (cl, ch) = r["cost"], r["cost_ci"]
    return f"{q:.3f} [{ql:.3f}, {qh:.3f}] | {c:.3f} [{cl:.3f}, {ch:.3f}]"


FAMILIES = (("pair", "best 2-model router"), ("cascade3", "3-tier cascade"),
            ("selector", "k-way selector"))


def _cheapest(points: list[dict[str, Any]], bound: float) -> dict[str, Any] | None:
    ok = [r for r in points if r["quality"] >= bound]
    return min(ok, key=lambda r: r["cost"]) if ok else None


def _where(r: dict[str, Any], ref: dict[str, Any]) -> str:
    return (f"{r['quality']:.3f} for ${r['cost']:.3f} ({100 * r['cost'] / ref['cost']:.0f}% "
            f"of its cost; {', '.join(r.get('models', []))})")


def goals(res: dict[str, Any]) -> list[str]:
    """Plain statements of what is met, per family of routed points (test part)."""
    best = next(r for r in res["singles"] if r["method"] == res["best_single"])
    gpt4 = next(r for r in res["singles"] if r["method"] == "gpt-4-0613")
    lo = best["quality_ci"][0]
    lines = [f"Most accurate single model: {best['method']} at {best['quality']:.3f} "
             f"(95% CI [{lo:.3f}, {best['quality_ci'][1]:.3f}]), ${best['cost']:.3f} per 1,000 "
             "questions. Goal: reach its interval at <= 30% of its cost.", ""]
    for key, label in FAMILIES:
        r = _cheapest(res[key], lo)
        if r is None:
            lines.append(f"- {label}: **not met**, no point reaches {lo:.3f}.")
        else:
            ok = r["cost"] <= 0.30 * best["cost"]
            lines.append(f"- {label}: **{'met' if ok else 'not met'}**, cheapest point inside "
                         f"the interval: {_where(r, best)}.")
    routed = [r for key, _ in FAMILIES for r in res[key]]
    at = _cheapest(routed, gpt4["quality"])
    within = _cheapest(routed, gpt4["quality_ci"][0])
    lines += ["", f"GPT-4-0613: {gpt4['quality']:.3f} (95% CI [{gpt4['quality_ci'][0]:.3f}, "
              f"{gpt4['quality_ci'][1]:.3f}]) for ${gpt4['cost']:.3f} per 1,000 questions."]
    lines.append("- its accuracy itself is " + (
        f"reached by the {at['method']} at {_where(at, gpt4)}." if at else
        f"**not reached** by any routed point (best routed: "
        f"{max(r['quality'] for r in routed):.3f})."))
    if within is not None:
        lines.append(f"- inside its interval from ${within['cost']:.3f} per 1,000 questions "
                     f"({within['method']}, {_where(within, gpt4)}).")
    lines += ["", "The cap of each routed point was set on calibration data; picking "
              "\"the cheapest point inside the interval\" looks along the test curve, so "
              "read it as a description of the curve, not a fresh test."]
    return lines


def render(res: dict[str, Any], plot_name: str) -> str:
    head = (
        "# k-model routing on recorded answers (MMLU-Redux x HELM)\n\n"
        "Written by `nox -s cascade` (`benchmarks/cascade_recorded.py`); no model is run.\n\n"
        f"{res['n']} MMLU-Redux questions annotated `ok` with a recorded answer of all eight "
        "priced HELM models (gold = MMLU label; the two unpriced HELM models, palmyra-x-v3 and "
        "text-unicorn@001, are left out). Split by question id: "
        f"{res['n_train']} train (success predictors), {res['n_cal']} calibration "
        f"(thresholds, tier and pair choice), {res['n_test']} **test** (all numbers below).\n\n"
        "Cost: approximate mid-2024 list prices (`confroute.prices`, USD per million tokens), "
        "prompt tokens = ceil(chars / 4) of the zero-shot prompt, one output token; in "
        "**dollars per 1,000 questions**. A cascade pays for every tier a question reaches. "
        "Confidence per tier: the recorded data has no usable log-probabilities, so each "
        f"tier's p_good is a query-only kNN predictor (k = {K_NEIGHBOURS}, all-MiniLM-L6-v2 "
        "question embeddings) of that model's success, plus answer agreement with the "
        "previous tier as a stopping signal. Intervals: Clopper-Pearson (accuracy) and "
        "percentile bootstrap (cost), 95%, on the test part.\n\n"
        "Methods, one point per cost cap (a fraction of the most accurate single model's "
        "calibration cost; a cap no rule can meet gives no point): **best 2-model router**, "
        "the pre-generation router of the pair best on calibration at that cap (the cheaper "
        "model when its predicted success >= a threshold, else the other; one model paid per "
        "question); **3-tier cascade**, the three models and two thresholds best on "
        "calibration (`fit_cascade_thresholds`, 15 quantiles per tier; every tier reached is "
        "paid); **k-way selector**, `KWaySelector` over all eight models (the cheapest model "
        "whose predicted success >= a threshold chosen under the cap); **oracle**, the "
        "cheapest correct model per question.\n\n"
        f"![quality vs cost]({plot_name})\n\n## Goals\n\n" + "\n".join(goals(res)) + "\n\n"
    )
    rows = ["| method | models / tiers | cap | accuracy [95% CI] | $ / 1k q [95% CI] |",
            "|---|---|---|---|---|"]
    for r in [*res["singles"], res["oracle"]]:
        rows.append(f"| {r['method']} | single | - | {_fmt_pt(r)} |")
    for key, _ in FAMILIES:
        for r in res[key]:
            models = ", ".join(r.get("models", [])) if key != "selector" else "all 8"
            rows.append(f"| {r['method']} | {models} | {r['cap']:.3f} | {_fmt_pt(r)} |")
    tail = (f"\n\nSeed {res['seed']}; run time {res['seconds']:.0f} s.\n")
    return head + "\n".join(rows) + tail


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in res["singles"]:
        ax.scatter(r["cost"], r["quality"], color="grey")
        ax.annotate(r["method"], (r["cost"], r["quality"]), fontsize=7)
    ax.scatter(res["oracle"]["cost"], res["oracle"]["quality"], marker="*", s=120,
               color="gold", label="oracle")
    for key, label in FAMILIES:
        pts = sorted(res[key], key=lambda r: r["cost"])
        ax.plot([r["cost"] for r in pts], [r["quality"] for r in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("cost, $ per 1,000 questions (log scale)")
    ax.set_ylabel("accuracy (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", type=Path, default=Path("runs/cascade"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-doc", type=Path, default=None)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res = run(a.data_dir, a.out, a.seed)
    if a.write_doc is not None:
        png = a.write_doc.with_suffix(".png")
        plot(res, png)
        text = render(res, png.name)
        old = a.write_doc.read_text(encoding="utf-8") if a.write_doc.exists() else ""
        live = "<!-- cascade-live:begin -->"  # benchmarks/cascade_live.py's section: kept
        if live in old:
            text = text.rstrip("\n") + "\n\n" + live + old.split(live, 1)[1]
        a.write_doc.write_text(text, encoding="utf-8")
    print("\n".join(goals(res)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
