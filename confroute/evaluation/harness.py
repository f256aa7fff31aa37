"""Evaluation harness: score estimators, calibrators and routing curves on a dataset.

Two modes.

**Live edge model** (:func:`evaluate`). The edge model answers every question
once (greedy) and every estimator scores from one shared generation
(:func:`~confroute.estimators.estimate_many`; verbalized confidence adds its
follow-up question). Edge answers are graded by each example's grader
(:mod:`confroute.grading`, the graders ``Router.calibrate`` uses: ``"contains"``
for short free-text answers, ``"number"``, ``"choice"``). The
examples are split by id (:func:`~confroute.evaluation.datasets.split`) into a
calibration part, on which isotonic and Platt calibrators are fitted per
estimator, and a test part, on which everything is measured:

* edge accuracy; AUROC and PRR of the raw confidence ``-score``;
* ECE (10 uniform bins) and Brier of three probabilities: the *naive* one
  (``-score`` min-max scaled to [0, 1] over the test part; what one gets by
  reading a score as a probability without calibration), isotonic and Platt;
* routing curves (quality vs cloud-call fraction, escalating the lowest
  ``-score`` first; calibrators are monotone, so they give the same order up to
  ties, which isotonic plateaus would otherwise break arbitrarily), CPT(50%),
  CPT(80%), APGR and the share of the oracle's gain over random captured,
  :math:`(A_{est} - A_{rnd}) / (A_{orc} - A_{rnd})` with :math:`A` the area
  under the quality curve;
* edge compute seconds per query (see below).

Every metric has a percentile bootstrap 95% interval over the test questions
(:func:`~confroute.evaluation.metrics.bootstrap_ci`; the calibrators stay fixed,
so the interval reflects test-sample variability only).

Unscored prompts (NaN score, e.g. an unparseable verbalized confidence) are
counted; in routing and ranking metrics they count as the most uncertain
(escalated first, as the router does); ECE and Brier use the scored ones only.

**Cloud.** Either a recorded model's answers graded the same way, or
``"assume-correct"``: cloud quality is 1 for every query, which turns routing
curves into the selective-prediction view (how much accuracy is bought by
abstaining on a fraction of queries), not a measurement of a real cloud model.

**Recorded pair** (:func:`evaluate_pair`). No live model: the edge and the cloud
are two models' recorded answers (e.g. GSM8K 6B vs 175B, MMLU Mixtral-8x22B vs
GPT-4). It reports the quality of each and the random and oracle curves, the
frame into which predictive routers can be slotted.

Compute attribution
-------------------
Generation runs in stages, each timed: the greedy answer, one batched sampling
call per distinct sampling setting, then estimator follow-ups (verbalized
confidence). With a :class:`~confroute.cache.CachedModel` the seconds stored with
each cached generation are used, so cost is reported the same on a cached
re-run. Each estimator is charged the greedy stage (it scores the edge answer,
which must exist), the sampling stages whose settings it uses (a stage shared
by two estimators is charged fully to each), its own follow-up stage, and its
own scoring time (e.g. the embedding model that clusters semantic-entropy
samples; re-measured on every run).
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from confroute._serialization import write_atomic
from confroute._validation import check_float, check_int, check_same_length
from confroute.errors import InvalidParameterError
from confroute.evaluation import metrics as M
from confroute.evaluation.datasets import Example, split
from confroute.grading import GraderLike, get_grader, resolve_grader
from confroute.models.base import SampleRequest, collect_samples, merge_requests
from confroute.types import GenerationConfig, Samples

__all__ = [
    "ASSUME_CORRECT",
    "LazyModel",
    "arithmetic_examples",
    "default_estimators",
    "evaluate",
    "evaluate_pair",
    "grade_answers",
    "metrics_with_intervals",
    "subsample",
    "write_report",
]

ASSUME_CORRECT = "assume-correct"
METRIC_NAMES = (
    "auroc", "prr", "ece_naive", "ece_isotonic", "ece_platt", "brier_naive",
    "brier_isotonic", "brier_platt", "cpt50", "cpt80", "apgr", "gain_captured",
)


# ---------------------------------------------------------------- helpers


class LazyModel:
    """A model loaded on first use (a cached re-run need not load it at all).

    Parameters
    ----------
    name : str
        The model's name (cache identity), known before loading.
    loader : callable
        Returns the model.
    """

    def __init__(self, name: str, loader: Callable[[], Any]) -> None:
        self.name = name
        self._loader = loader
        self._model: Any = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _get(self) -> Any:
        if self._model is None:
            self._model = self._loader()
        return self._model

    @property
    def batch_size(self) -> int:
        return 16

    def generate(self, prompts: Sequence[Any], config: GenerationConfig) -> Any:
        return self._get().generate(prompts, config)

    def generate_multi(self, prompts: Sequence[Any], configs: Sequence[GenerationConfig]) -> Any:
        from confroute.models.base import generate_configs

        return generate_configs(self._get(), prompts, configs)

    def score(self, prompts: Sequence[Any], continuations: Sequence[str]) -> Any:
        return self._get().score(prompts, continuations)


def subsample(examples: Sequence[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """The first ``limit`` examples of a seeded shuffle, returned in file order.

    Prefix-stable: a larger ``limit`` keeps every example a smaller one chose, so
    cached generations are reused when a run is grown or shrunk.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]


