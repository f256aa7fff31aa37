"""The "learned estimators" section of ``docs/results.md`` (issue 15).

Probes on the edge model's own hidden states against the scores they compete
with, trained on development questions and measured on held-out ones:

* **one table, every estimator**: sequence log-prob, mean token entropy, the
  post-generation :class:`~confroute.estimators.HiddenStateProbe`, its stack with
  log-prob (gradient-boosted and multi-feature Platt calibrators; the probe column
  cross-fitted by ``Router.calibrate``), the pre-generation
  :class:`~confroute.estimators.PromptProbe`, and on a subset (semantic entropy
  needs N samples per question) :class:`~confroute.estimators.SemanticEntropy`
  against the :class:`~confroute.estimators.SemanticEntropyProbe` that imitates it.
  Each row is a :class:`~confroute.router.Router` calibrated on the training
  questions (isotonic unless said otherwise) and measured on the test questions
  with :func:`~confroute.evaluation.harness.metrics_with_intervals` (the metrics of
  every other results table, bootstrap 95% intervals);
* **learning curves**: test AUROC against the number of training labels;
* **multiple choice**: :class:`~confroute.estimators.OptionEntropy` (entropy and
  1 - margin of the option distribution) against the correctness of the argmax
  option, with each option scored by its letter and by its text; a development
  set chooses which scoring is the headline (:func:`choose_scoring`).

Costs: one greedy pass per question gives the answer, its log-probs and the
hidden states (:mod:`confroute.evaluation.report_learned_data`, stored on disk).
``confroute evaluate-report --learned`` runs it (:func:`run_learned_suite`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from confroute._validation import check_int, param_error
from confroute.evaluation import metrics as M
from confroute.evaluation.datasets import Example
from confroute.evaluation.harness import grade_answers, metrics_with_intervals
from confroute.evaluation.report_learned_data import (
    CURVE_SIZES,
    ISSUE_SIZES,
    LEARNED_DEFAULTS,
    CapturedAnswer,
    HiddenStateStore,
    capture_answers,
    edge_seconds,
    option_logliks,
)
from confroute.types import Samples

__all__ = ["BEGIN", "CHOICE_SCORINGS", "CURVE_SIZES", "END", "ISSUE_SIZES", "LEARNED_DEFAULTS",
           "LearnedInputs", "choice_table", "choose_scoring", "learned_rows",
           "learned_section_of", "learning_curves", "plot_learning_curves", "prepare_inputs",
           "run_learned_section", "scoring_label",
           "write_learned_section"]

BEGIN, END = "<!-- learned-estimators:begin -->", "<!-- learned-estimators:end -->"
CHOICE_SCORINGS: tuple[tuple[str, str], ...] = (("letter", "sum"), ("text", "mean"),
                                                ("text", "sum"), ("cloze", "mean"),
                                                ("cloze", "sum"))
"""The option scorings of the multiple-choice table: ``(scoring, normalize)`` of OptionEntropy."""


@dataclass
class LearnedInputs:
    """Train and test questions with their stored greedy answers, graded.

    Attributes
    ----------
    train, test : list of Example
    train_caps, test_caps : list of CapturedAnswer
    y_train : ndarray of shape (n_train,)
        1 = the edge answer is good (alias containment), 0 = bad.
    e_test, c_test : ndarray of shape (n_test,)
        Edge quality and cloud quality (1: assume-correct) of the test questions.
    """

    train: list[Example]
    test: list[Example]
    train_caps: list[CapturedAnswer]
    test_caps: list[CapturedAnswer]
    y_train: np.ndarray
    e_test: np.ndarray
    c_test: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def samples(self, part: str, idx: Sequence[int] | None = None) -> list[Samples]:
        exs, caps = (self.train, self.train_caps) if part == "train" else (self.test,
                                                                            self.test_caps)
        ids = range(len(exs)) if idx is None else idx
        return [caps[i].samples(exs[i].prompt) for i in ids]

    def greedy_seconds(self) -> float:
        return float(np.mean([c.seconds for c in self.test_caps]))


def prepare_inputs(train: Sequence[Example], test: Sequence[Example], model: Any, model_id: str,
                   *, layers: Sequence[int], max_new_tokens: int,
                   store: HiddenStateStore | None) -> LearnedInputs:
    """Greedy answers with hidden states for every question (stored), graded by containment."""
    caps = capture_answers(model, model_id, [ex.prompt for ex in [*train, *test]],
                           layers=layers, max_new_tokens=max_new_tokens, store=store)
    tr, te = caps[:len(train)], caps[len(train):]
    y = grade_answers([c.sample.text for c in tr], train, "contains")
    e = grade_answers([c.sample.text for c in te], test, "contains")
    return LearnedInputs(list(train), list(test), tr, te, (y >= 0.5).astype(np.float64), e,
                         np.ones(len(te)))


def _row(name: str, router: Any, fit: tuple[list[Any], list[Samples], np.ndarray],
         test: tuple[list[Any], list[Samples], np.ndarray, np.ndarray], *, n_boot: int,
         seconds: float, kind: str) -> dict[str, Any]:
    """Calibrate ``router`` on ``fit``, measure it on ``test``: one table row."""
    from confroute.errors import InvalidParameterError
    from confroute.estimators import estimate_many

    t0 = time.perf_counter()
    head = {"name": name, "kind": kind, "calibrator": type(router.calibrator).__name__,
            "n_train": len(fit[0]), "n_test": len(test[0])}
    try:
        router.calibrate(fit[0], labels=fit[2], samples=fit[1])
    except InvalidParameterError as exc:  # e.g. a single class: the row says so
        nan = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
        return {**head, "error": str(exc), "n_unscored": len(test[0]), "probes": {},
                "metrics": dict.fromkeys(("auroc", "prr", "ece", "brier", "cpt50", "cpt80",
                                          "apgr", "gain_captured"), nan),
                "edge_seconds_per_query": float("nan"), "fit_seconds": float("nan")}
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = estimate_many(router.estimators, test[0], router.edge, samples=test[1])
    score_s = (time.perf_counter() - t0) / len(test[0])
    cols = [r.scores for r in res.values()]
    feats = cols[0] if len(cols) == 1 else np.column_stack(cols)
    p = router.p_good_of(feats)
    # A single score ranks by itself (calibrators are monotone); a stack by P(good).
    conf = -cols[0] if len(cols) == 1 else p
    probes = {e.name: {"layer": int(e.layer_), "C": float(e.C_), "cv_auroc": float(e.cv_auroc_)}
              for e in router.estimators if hasattr(e, "layer_")}
    return {**head, "n_unscored": int(np.isnan(np.asarray(conf, dtype=float)).sum()),
            "metrics": metrics_with_intervals(conf, p, test[2], test[3], n_boot=n_boot),
            "edge_seconds_per_query": seconds + score_s, "fit_seconds": fit_s,
            "probes": probes}


def _main_rows(inp: LearnedInputs, layers: tuple[int, ...], edge: Any, n_boot: int,
               greedy_s: float, prefill_s: float) -> list[dict[str, Any]]:
    from confroute import Router
    from confroute.estimators import (
        HiddenStateProbe,
        MeanTokenEntropy,
        PromptProbe,
        SequenceLogProb,
    )

    fit = ([ex.prompt for ex in inp.train], inp.samples("train"), inp.y_train)
    test = ([ex.prompt for ex in inp.test], inp.samples("test"), inp.e_test, inp.c_test)
    g = greedy_s
    specs: list[tuple[str, list[Any], str, float, str]] = [
        ("sequence log-prob", [SequenceLogProb()], "isotonic", g, "post-generation"),
        ("mean token entropy", [MeanTokenEntropy()], "isotonic", g, "post-generation"),
        ("HiddenStateProbe (answer mean)", [HiddenStateProbe(layers)], "isotonic", g,
         "post-generation"),
        ("HiddenStateProbe + log-prob (gbm)", [HiddenStateProbe(layers), SequenceLogProb()],
         "gbm", g, "post-generation, stacked"),
        ("HiddenStateProbe + log-prob (Platt)", [HiddenStateProbe(layers), SequenceLogProb()],
         "platt", g, "post-generation, stacked"),
        ("PromptProbe (prompt's last token)", [PromptProbe(layers)], "isotonic", prefill_s,
         "pre-generation"),
        # The widest stack: on NQ-open dev (cross-validated, training data only) adding the
        # prompt probe and mean token entropy to probe + log-prob gained about 0.01 AUROC.
        ("HiddenStateProbe + PromptProbe + log-prob + entropy (Platt)",
         [HiddenStateProbe(layers), PromptProbe(layers), SequenceLogProb(), MeanTokenEntropy()],
         "platt", g, "post-generation, stacked"),
    ]
    from tqdm.auto import tqdm

    rows = []
    for name, ests, cal, secs, kind in tqdm(specs, desc="learned rows (fit + measure)",
                                            unit="row"):
        rows.append(_row(name, Router(ests, cal, "threshold", edge=edge), fit, test,
                         n_boot=n_boot, seconds=secs, kind=kind))
    return rows


def _sampled(edge: Any, samples: list[Samples], est: Any) -> tuple[list[Samples], float]:
    """``samples`` with ``est``'s draws added, and the edge seconds per prompt they took."""
    from confroute.models.base import collect_samples

    before = len(getattr(edge, "calls", []))
    t0 = time.perf_counter()
    out = collect_samples(edge, [s.prompt for s in samples], est.sample_requests(),
                          existing=samples)
    calls = getattr(edge, "calls", None)
    secs = (sum(sum(r.seconds) for r in calls[before:]) if calls is not None
            else time.perf_counter() - t0)
    return out, float(secs) / max(len(samples), 1)


