"""Calibration-time and evaluation-time grading give the same verdict on a shared corpus.

Calibration grades through :func:`confroute.grading.resolve_grader` (what
``Router.calibrate`` calls with its ``grader``); evaluation grades through the
harness's per-example path (:func:`confroute.evaluation.harness.grade_answers`
with each example's own grader, and :func:`evaluate_pair` end to end). Each
dataset kind's default grader is the calibrate-time grader of the same name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from confroute.evaluation.datasets import Example
from confroute.evaluation.harness import evaluate_pair, grade_answers
from confroute.grading import KIND_GRADERS, resolve_grader

# (answer, references, kind, expected verdict)
CORPUS: list[tuple[str, list[str], str, float]] = [
    # short free text: alias containment
    ("Answer: 42", ["42"], "short", 1.0),
    ("42", ["42"], "short", 1.0),
    ("The answer is Paris.", ["Paris"], "short", 1.0),
    ("It was William Shakespeare, in about 1600.", ["William Shakespeare", "Shakespeare"],
     "short", 1.0),
    ("I believe the Beatles recorded it.", ["The Beatles", "Beatles"], "short", 1.0),
    ("  PARIS!  ", ["paris"], "short", 1.0),
    ("Final answer: the United States", ["United States of America", "United States"],
     "short", 1.0),
    ("Rome is the capital.", ["Paris"], "short", 0.0),
    ("Shakespeares sonnets", ["Shakespeare"], "short", 0.0),  # whole words only
    ("4200", ["42"], "short", 0.0),
    ("", ["42"], "short", 0.0),
    ("anything", [], "short", 0.0),
    # numbers: the final number, numerically
    ("The answer is 3.0", ["3"], "number", 1.0),
    ("3", ["3.0"], "number", 1.0),
    ("Step 1: 2 + 2 = 4.\n#### 1,200", ["1200"], "number", 1.0),
    ("It costs $1,200.00 in total.", ["1200"], "number", 1.0),
    ("First 3, then 4, so 4", ["3"], "number", 0.0),  # the last number counts
    ("about 1199", ["1200"], "number", 0.0),
    ("no idea", ["3"], "number", 0.0),
    ("-7 degrees", ["-7"], "number", 1.0),
    # multiple choice: the letter committed to
    ("C", ["C"], "choice", 1.0),
    ("The answer is (C).", ["C"], "choice", 1.0),
    ("Answer: d", ["D"], "choice", 1.0),
    ("B. Rome", ["C"], "choice", 0.0),
    ("A or C", ["C"], "choice", 0.0),  # ambiguous
    ("The answer is a bit unclear", ["A"], "choice", 0.0),
    ("(B)", ["B", "D"], "choice", 1.0),
]


def _example(i: int, refs: list[str], kind: str) -> Example:
    return Example(id=f"q{i}", prompt=f"question {i}", gold=tuple(refs), kind=kind)


@pytest.mark.parametrize("i", range(len(CORPUS)))
def test_calibrate_and_evaluation_verdicts_agree(i: int) -> None:
    answer, refs, kind, expected = CORPUS[i]
    at_calibration = resolve_grader(KIND_GRADERS[kind], "Router.calibrate")(answer, refs)
    at_evaluation = grade_answers([answer], [_example(i, refs, kind)])[0]
    assert at_calibration == at_evaluation == expected


def test_explicit_grader_names_agree_too() -> None:
    exs = [_example(i, refs, kind) for i, (_, refs, kind, _) in enumerate(CORPUS)]
    answers = [a for a, *_ in CORPUS]
    for name in ("contains", "exact", "number", "choice"):
        g = resolve_grader(name)
        np.testing.assert_array_equal(grade_answers(answers, exs, name),
                                      [g(a, list(ex.references)) for a, ex in zip(answers, exs)])


def test_evaluate_pair_records_the_same_verdicts(tmp_path: Path) -> None:
    """End to end through the harness: the corpus answers as a recorded edge model."""
    exs = [Example(id=f"q{i}", prompt=f"question {i}", gold=tuple(refs), kind=kind,
                   recorded={"edge": answer, "cloud": refs[0] if refs else ""})
           for i, (answer, refs, kind, _) in enumerate(CORPUS)]
    evaluate_pair(exs, "edge", "cloud", n_boot=10, out_dir=tmp_path, plots=False)
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["edge_quality"] for r in records] == [expected for *_, expected in CORPUS]
    assert [r["edge_quality"] for r in records] == [
        resolve_grader(KIND_GRADERS[kind])(answer, refs) for answer, refs, kind, _ in CORPUS]