ARITHMETIC_SUFFIX = " Answer with the number only."


def arithmetic_examples(n: int, seed: int, *, suffix: str = ARITHMETIC_SUFFIX) -> list[Example]:
    """Graded-difficulty arithmetic (:func:`confroute.calibration_data.arithmetic_questions`).

    ``suffix`` is appended to each question: without it the 135M edge model
    explains the method and runs out of tokens before stating a number.
    """
    from confroute.calibration_data import arithmetic_questions

    return [
        Example(id=f"{r['id']}-s{seed}", prompt=r["prompt"] + suffix, gold=tuple(r["answers"]),
                kind="number", meta={"level": r["level"]})
        for r in arithmetic_questions(n=n, seed=seed)
    ]


def default_estimators(
    kind: str = "short", *, n_samples: int = 5, max_new_tokens: int = 32,
    equivalence: Any = "embedding", seed: int = 0,
) -> list[Any]:
    """The estimators ``--estimators all`` runs, sharing one sampling setting.

    Sequence log-probability, mean token entropy, semantic entropy (``n_samples``
    draws clustered by ``equivalence``), self-consistency (same draws, answers
    extracted for ``kind``) and verbalized confidence.
    """
    from confroute.estimators import (
        MeanTokenEntropy,
        SelfConsistency,
        SemanticEntropy,
        SequenceLogProb,
        VerbalizedConfidence,
    )

    extractor = {"number": "number", "choice": "choice"}.get(kind, "short")
    return [
        SequenceLogProb(max_new_tokens=max_new_tokens),
        MeanTokenEntropy(max_new_tokens=max_new_tokens),
        SemanticEntropy(n_samples=n_samples, max_new_tokens=max_new_tokens,
                        equivalence=equivalence, seed=seed),
        SelfConsistency(n_samples=n_samples, max_new_tokens=max_new_tokens,
                        extractor=extractor, seed=seed),
        VerbalizedConfidence(answer_max_new_tokens=max_new_tokens),
    ]


def _resolve_estimators(estimators: Any, kind: str, **kwargs: Any) -> list[Any]:
    from confroute.estimators import estimator_registry

    if estimators is None or estimators == "all":
        return default_estimators(kind, **kwargs)
    if isinstance(estimators, str):
        estimators = [e.strip() for e in estimators.split(",") if e.strip()]
    defaults = {e.name: e for e in default_estimators(kind, **kwargs)}
    out = []
    for e in estimators:
        if isinstance(e, str):
            out.append(defaults[e] if e in defaults
                       else estimator_registry.resolve(e, "estimators", "evaluate"))
        else:
            out.append(e)
    if not out:
        raise InvalidParameterError("The 'estimators' parameter of evaluate is empty.")
    return out


def _ci(fn: Callable[..., float], *arrays: Any, n_boot: int, seed: int) -> dict[str, float]:
    try:
        value, lo, hi = M.bootstrap_ci(fn, *arrays, n_boot=n_boot, seed=seed)
    except InvalidParameterError:
        try:
            value = float(fn(*arrays))
        except InvalidParameterError:
            value = math.nan
        lo = hi = math.nan
    return {"value": value, "low": lo, "high": hi}


def _fill_nan_conf(conf: np.ndarray) -> np.ndarray:
    """Unscored prompts become the least confident (escalated first)."""
    out = np.array(conf, dtype=float)
    bad = np.isnan(out)
    if bad.any():
        lowest = np.nanmin(out) if (~bad).any() else 0.0
        out[bad] = lowest - 1.0
    return out


def _naive_prob(conf: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(conf)), float(np.max(conf))
    if hi == lo:
        return np.full(len(conf), 0.5)
    return (conf - lo) / (hi - lo)


def _area(f: np.ndarray, q: np.ndarray) -> float:
    return float(np.trapezoid(q, f))


def _gain_captured(conf: np.ndarray, e: np.ndarray, c: np.ndarray) -> float:
    f, q = M.quality_vs_cloud_fraction(conf, e, c)
    fo, qo = M.oracle_curve(e, c)
    fr, qr = M.random_curve(e, c)
    denom = _area(fo, qo) - _area(fr, qr)
    if denom <= 0:
        raise InvalidParameterError("oracle is no better than random")
    return (_area(f, q) - _area(fr, qr)) / denom


def _curve_metric(which: str) -> Callable[..., float]:
    def fn(conf: np.ndarray, e: np.ndarray, c: np.ndarray) -> float:
        f, q = M.quality_vs_cloud_fraction(conf, e, c)
        w, s = float(e.mean()), float(c.mean())
        if which == "apgr":
            return M.apgr(f, q, w, s)
        if which == "gain_captured":
            return _gain_captured(conf, e, c)
        return M.cpt(f, q, w, s, 50.0 if which == "cpt50" else 80.0)
    return fn