def _se_rows(inp: LearnedInputs, layers: tuple[int, ...], edge: Any, semantic: Any,
             n_se: int, n_boot: int, seed: int, greedy_s: float) -> list[dict[str, Any]]:
    """Semantic entropy and its probe, trained and measured on subsets of ``n_se``."""
    from confroute import Router
    from confroute.estimators import SemanticEntropyProbe

    rng = np.random.default_rng(seed)
    tr = sorted(rng.choice(len(inp.train), min(n_se, len(inp.train)), replace=False).tolist())
    te = list(range(min(n_se, len(inp.test))))
    fit_s, _ = _sampled(edge, inp.samples("train", tr), semantic)
    test_s, sample_secs = _sampled(edge, inp.samples("test", te), semantic)
    fit = ([inp.train[i].prompt for i in tr], fit_s, inp.y_train[tr])
    test = ([inp.test[i].prompt for i in te], test_s, inp.e_test[te], inp.c_test[te])
    g = greedy_s
    probe = SemanticEntropyProbe(layers, semantic=semantic)
    return [
        _row(f"semantic entropy (N = {semantic.n_samples})",
             Router(semantic, "isotonic", "threshold", edge=edge), fit, test, n_boot=n_boot,
             seconds=g + sample_secs, kind="post-generation, sampling (subset)"),
        _row("SemanticEntropyProbe (no labels)", Router(probe, "isotonic", "threshold",
                                                        edge=edge),
             fit, test, n_boot=n_boot, seconds=g, kind="post-generation (subset)"),
    ]


