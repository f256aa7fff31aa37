"""End-to-end evaluation harness on a tiny in-process model and written dataset excerpts."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confroute.cache import CachedModel, GenerationCache
from confroute.evaluation import metrics as M
from confroute.evaluation.datasets import Example, load_nq_open
from confroute.evaluation.harness import evaluate
from confroute.grading import BaseGrader
from confroute.types import GenerationConfig, Prompt, Sample

QUESTIONS = [
    ("who wrote hamlet", ["William Shakespeare", "Shakespeare"]),
    ("what is the capital of france", ["Paris"]),
    ("what is the capital of italy", ["Rome"]),
    ("how many legs does a spider have", ["eight", "8"]),
    ("what is two plus two", ["four", "4"]),
]


def _nq_rows(n: int = 30) -> list[dict[str, Any]]:
    return [{"question": f"{q} ({i})", "answer": a}
            for i, (q, a) in enumerate(QUESTIONS[k % len(QUESTIONS)] for k in range(n))]


class ParityGrader(BaseGrader):
    """Deterministic stand-in for correctness on a random tiny model (both classes occur)."""

    def grade(self, prediction: str, example: Example) -> float:
        return float(sum(map(ord, prediction + example.id)) % 3 == 0)


class Counting:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = "tiny-llama"
        self.batch_size = 8
        self.n_calls = 0

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig
                 ) -> list[list[Sample]]:
        self.n_calls += 1
        return list(self.inner.generate(prompts, config))


@pytest.fixture(scope="module")
def lm(tiny_llama):  # type: ignore[no-untyped-def]
    from confroute.models.hf import HFLanguageModel

    model, tok = tiny_llama
    return HFLanguageModel(model, tok, device="cpu", name="tiny-llama")


REFERENCE = Path(__file__).parent / "data" / "harness_tiny_reference.json"
TIMING = ("machine", "wall_seconds", "generation_seconds_per_query")


def _summary(x: Any) -> Any:
    """The report without timings and machine facts, NaN as None (as in report.json)."""
    if isinstance(x, dict):
        return {k: _summary(v) for k, v in x.items() if k not in TIMING and "seconds" not in k}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# float log-probabilities of the tiny model move by ~1e-5 with the torch state other
# tests leave behind; their ECE can then flip a point across a bin edge
NOISY = ("sequence_logprob", "mean_token_entropy")


def _assert_matches_reference(report: dict[str, Any]) -> None:
    """Same keys (in order) and values as the pre-split harness gave on this run.

    ``data/harness_tiny_reference.json`` was written by ``evaluate`` before it was
    split into small functions (same tiny model, rows, grader and settings as
    :func:`_run`). Scores from sampled text (semantic entropy, self-consistency,
    verbalized) agree to 1e-9; for the log-probability estimators (:data:`NOISY`),
    whose min-max scaled "naive" probabilities amplify that noise, to 1e-2, and ECE
    (discontinuous in the scores) is not compared. Run alone, all values agree up to rounding.
    A change of the tiny model's generations also fails here.
    """
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    got = _summary(report)
    bad: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict):
            if list(a) != list(b):
                bad.append(f"{path}: keys {list(a)} != {list(b)}")
                return
            for k in a:
                walk(a[k], b[k], f"{path}/{k}")
            return
        noisy = any(f"/{n}/" in path for n in NOISY)
        if noisy and "/ece_" in path:
            return
        tol = 1e-2 if noisy else 1e-9
        if isinstance(a, float) and isinstance(b, float):
            if b != pytest.approx(a, rel=tol, abs=tol):
                bad.append(f"{path}: {a} != {b}")
        elif a != b:
            bad.append(f"{path}: {a!r} != {b!r}")

    walk(ref, got, "")
    assert not bad, "\n".join(bad)


def _run(lm: Any, data: Path, out: Path, cache: Path) -> tuple[dict[str, Any], Counting, float]:
    counting = Counting(lm)
    model = CachedModel(counting, GenerationCache(cache))
    t0 = time.perf_counter()
    report = evaluate(
        load_nq_open(data), model, estimators="all", cloud="assume-correct",
        grader=ParityGrader(), n_samples=3, max_new_tokens=6, equivalence="exact",
        n_boot=30, dataset="nq-excerpt", out_dir=out,
    )
    return report, counting, time.perf_counter() - t0


def test_end_to_end_report_matches_records_and_cache(lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "nq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _nq_rows()), encoding="utf-8")
    out = tmp_path / "run1"
    report, counting, _ = _run(lm, data, out, tmp_path / "cache.sqlite")
    assert counting.n_calls > 0
    _assert_matches_reference(report)
    for f in ("report.json", "report.md", "records.jsonl", "routing.png", "reliability.png"):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == saved["n"] == 30
    assert saved["n_calibration"] + saved["n_test"] == 30
    test = [r for r in records if r["part"] == "test"]
    assert len(test) == saved["n_test"]
    e = np.array([r["edge_quality"] for r in test])
    c = np.array([r["cloud_quality"] for r in test])
    assert np.all(c == 1.0)
    assert saved["edge_accuracy_test"]["value"] == pytest.approx(e.mean())
    assert set(saved["estimators"]) == {"sequence_logprob", "mean_token_entropy",
                                        "semantic_entropy", "self_consistency", "verbalized"}
    for name, ent in saved["estimators"].items():
        raw = np.array([np.nan if r["scores"][name] is None else r["scores"][name] for r in test])
        conf = -raw
        if np.isnan(conf).any():
            conf[np.isnan(conf)] = np.nanmin(conf) - 1.0 if (~np.isnan(conf)).any() else 0.0
        m = ent["metrics"]
        if m["auroc"]["value"] is not None:
            assert m["auroc"]["value"] == pytest.approx(M.auroc(conf, e))
            lo, hi = m["auroc"]["low"], m["auroc"]["high"]
            assert lo is None or lo <= hi
        f, q = M.quality_vs_cloud_fraction(conf, e, c)
        assert m["apgr"]["value"] == pytest.approx(M.apgr(f, q, e.mean(), c.mean()))
        assert m["cpt50"]["value"] == pytest.approx(M.cpt(f, q, e.mean(), c.mean(), 50.0))
        if ent["calibrated"]:
            p = np.array([np.nan if r["p_isotonic"][name] is None else r["p_isotonic"][name]
                          for r in test])
            ok = ~np.isnan(p)
            assert m["ece_isotonic"]["value"] == pytest.approx(M.ece(p[ok], e[ok]))
            assert m["brier_isotonic"]["value"] == pytest.approx(M.brier(p[ok], e[ok]))
        assert ent["edge_seconds_per_query"] >= 0.0
        assert ent["n_unscored"] == sum(r["scores"][name] is None for r in records)
    # generation was shared: one greedy call plus one sampling setting plus one follow-up
    assert "greedy" in saved["generation_seconds_per_query"]
    assert saved["estimators"]["semantic_entropy"]["generation_stages"] == \
        saved["estimators"]["self_consistency"]["generation_stages"]
    md = (out / "report.md").read_text()
    assert "assume-correct" in md and "| semantic_entropy |" in md

    # second run from the same cache: zero model calls, same numbers (how much faster
    # that is belongs to the benchmarks, not to a timed unit test)
    report2, counting2, _ = _run(lm, data, tmp_path / "run2", tmp_path / "cache.sqlite")
    assert counting2.n_calls == 0
    _assert_matches_reference(report2)
    for name in saved["estimators"]:
        a = report["estimators"][name]["metrics"]["apgr"]["value"]
        b = report2["estimators"][name]["metrics"]["apgr"]["value"]
        assert (math.isnan(a) and math.isnan(b)) or a == b
        # compute cost is read from the cache, so it is reported the same
        assert report2["generation_seconds_per_query"] == report["generation_seconds_per_query"]


GSM_ROWS = [
    ("Tom has 3 apples and buys 4. How many?", 7, (7, True), (7, True)),
    ("A pen costs 2 dollars. Cost of 5 pens?", 10, (12, False), (10, True)),
    ("Half of 18?", 9, (9, True), (8, False)),
    ("12 minus 5?", 7, (6, False), (7, True)),
    ("3 times 3?", 9, (6, False), (5, False)),
    ("100 divided by 4?", 25, (25, True), (25, True)),
]


def test_recorded_pair_from_cli(tmp_path: Path) -> None:
    from confroute.cli import main

    path = tmp_path / "example_model_solutions.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for q, gold, (a6, ok6), (a175, ok175) in GSM_ROWS:
            f.write(json.dumps({
                "question": q, "ground_truth": f"Work.\nA: {gold}",
                "6b_finetuning": {"is_correct": ok6, "solution": f"Steps.\nA: {a6}"},
                "175b_finetuning": {"is_correct": ok175, "solution": f"Steps.\nA: {a175}"},
            }) + "\n")
    out = tmp_path / "pair"
    rc = main(["evaluate", "--dataset", "gsm8k_solutions", "--path", str(path),
               "--edge", "recorded:6b_finetuning", "--cloud", "recorded:175b_finetuning",
               "--out", str(out), "--n-boot", "50"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    e = np.array([ok for *_, (_, ok), _ in GSM_ROWS], dtype=float)
    c = np.array([ok for *_, (_, ok) in GSM_ROWS], dtype=float)
    assert rep["n"] == 6
    assert rep["edge_quality"]["value"] == pytest.approx(e.mean())
    assert rep["cloud_quality"]["value"] == pytest.approx(c.mean())
    assert rep["oracle_quality"] == pytest.approx(np.maximum(e, c).mean())
    assert (rep["both_right"], rep["only_edge_right"], rep["only_cloud_right"],
            rep["both_wrong"]) == (2, 1, 2, 1)
    fo, qo = M.oracle_curve(e, c)
    assert rep["oracle_apgr"] == pytest.approx(M.apgr(fo, qo, e.mean(), c.mean()))
    assert rep["random_apgr"] == pytest.approx(0.5)
    assert rep["agreement_with_stored_is_correct"] == {"edge": 1.0, "cloud": 1.0}
    assert (out / "routing.png").stat().st_size > 0
    assert "Recorded pair" in (out / "report.md").read_text()


def test_cli_rejects_bad_cloud(tmp_path: Path) -> None:
    from confroute.cli import main

    rc = main(["evaluate", "--dataset", "arithmetic", "--limit", "7", "--edge",
               "recorded:x", "--cloud", "gpt", "--out", str(tmp_path)])
    assert rc == 2


# ---------------------------------------------------------------- default grading


def test_cli_evaluate_without_grader_grades_short_answers_by_containment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``confroute evaluate`` on NQ-open without --grader uses each example's grader,
    "contains" for short answers: the same verdicts as Router.calibrate's default and
    as evaluate-report (which graded NQ with "contains"), not exact match."""
    from confroute.cli import main
    from confroute.grading import resolve_grader
    from tests.fault_server import FaultServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # the server answers every question "The answer is 0": a sentence holding the alias
    # "answer" (containment, not exact match), or not holding "Paris"
    rows = [{"question": f"question {i}", "answer": ["answer"] if i % 3 else ["Paris"]}
            for i in range(12)]
    data = tmp_path / "nq_excerpt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    acc: dict[str | None, float] = {}
    with FaultServer() as srv:
        for grader in (None, "contains", "exact"):
            out = tmp_path / str(grader)
            extra = [] if grader is None else ["--grader", grader]
            assert main(["evaluate", "--dataset", "nq_open", "--path", str(data), "--edge",
                         f"openai:test-model@{srv.base_url}", "--estimators", "sequence_logprob",
                         "--max-new-tokens", "8", "--n-boot", "10", "--no-plots",
                         "--out", str(out), *extra]) == 0
            acc[grader] = json.loads((out / "report.json").read_text())["edge_accuracy_all"]
    records = [json.loads(x) for x in (tmp_path / "None" / "records.jsonl").read_text()
               .splitlines()]
    calibrate_grade = resolve_grader("contains", "Router.calibrate")
    by_calibrate = np.mean([calibrate_grade(r["edge_answer"], rows[i]["answer"])
                            for i, r in enumerate(records)])
    assert acc[None] == acc["contains"] == pytest.approx(by_calibrate) == pytest.approx(8 / 12)
    assert acc["exact"] == 0.0