def _prob_metric(which: str) -> Callable[..., float]:
    def fn(p: np.ndarray, y: np.ndarray) -> float:
        ok = ~np.isnan(p)
        if not ok.any():
            raise InvalidParameterError("no scored prompt")
        return M.ece(p[ok], y[ok]) if which == "ece" else M.brier(p[ok], y[ok])
    return fn


def metrics_with_intervals(
    conf: Any, p_good: Any, edge_quality: Any, cloud_quality: Any, *, n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """The test-part metrics of :func:`evaluate` for one confidence, with 95% intervals.

    Parameters
    ----------
    conf : array-like of shape (n,)
        Confidence (higher = keep on the edge; e.g. ``-score`` or a calibrated
        P(good)); NaN counts as the least confident, as in :func:`evaluate`.
    p_good : array-like of shape (n,)
        Calibrated P(edge answer good) (ECE and Brier; NaN rows left out).
    edge_quality, cloud_quality : array-like of shape (n,)
        Qualities in [0, 1]; an edge answer is good when its quality is >= 0.5.
    n_boot : int, default 1000
    seed : int, default 0

    Returns
    -------
    dict
        ``auroc``, ``prr``, ``ece``, ``brier``, ``cpt50``, ``cpt80``, ``apgr`` and
        ``gain_captured``, each ``{"value", "low", "high"}`` (NaN when undefined).
    """
    conf_t = _fill_nan_conf(np.asarray(conf, dtype=float))
    p = np.asarray(p_good, dtype=float)
    e, c = np.asarray(edge_quality, dtype=float), np.asarray(cloud_quality, dtype=float)
    check_same_length("metrics_with_intervals", conf=conf_t, p_good=p, edge_quality=e,
                      cloud_quality=c)
    y = (e >= 0.5).astype(int)
    m = {"auroc": _ci(M.auroc, conf_t, y, n_boot=n_boot, seed=seed),
         "prr": _ci(M.prr, conf_t, e, n_boot=n_boot, seed=seed),
         "ece": _ci(_prob_metric("ece"), p, y, n_boot=n_boot, seed=seed),
         "brier": _ci(_prob_metric("brier"), p, y, n_boot=n_boot, seed=seed)}
    for which in ("cpt50", "cpt80", "apgr", "gain_captured"):
        m[which] = _ci(_curve_metric(which), conf_t, e, c, n_boot=n_boot, seed=seed)
    return m


# ---------------------------------------------------------------- generation stages


def _stage_seconds(model: Any, before: int, wall: float, n: int) -> float:
    """Mean generation seconds per query of the calls made since ``before``."""
    calls = getattr(model, "calls", None)
    if calls is None or n == 0:
        return wall / max(n, 1)
    return float(sum(sum(r.seconds) for r in calls[before:])) / n


def _generate_stages(model: Any, prompts: list[Any], estimators: Sequence[Any]
                     ) -> tuple[list[Samples], dict[str, float], dict[str, list[str]]]:
    """Shared generation, stage by stage; returns samples, seconds/query per stage,
    and the stages each estimator is charged."""
    from tqdm.auto import tqdm

    n = len(prompts)
    requests: list[tuple[Any, SampleRequest]] = [
        (e, r) for e in estimators if e.needs_generation for r in e.sample_requests()
    ]
    stages: dict[str, float] = {}
    charged: dict[str, list[str]] = {e.name: [] for e in estimators}
    used = [Samples(prompt=p) for p in prompts]
    merged = merge_requests([r for _, r in requests])
    by_key = {q.sampling.sampling_key(): q.sampling for q in merged if q.sampling is not None}
    plan = [("greedy" if q.sampling is None else
             f"sampling(T={q.sampling.temperature}, n={q.sampling.n})", q) for q in merged]
    for e, r in requests:
        if r.greedy and "greedy" not in charged[e.name]:
            charged[e.name].append("greedy")
        if r.sampling is not None:
            cfg = by_key[r.sampling.sampling_key()]
            label = f"sampling(T={cfg.temperature}, n={cfg.n})"
            if label not in charged[e.name]:
                charged[e.name].append(label)
    bar = tqdm(total=len(plan) + len(estimators), desc="edge generation stages", unit="stage")
    for label, req in plan:
        before = len(getattr(model, "calls", []))
        t0 = time.perf_counter()
        used = collect_samples(model, prompts, [req], existing=used)
        stages[label] = _stage_seconds(model, before, time.perf_counter() - t0, n)
        bar.update(1)
    for e in estimators:
        before = len(getattr(model, "calls", []))
        t0 = time.perf_counter()
        used = e.prepare_samples(used, model)
        wall = time.perf_counter() - t0
        made = len(getattr(model, "calls", [])) > before
        if made or wall > 0.05:
            label = f"follow-up({e.name})"
            stages[label] = _stage_seconds(model, before, wall, n)
            charged[e.name].append(label)
        bar.update(1)
    bar.close()
    return used, stages, charged


# ---------------------------------------------------------------- live evaluation


def _cached_equivalence(equivalence: Any, model: Any) -> Any:
    """The embedding backend with its vectors cached beside the generation cache.

    A re-run then re-clusters semantic-entropy samples without re-embedding them.
    Other backends, and models without an on-disk cache, are returned unchanged.
    """
    path = getattr(getattr(model, "cache", None), "path", None)
    if equivalence != "embedding" or not isinstance(path, str) or path == ":memory:":
        return equivalence
    from confroute.estimators.equivalence import EmbeddingEquivalence
    from confroute.predictive.embed import QueryEmbedder

    return EmbeddingEquivalence(embedder=QueryEmbedder(cache_path=f"{path}.embeddings.sqlite"))


def grade_answers(answers: Sequence[str], examples: Sequence[Example],
                  grader: GraderLike | None = None) -> np.ndarray:
    """Grade each answer against its example: the evaluation's per-example grading path.

    Parameters
    ----------
    answers : sequence of str, shape (n,)
    examples : sequence of Example, shape (n,)
    grader : str or callable, optional
        One grader for every example (a grader name, a question kind, or a
        callable, see :func:`confroute.grading.get_grader`); default: each
        example's own :attr:`~confroute.evaluation.Example.grader`.

    Returns
    -------
    ndarray of shape (n,)
        Qualities in [0, 1].
    """
    check_same_length("grade_answers", answers=answers, examples=examples)
    g = get_grader(grader) if grader is not None else None
    return np.array([ex.grade(a, g) for a, ex in zip(answers, examples)], dtype=float)


def _grader_label(grader: GraderLike | None, exs: Sequence[Example]) -> str:
    if grader is not None:
        return repr(get_grader(grader))
    return f"by example kind ({', '.join(sorted({str(ex.grader) for ex in exs}))})"


def _with_cloud(examples: Sequence[Example], cloud: Any) -> tuple[list[Example], int]:
    """The examples to evaluate and how many were dropped for a missing cloud answer."""
    exs = list(examples)
    if not exs:
        raise InvalidParameterError("The 'examples' parameter of evaluate is empty.")
    if cloud == ASSUME_CORRECT:
        return exs, 0
    if not isinstance(cloud, str):
        raise InvalidParameterError(
            f"The 'cloud' parameter of evaluate must be {ASSUME_CORRECT!r} or the name of "
            f"a recorded model. Got {cloud!r}."
        )
    kept = [ex for ex in exs if cloud in ex.recorded]
    if not kept:
        raise InvalidParameterError(
            f"The 'cloud' parameter of evaluate names a model no example has a recorded "
            f"answer of. Got {cloud!r}.")
    return kept, len(exs) - len(kept)


@dataclass
class _Generation:
    """The edge model's shared generation and every estimator's scores."""

    samples: list[Samples]
    stages: dict[str, float]
    charged: dict[str, list[str]]
    estimates: dict[str, Any]
    scoring_seconds: dict[str, float]


def _run_estimators(exs: Sequence[Example], model: Any, ests: Sequence[Any]) -> _Generation:
    from confroute.estimators import estimate_many

    prompts: list[Any] = [ex.prompt for ex in exs]
    samples, stages, charged = _generate_stages(model, prompts, ests)
    scoring_seconds: dict[str, float] = {}
    estimates: dict[str, Any] = {}
    for e in ests:
        t0 = time.perf_counter()
        got = estimate_many([e], prompts, model, samples=samples)
        scoring_seconds[e.name] = (time.perf_counter() - t0) / len(exs)
        estimates.update(got)
    return _Generation(samples, stages, charged, estimates, scoring_seconds)


@dataclass
class _Parts:
    """Graded qualities and the calibration/test split of a live evaluation."""

    edge_answers: list[str]
    edge_q: np.ndarray
    cloud_answers: list[str | None]
    cloud_q: np.ndarray
    is_cal: np.ndarray
    ti: np.ndarray
    ci: np.ndarray
    y_all: np.ndarray


def _grade_and_split(exs: Sequence[Example], gen: _Generation, cloud: Any,
                     grader: GraderLike | None, fraction: float, seed: int) -> _Parts:
    n = len(exs)
    edge_answers = [s.greedy.text if s.greedy is not None else "" for s in gen.samples]
    edge_q = grade_answers(edge_answers, exs, grader)
    if cloud == ASSUME_CORRECT:
        cloud_answers: list[str | None] = [None] * n
        cloud_q = np.ones(n)
    else:
        cloud_answers = [ex.recorded[cloud] for ex in exs]
        cloud_q = grade_answers([a or "" for a in cloud_answers], exs, grader)
    cal, _ = split(exs, fraction, seed=seed)
    cal_ids = {ex.id for ex in cal}
    is_cal = np.array([ex.id in cal_ids for ex in exs])
    return _Parts(edge_answers, edge_q, cloud_answers, cloud_q, is_cal,
                  np.flatnonzero(~is_cal), np.flatnonzero(is_cal), (edge_q >= 0.5).astype(int))


def _calibrated_probs(scores: np.ndarray, parts: _Parts) -> tuple[np.ndarray, np.ndarray, bool]:
    """Isotonic and Platt P(good) for every prompt, fitted on the calibration part."""
    from confroute.calibration import IsotonicCalibrator, PlattCalibrator

    n = len(scores)
    ci = parts.ci
    fit_ok = np.isfinite(scores[ci])
    yc = parts.y_all[ci][fit_ok]
    if fit_ok.sum() >= 2 and 0 < yc.sum() < len(yc):
        p_iso = IsotonicCalibrator().fit(scores[ci][fit_ok], yc).p_good(scores)
        p_platt = PlattCalibrator().fit(scores[ci][fit_ok], yc).p_good(scores)
        return p_iso, p_platt, True
    return np.full(n, np.nan), np.full(n, np.nan), False


def _naive_probs(conf_all: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """Min-max scaled confidence over the scored test prompts; NaN elsewhere."""
    p_naive = np.full(len(conf_all), np.nan)
    scored_t = ~np.isnan(conf_all[ti])
    if scored_t.any():
        tmp = np.full(len(ti), np.nan)
        tmp[scored_t] = _naive_prob(conf_all[ti][scored_t])
        p_naive[ti] = tmp
    return p_naive


def _test_metrics(conf_all: np.ndarray, probs: Mapping[str, np.ndarray], parts: _Parts,
                  n_boot: int) -> dict[str, Any]:
    ti = parts.ti
    conf_t = _fill_nan_conf(conf_all[ti])
    y_t, e_t, c_t = parts.y_all[ti], parts.edge_q[ti], parts.cloud_q[ti]
    m: dict[str, Any] = {}
    m["auroc"] = _ci(M.auroc, conf_t, y_t, n_boot=n_boot, seed=0)
    m["prr"] = _ci(M.prr, conf_t, e_t, n_boot=n_boot, seed=0)
    for label in ("naive", "isotonic", "platt"):
        p = probs[label]
        m[f"ece_{label}"] = _ci(_prob_metric("ece"), p[ti], y_t, n_boot=n_boot, seed=0)
        m[f"brier_{label}"] = _ci(_prob_metric("brier"), p[ti], y_t, n_boot=n_boot, seed=0)
    for which in ("cpt50", "cpt80", "apgr", "gain_captured"):
        m[which] = _ci(_curve_metric(which), conf_t, e_t, c_t, n_boot=n_boot, seed=0)
    return m


def _estimator_entry(name: str, gen: _Generation, parts: _Parts, n_boot: int
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One estimator's report entry and its naive/isotonic/Platt probabilities."""
    scores = gen.estimates[name].scores
    conf_all = -scores
    entry: dict[str, Any] = {
        "n_unscored": int(np.isnan(scores).sum()),
        "n_unscored_test": int(np.isnan(scores[parts.ti]).sum()),
        "edge_seconds_per_query": float(
            sum(gen.stages[s] for s in gen.charged[name]) + gen.scoring_seconds[name]),
        "generation_stages": gen.charged[name],
        "scoring_seconds_per_query": gen.scoring_seconds[name],
    }
    p_iso, p_platt, fitted = _calibrated_probs(scores, parts)
    entry["calibrated"] = fitted
    if not fitted:
        entry["calibration_note"] = (
            "calibration part has a single class or too few scored prompts; "
            "calibrators not fitted")
    probs = {"naive": _naive_probs(conf_all, parts.ti), "isotonic": p_iso, "platt": p_platt}
    entry["metrics"] = _test_metrics(conf_all, probs, parts, n_boot)
    return entry, probs


def _oracle_summary(parts: _Parts) -> dict[str, Any]:
    e_t, c_t = parts.edge_q[parts.ti], parts.cloud_q[parts.ti]
    fo, qo = M.oracle_curve(e_t, c_t)
    w, s = float(e_t.mean()), float(c_t.mean())
    return {"oracle_apgr": M.apgr(fo, qo, w, s) if w != s else math.nan,
            "oracle_cpt50": M.cpt(fo, qo, w, s, 50.0) if w != s else math.nan}


def _live_records(exs: Sequence[Example], gen: _Generation, parts: _Parts,
                  probs: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
    names = list(gen.estimates)
    return [
        {
            "id": ex.id, "part": "calibration" if parts.is_cal[i] else "test",
            "edge_answer": parts.edge_answers[i], "edge_quality": float(parts.edge_q[i]),
            "cloud_answer": parts.cloud_answers[i], "cloud_quality": float(parts.cloud_q[i]),
            "scores": {k: _num(gen.estimates[k].scores[i]) for k in names},
            "p_isotonic": {k: _num(probs[k]["isotonic"][i]) for k in names},
            "p_platt": {k: _num(probs[k]["platt"][i]) for k in names},
        }
        for i, ex in enumerate(exs)
    ]


def _live_plots(gen: _Generation, parts: _Parts, probs: Mapping[str, Mapping[str, np.ndarray]],
                out_dir: str | Path, dataset: str) -> None:
    from confroute.evaluation.plots import plot_reliability, plot_routing_curves

    ti = parts.ti
    e_t, c_t = parts.edge_q[ti], parts.cloud_q[ti]
    curves = {name: M.quality_vs_cloud_fraction(_fill_nan_conf(-est.scores[ti]), e_t, c_t)
              for name, est in gen.estimates.items()}
    plot_routing_curves(curves, M.oracle_curve(e_t, c_t), M.random_curve(e_t, c_t),
                        Path(out_dir) / "routing.png",
                        title=f"{dataset}: quality vs cloud-call fraction (test part)")
    rel = {name: (p["isotonic"][ti], p["naive"][ti], parts.y_all[ti])
           for name, p in probs.items()}
    plot_reliability(rel, Path(out_dir) / "reliability.png", title=dataset)


def _estimator_entries(gen: _Generation, parts: _Parts, n_boot: int
                       ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    per_est: dict[str, Any] = {}
    probs: dict[str, dict[str, np.ndarray]] = {}
    for name in gen.estimates:
        per_est[name], probs[name] = _estimator_entry(name, gen, parts, n_boot)
    return per_est, probs


def _live_header(*, dataset: str, model: Any, cloud: Any, grader: str, n_dropped: int,
                 parts: _Parts, calibration_fraction: float, split_seed: int, n_boot: int,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """What was evaluated, and how (the report's leading keys)."""
    return {
        "mode": "live",
        "dataset": dataset,
        "edge_model": str(getattr(model, "name", "?")),
        "cloud": cloud,
        "cloud_note": (
            "assume-correct: cloud quality is 1 for every query (selective-prediction view)"
            if cloud == ASSUME_CORRECT else f"recorded answers of {cloud}, graded like the edge"),
        "grader": grader,
        "n": len(parts.edge_q),
        "n_dropped_no_cloud_answer": n_dropped,
        "n_calibration": int(parts.is_cal.sum()),
        "n_test": len(parts.ti),
        "calibration_fraction": calibration_fraction,
        "split_seed": split_seed,
        "n_boot": n_boot,
        "settings": settings,
    }


def _live_report(head: dict[str, Any], gen: _Generation, parts: _Parts,
                 per_est: dict[str, Any], n_boot: int, t_start: float) -> dict[str, Any]:
    """The header followed by the measured results."""
    e_t, c_t = parts.edge_q[parts.ti], parts.cloud_q[parts.ti]
    return {
        **head,
        "edge_accuracy_test": _ci(np.mean, e_t, n_boot=n_boot, seed=0),
        "edge_accuracy_all": float(parts.edge_q.mean()),
        "cloud_quality_test": _ci(np.mean, c_t, n_boot=n_boot, seed=0),
        **_oracle_summary(parts),
        "generation_seconds_per_query": gen.stages,
        "estimators": per_est,
        "machine": machine_info(),
        "wall_seconds": time.perf_counter() - t_start,
    }


def evaluate(
    examples: Sequence[Example],
    model: Any,
    *,
    estimators: Any = "all",
    cloud: Any = ASSUME_CORRECT,
    calibration_fraction: float = 0.5,
    split_seed: int = 0,
    grader: GraderLike | None = None,
    n_boot: int = 1000,
    n_samples: int = 5,
    max_new_tokens: int = 32,
    equivalence: Any = "embedding",
    sampling_seed: int = 0,
    dataset: str = "dataset",
    out_dir: str | Path | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate uncertainty estimators and confidence routing with a live edge model.

    Parameters
    ----------
    examples : sequence of Example
        Questions with gold answers (kinds ``short``, ``number`` or ``choice``).
    model : LanguageModel
        The edge model; wrap it in :class:`~confroute.cache.CachedModel` to cache
        and resume.
    estimators : "all", comma-separated names, or sequence of names/estimators
        ``"all"`` is :func:`default_estimators`; a listed name of one of those
        takes its settings (``n_samples``, ``max_new_tokens``, ...).
    cloud : "assume-correct" or str
        ``"assume-correct"`` (cloud quality 1 everywhere), or the name of a model
        in the examples' ``recorded`` answers (examples without it are dropped).
    calibration_fraction : float in (0, 1)
        Expected share of examples (by id hash) used to fit the calibrators.
    split_seed : int
    grader : str or callable or None
        Grader for every example (see :func:`grade_answers`); None grades each
        example with its own grader (its dataset's kind: ``"contains"`` for short
        free-text answers, ``"number"``, ``"choice"``), as ``Router.calibrate``
        would with the same grader.
    n_boot : int
        Bootstrap resamples for the 95% intervals.
    n_samples, max_new_tokens, equivalence, sampling_seed
        Settings of the default estimators (sampling is seeded for replay).
    dataset : str
        Name shown in the report.
    out_dir : path or None
        Where to write ``report.json``, ``report.md``, ``records.jsonl`` and plots.
    plots : bool
        Write PNG plots (needs matplotlib).

    Returns
    -------
    dict
        The report (also written to ``out_dir/report.json``).
    """
    t_start = _check_live_args(grader, calibration_fraction, n_boot, n_samples, max_new_tokens)
    exs, n_dropped = _with_cloud(examples, cloud)
    kinds = sorted({ex.kind for ex in exs})
    ests = _resolve_estimators(
        estimators, kinds[0] if len(kinds) == 1 else "short", n_samples=n_samples,
        max_new_tokens=max_new_tokens, equivalence=_cached_equivalence(equivalence, model),
        seed=sampling_seed,
    )
    gen = _run_estimators(exs, model, ests)
    parts = _grade_and_split(exs, gen, cloud, grader, calibration_fraction, split_seed)
    per_est, probs = _estimator_entries(gen, parts, n_boot)
    head = _live_header(
        dataset=dataset, model=model, cloud=cloud, grader=_grader_label(grader, exs),
        n_dropped=n_dropped, parts=parts, calibration_fraction=calibration_fraction,
        split_seed=split_seed, n_boot=n_boot,
        settings={"n_samples": n_samples, "max_new_tokens": max_new_tokens,
                  "equivalence": str(equivalence), "sampling_seed": sampling_seed})
    report = _live_report(head, gen, parts, per_est, n_boot, t_start)
    if out_dir is not None:
        write_report(report, _live_records(exs, gen, parts, probs), out_dir)
        if plots:
            _live_plots(gen, parts, probs, out_dir, dataset)
    return report


def _check_live_args(grader: Any, calibration_fraction: Any, n_boot: Any, n_samples: Any,
                     max_new_tokens: Any) -> float:
    """Check :func:`evaluate`'s scalar arguments before any generation; returns the start time."""
    owner = "evaluate"
    if grader is not None:
        resolve_grader(grader, owner)
    check_float(calibration_fraction, "calibration_fraction", owner, min_value=0.0,
                max_value=1.0, min_inclusive=False, max_inclusive=False)
    check_int(n_boot, "n_boot", owner, min_value=0)
    check_int(n_samples, "n_samples", owner, min_value=1)
    check_int(max_new_tokens, "max_new_tokens", owner, min_value=1)
    return time.perf_counter()


def _num(x: Any) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v

# ---------------------------------------------------------------- recorded pair


def evaluate_pair(
    examples: Sequence[Example],
    edge: str,
    cloud: str,
    *,
    grader: GraderLike | None = None,
    n_boot: int = 1000,
    dataset: str = "dataset",
    out_dir: str | Path | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Routing frame for two recorded models (no live model).

    Both models' recorded answers are graded; examples where either is missing
    are dropped (counted). Reports each model's quality, the oracle and random
    routing curves, the oracle's APGR and CPT, and the win/tie/loss table.

    Parameters
    ----------
    examples : sequence of Example
    edge, cloud : str
        Names in ``Example.recorded``.
    grader, n_boot, dataset, out_dir, plots
        As in :func:`evaluate`.
    """
    t_start = time.perf_counter()
    all_ex = list(examples)
    exs = [ex for ex in all_ex if edge in ex.recorded and cloud in ex.recorded]
    if not exs:
        raise InvalidParameterError(
            f"No example has recorded answers of both {edge!r} and {cloud!r}.")
    e = grade_answers([ex.recorded[edge] for ex in exs], exs, grader)
    c = grade_answers([ex.recorded[cloud] for ex in exs], exs, grader)
    fo, qo = M.oracle_curve(e, c)
    fr, qr = M.random_curve(e, c)
    w, s = float(e.mean()), float(c.mean())
    report: dict[str, Any] = {
        "mode": "recorded_pair",
        "dataset": dataset,
        "edge_model": edge,
        "cloud": cloud,
        "n": len(exs),
        "n_dropped_missing_answer": len(all_ex) - len(exs),
        "n_boot": n_boot,
        "edge_quality": _ci(np.mean, e, n_boot=n_boot, seed=0),
        "cloud_quality": _ci(np.mean, c, n_boot=n_boot, seed=0),
        "both_right": int(((e >= 0.5) & (c >= 0.5)).sum()),
        "only_edge_right": int(((e >= 0.5) & (c < 0.5)).sum()),
        "only_cloud_right": int(((e < 0.5) & (c >= 0.5)).sum()),
        "both_wrong": int(((e < 0.5) & (c < 0.5)).sum()),
        "oracle_quality": float(qo.max()),
        "oracle_apgr": M.apgr(fo, qo, w, s) if w != s else math.nan,
        "oracle_cpt50": M.cpt(fo, qo, w, s, 50.0) if w != s else math.nan,
        "oracle_cpt80": M.cpt(fo, qo, w, s, 80.0) if w != s else math.nan,
        "random_apgr": M.apgr(fr, qr, w, s) if w != s else math.nan,
        "random_cpt50": M.cpt(fr, qr, w, s, 50.0) if w != s else math.nan,
        "random_cpt80": M.cpt(fr, qr, w, s, 80.0) if w != s else math.nan,
        "machine": machine_info(),
    }
    stored = [ex.meta.get("is_correct") for ex in exs]
    if all(isinstance(x, Mapping) and edge in x and cloud in x for x in stored):
        agree_e = np.mean([float(bool(x[edge])) == v for x, v in zip(stored, e)])  # type: ignore[index]
        agree_c = np.mean([float(bool(x[cloud])) == v for x, v in zip(stored, c)])  # type: ignore[index]
        report["agreement_with_stored_is_correct"] = {"edge": float(agree_e),
                                                      "cloud": float(agree_c)}
    report["wall_seconds"] = time.perf_counter() - t_start
    records = [{"id": ex.id, "edge_answer": ex.recorded[edge], "edge_quality": float(ei),
                "cloud_answer": ex.recorded[cloud], "cloud_quality": float(cj)}
               for ex, ei, cj in zip(exs, e, c)]
    if out_dir is not None:
        write_report(report, records, out_dir)
        if plots:
            from confroute.evaluation.plots import plot_routing_curves

            plot_routing_curves({}, (fo, qo), (fr, qr), Path(out_dir) / "routing.png",
                                title=f"{dataset}: {edge} -> {cloud}")
    return report


# ---------------------------------------------------------------- output


def machine_info() -> dict[str, Any]:
    """CPU count, platform and Python of the machine running the evaluation."""
    import os

    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _fmt(m: Mapping[str, float] | float | None, digits: int = 3) -> str:
    if m is None:
        return "n/a"
    if isinstance(m, Mapping):
        v, lo, hi = m["value"], m["low"], m["high"]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if lo is None or math.isnan(lo):
            return f"{v:.{digits}f}"
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    if isinstance(m, float) and math.isnan(m):
        return "n/a"
    return f"{float(m):.{digits}f}"


def markdown_report(report: Mapping[str, Any]) -> str:
    """A Markdown summary (tables) of a report from :func:`evaluate` or :func:`evaluate_pair`."""
    lines = [f"### {report['dataset']}", ""]
    if report["mode"] == "recorded_pair":
        lines += [
            f"Recorded pair: edge = `{report['edge_model']}`, cloud = `{report['cloud']}`; "
            f"n = {report['n']} ({report['n_dropped_missing_answer']} dropped for a missing "
            "answer). Brackets: bootstrap 95% intervals.", "",
            "| edge quality | cloud quality | oracle quality | both right | only edge | "
            "only cloud | both wrong |",
            "|---|---|---|---|---|---|---|",
            f"| {_fmt(report['edge_quality'])} | {_fmt(report['cloud_quality'])} | "
            f"{_fmt(report['oracle_quality'])} | {report['both_right']} | "
            f"{report['only_edge_right']} | {report['only_cloud_right']} | "
            f"{report['both_wrong']} |", "",
            "| router | CPT(50%) | CPT(80%) | APGR |", "|---|---|---|---|",
            f"| random | {_fmt(report['random_cpt50'])} | {_fmt(report['random_cpt80'])} | "
            f"{_fmt(report['random_apgr'])} |",
            f"| oracle | {_fmt(report['oracle_cpt50'])} | {_fmt(report['oracle_cpt80'])} | "
            f"{_fmt(report['oracle_apgr'])} |", "",
        ]
        if "agreement_with_stored_is_correct" in report:
            a = report["agreement_with_stored_is_correct"]
            lines += [f"Our grading agrees with the file's stored `is_correct` on "
                      f"{a['edge']:.1%} (edge) and {a['cloud']:.1%} (cloud) of questions.", ""]
        return "\n".join(lines)
    lines += [
        f"Edge model `{report['edge_model']}`; cloud: {report['cloud_note']}. "
        f"n = {report['n']} questions: {report['n_calibration']} calibration, "
        f"{report['n_test']} test (split by id hash, seed {report['split_seed']}). "
        f"Grader: {report['grader']}. Edge accuracy on the test part "
        f"{_fmt(report['edge_accuracy_test'])}; cloud quality {_fmt(report['cloud_quality_test'])}."
        f" Sampling: N = {report['settings']['n_samples']}, max_new_tokens = "
        f"{report['settings']['max_new_tokens']}, equivalence = "
        f"{report['settings']['equivalence']}. Brackets: bootstrap 95% intervals "
        f"({report['n_boot']} resamples of the test part).", "",
        "| estimator | AUROC | PRR | ECE naive | ECE isotonic | ECE Platt | Brier isotonic | "
        "CPT(50%) | CPT(80%) | APGR | oracle gain captured | edge s/query | unscored |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ent in report["estimators"].items():
        m = ent["metrics"]
        lines.append(
            f"| {name} | {_fmt(m['auroc'])} | {_fmt(m['prr'])} | {_fmt(m['ece_naive'])} | "
            f"{_fmt(m['ece_isotonic'])} | {_fmt(m['ece_platt'])} | {_fmt(m['brier_isotonic'])} | "
            f"{_fmt(m['cpt50'])} | {_fmt(m['cpt80'])} | {_fmt(m['apgr'])} | "
            f"{_fmt(m['gain_captured'])} | {ent['edge_seconds_per_query']:.2f} | "
            f"{ent['n_unscored']} |"
        )
    lines += ["", f"Oracle APGR {_fmt(report['oracle_apgr'])}, oracle CPT(50%) "
              f"{_fmt(report['oracle_cpt50'])}. Generation seconds per query by stage: "
              + ", ".join(f"{k} {v:.2f}" for k, v in report["generation_seconds_per_query"].items())
              + ".", ""]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_report(report: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                 out_dir: str | Path) -> Path:
    """Write ``report.json`` (NaN as null), ``report.md`` and ``records.jsonl`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    owner = "write_report"
    write_atomic(out / "records.jsonl", "".join(
        json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in records), owner=owner)
    write_atomic(out / "report.md", markdown_report(report), owner=owner)
    # the report last: its presence means the whole run was written
    write_atomic(out / "report.json", json.dumps(_jsonable(report), indent=2), owner=owner)
    return out