def learned_rows(inp: LearnedInputs, edge: Any, *, layers: Sequence[int], semantic: Any,
                 n_se: int, n_boot: int = 1000, greedy_s: float | None = None,
                 prefill_s: float = float("nan"), seed: int = 0) -> list[dict[str, Any]]:
    """Every row of the learned-estimators table.

    Parameters
    ----------
    inp : LearnedInputs
    edge : LanguageModel
        The edge model for what the stored answers lack (semantic-entropy draws);
        wrap it in :class:`~confroute.cache.CachedModel` to keep them.
    layers : sequence of int
        Candidate layers of the probes (chosen by cross-validation on training data).
    semantic : SemanticEntropy
        The semantic entropy estimator (and the probe's target).
    n_se : int
        Training and test questions of the semantic-entropy subset (0: no such rows).
    n_boot : int, default 1000
    greedy_s : float, optional
        Edge seconds per query of the greedy answer with capture (default: the mean
        time measured when the test answers were generated).
    prefill_s : float
        Edge seconds per query of the pre-generation decision (one prefill).

    Returns
    -------
    list of dict
        One per row: ``name``, ``kind``, ``calibrator``, ``n_train``, ``n_test``,
        ``metrics`` (each ``{"value", "low", "high"}``), ``edge_seconds_per_query``,
        ``fit_seconds`` and the chosen probe layers.
    """
    lay = tuple(int(i) for i in layers)
    g = inp.greedy_seconds() if greedy_s is None else float(greedy_s)
    rows = _main_rows(inp, lay, edge, n_boot, g, prefill_s)
    if n_se > 0:
        rows += _se_rows(inp, lay, edge, semantic, n_se, n_boot, seed, g)
    return rows


def learning_curves(inp: LearnedInputs, *, layers: Sequence[int], sizes: Sequence[int] = (
        CURVE_SIZES), n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Test AUROC against the number of training labels, probes vs sequence log-prob.

    Each size is a seeded subsample of the training questions (sizes above their
    number are dropped; the full training set is always the last point). Log-prob
    needs no labels for its ranking, so its AUROC is the same at every size.

    Returns
    -------
    dict
        ``sizes`` (list of int) and, per estimator, a list of ``{"value", "low",
        "high"}`` (NaN where a subsample has fewer than 2 labels of a class).
    """
    from confroute.errors import InvalidParameterError
    from confroute.estimators import HiddenStateProbe, PromptProbe, SequenceLogProb

    n = len(inp.train)
    used = sorted({min(int(s), n) for s in sizes} | {n})
    y_test = (inp.e_test >= 0.5).astype(int)
    test_s = inp.samples("test")
    prompts = [ex.prompt for ex in inp.test]
    lp = SequenceLogProb().estimate(prompts, samples=test_s).scores
    lp_ci = _auroc_ci(-lp, y_test, n_boot)
    out: dict[str, Any] = {"sizes": used, "sequence log-prob": [lp_ci] * len(used),
                           "HiddenStateProbe": [], "PromptProbe": []}
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    for size in tqdm(used, desc="learning curves", unit="size"):
        idx = sorted(rng.choice(n, size, replace=False).tolist())
        fit_p, fit_s = [inp.train[i].prompt for i in idx], inp.samples("train", idx)
        for name, probe in (("HiddenStateProbe", HiddenStateProbe(tuple(layers))),
                            ("PromptProbe", PromptProbe(tuple(layers)))):
            try:
                probe.fit(fit_p, fit_s, inp.y_train[idx])
            except InvalidParameterError:
                out[name].append({"value": np.nan, "low": np.nan, "high": np.nan})
                continue
            out[name].append(_auroc_ci(-probe.estimate(prompts, samples=test_s).scores,
                                       y_test, n_boot))
    return out


def _auroc_ci(conf: np.ndarray, y: np.ndarray, n_boot: int) -> dict[str, float]:
    from confroute.errors import InvalidParameterError

    ok = np.isfinite(conf)
    try:
        v, lo, hi = M.bootstrap_ci(M.auroc, conf[ok], y[ok], n_boot=n_boot, seed=0)
    except InvalidParameterError:  # a single class: the AUROC is undefined
        v = lo = hi = float("nan")
    return {"value": float(v), "low": float(lo), "high": float(hi)}


def scoring_label(scoring: str, normalize: str) -> str:
    """A table's name of an option scoring: ``"letter"``, ``"text (mean)"``, ``"text (sum)"``."""
    return scoring if scoring == "letter" else f"{scoring} ({normalize})"


def choice_table(sets: Sequence[tuple[str, Sequence[Example]]], model: Any, model_id: str,
                 store: HiddenStateStore | None, *, n_boot: int = 1000,
                 scorings: Sequence[tuple[str, str]] = CHOICE_SCORINGS) -> list[dict[str, Any]]:
    """Option entropy and 1 - margin against the correctness of the most likely option.

    Every question is scored both ways (its letters, and its option texts from
    ``Example.choices``, :class:`~confroute.estimators.OptionEntropy`'s two
    scorings); each ``(scoring, normalize)`` in ``scorings`` gives one row per set.

    Parameters
    ----------
    sets : sequence of (title, examples)
        Multiple-choice examples (``kind="choice"``).
    model : LanguageModel with ``score``
    model_id : str
    store : HiddenStateStore or None
        Keeps each question's option scores (one entry per scoring).
    scorings : sequence of (scoring, normalize)
        Default: letter, text with mean and with summed token log-probs.

    Returns
    -------
    list of dict
        One per (set, scoring), sets outermost: ``title``, ``scoring`` (see
        :func:`scoring_label`), ``n``, ``accuracy`` and ``auroc_entropy`` /
        ``auroc_margin`` (``{"value", "low", "high"}``).
    """
    rows = []
    for title, exs in sets:
        prompts = [ex.prompt for ex in exs]
        letters = [ex.letters for ex in exs]
        cached = {sc: option_logliks(model, model_id, prompts, letters, store,
                                     desc=f"options ({sc}): {title}", scoring=sc,
                                     option_texts=[ex.choices for ex in exs])
                  for sc in dict.fromkeys(sc for sc, _ in scorings)}
        for sc, norm in scorings:
            rows.append({"title": title, "scoring": scoring_label(sc, norm), "n": len(exs),
                         **_choice_metrics(exs, cached[sc], sc, norm, n_boot)})
    return rows


def _choice_metrics(exs: Sequence[Example], cached: Sequence[np.ndarray], scoring: str,
                    normalize: str, n_boot: int) -> dict[str, Any]:
    from confroute.estimators.options import OptionEntropy

    prompts = [ex.prompt for ex in exs]
    key = OptionEntropy(scoring=scoring).cache_key
    samples = [Samples(prompt=p, extra={"options": list(ex.letters), key: v})
               for p, ex, v in zip(prompts, exs, cached)]
    ent, mar = (OptionEntropy(measure=m, scoring=scoring, normalize=normalize).estimate(
        prompts, samples=samples) for m in ("entropy", "margin"))
    choice = np.asarray(ent.details["choice"], dtype=int)
    good = np.array([ch >= 0 and ex.letters[ch] in ex.gold for ch, ex in zip(choice, exs)],
                    dtype=int)
    return {"accuracy": _mean_ci(good.astype(float), n_boot),
            "auroc_entropy": _auroc_ci(-ent.scores, good, n_boot),
            "auroc_margin": _auroc_ci(-mar.scores, good, n_boot)}


def choose_scoring(rows: Sequence[dict[str, Any]], dev: str) -> dict[str, Any] | None:
    """The option scoring chosen on the development set ``dev``: the highest accuracy.

    The answer is the most likely option, so the scoring is the one under which the
    edge model answers best; its entropy is then the uncertainty. (Choosing by
    entropy AUROC instead would read noise when every scoring is near chance.)

    Parameters
    ----------
    rows : sequence of dict
        :func:`choice_table`'s rows.
    dev : str
        Title of the development set (its rows choose; no other set is looked at).

    Returns
    -------
    dict or None
        ``set``, ``scoring`` (the chosen label; ties go to the earlier row),
        ``by``, and ``accuracy`` and ``auroc_entropy`` (label -> development
        value); None when the set has no row with a defined accuracy.
    """
    mine = [r for r in rows if r["title"] == dev]
    acc = {r["scoring"]: float(r["accuracy"]["value"]) for r in mine}
    auc = {r["scoring"]: float(r["auroc_entropy"]["value"]) for r in mine}
    ok = [k for k, v in acc.items() if v == v]
    if not ok:
        return None
    best = max(ok, key=lambda k: acc[k])  # max keeps the first of equal values
    return {"set": dev, "scoring": best, "by": "accuracy", "accuracy": acc,
            "auroc_entropy": auc}


def _mean_ci(x: np.ndarray, n_boot: int) -> dict[str, float]:
    v, lo, hi = M.bootstrap_ci(np.mean, x, n_boot=n_boot, seed=0)
    return {"value": float(v), "low": float(lo), "high": float(hi)}


def run_learned_section(
    train: Sequence[Example], test: Sequence[Example], model: Any, edge: Any, *,
    model_id: str, store: HiddenStateStore | None, semantic: Any, layers: Sequence[int],
    n_se: int, max_new_tokens: int = 32, n_boot: int = 1000,
    choice_sets: Sequence[tuple[str, Sequence[Example]]] = (), choice_dev: str | None = None,
    curve_sizes: Sequence[int] = CURVE_SIZES, img: str | Path | None = None,
    sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole section; returns its summary (see :func:`learned_markdown`).

    Parameters
    ----------
    train, test : sequence of Example
        Short-answer questions (graded by alias containment).
    model : LanguageModel
        The local edge model (``generate`` with hidden layers, ``score``,
        ``prompt_hidden_states``).
    edge : LanguageModel
        The same model as the routers see it (e.g. wrapped in a CachedModel).
    choice_sets : sequence of (title, examples)
        Multiple-choice sets (:func:`choice_table`).
    choice_dev : str, optional
        Title of the development set among ``choice_sets``: its entropy AUROC
        chooses the headline option scoring (:func:`choose_scoring`; summary key
        ``choice_scoring``, None without a development set).
    img : path, optional
        Where to plot the learning curves (PNG; needs matplotlib).
    sizes : dict, optional
        The sizes asked for (shown in the section).
    """
    owner = "run_learned_section"
    check_int(n_se, "n_se", owner, min_value=0)
    check_int(max_new_tokens, "max_new_tokens", owner, min_value=1)
    check_int(n_boot, "n_boot", owner, min_value=0)
    if choice_dev is not None and choice_dev not in [t for t, _ in choice_sets]:
        raise param_error("choice_dev", owner, "the title of one of the choice_sets",
                          choice_dev)
    t0 = time.perf_counter()
    inp = prepare_inputs(train, test, model, model_id, layers=layers,
                         max_new_tokens=max_new_tokens, store=store)
    timed = [ex.prompt for ex in test[:64]]
    greedy_s, pre_s = edge_seconds(model, model_id, timed, layers, store,
                                   max_new_tokens=max_new_tokens)
    from confroute.estimators import shared_probe_fits

    # Rows that share a probe (and the curves' full-size point) repeat the same
    # deterministic layer/C searches; each is run once, the results are unchanged.
    with shared_probe_fits():
        rows = learned_rows(inp, edge, layers=layers, semantic=semantic, n_se=n_se,
                            n_boot=n_boot, greedy_s=greedy_s, prefill_s=pre_s)
        curves = learning_curves(inp, layers=layers, sizes=curve_sizes, n_boot=n_boot)
    if img is not None:
        plot_learning_curves(curves, img)
    choice = choice_table(choice_sets, model, model_id, store, n_boot=n_boot)
    return {
        "rows": rows, "curves": curves, "img": None if img is None else str(img),
        "choice": choice,
        "choice_scoring": None if choice_dev is None else choose_scoring(choice, choice_dev),
        "n_train": len(train), "n_test": len(test), "n_se": n_se, "layers": list(layers),
        "edge_accuracy_train": float(inp.y_train.mean()),
        "edge_accuracy_test": float((inp.e_test >= 0.5).mean()),
        "greedy_seconds_per_query": greedy_s, "prefill_seconds_per_query": pre_s,
        "greedy_seconds_at_capture": inp.greedy_seconds(),
        "max_new_tokens": max_new_tokens, "n_boot": n_boot,
        "n_samples": int(getattr(semantic, "n_samples", 0)),
        "sizes": sizes or {}, "wall_seconds": time.perf_counter() - t0,
    }


def plot_learning_curves(curves: dict[str, Any], path: str | Path) -> Path:
    """AUROC vs training labels with bootstrap bands (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.asarray(curves["sizes"], dtype=float)
    for name in ("sequence log-prob", "HiddenStateProbe", "PromptProbe"):
        pts = curves[name]
        v = np.array([p["value"] for p in pts], dtype=float)
        lo = np.array([p["low"] for p in pts], dtype=float)
        hi = np.array([p["high"] for p in pts], dtype=float)
        ax.plot(x, v, marker="o", label=name)
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("training labels")
    ax.set_ylabel("test AUROC (95% bootstrap band)")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_learned_section(results: str | Path, markdown: str) -> None:
    """Put the section between its markers in ``results`` (replaced, or appended)."""
    from confroute._serialization import write_atomic

    p = Path(results)
    old = p.read_text(encoding="utf-8") if p.exists() else "# Results\n"
    block = f"{BEGIN}\n{markdown.rstrip()}\n{END}\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    write_atomic(p, new, owner="write_learned_section")


def learned_section_of(text: str) -> str | None:
    """The learned-estimators block (markers included) of a results page, or None."""
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
