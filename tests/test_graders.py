from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.evaluation.datasets import Example
from confroute.evaluation.graders import (
    ChoiceGrader,
    ExactMatchGrader,
    NumericGrader,
    get_grader,
)

NQ = Example(id="nq-0", prompt="p", gold=("William Shakespeare", "Shakespeare"), kind="short")
NUM = Example(id="g-0", prompt="p", gold=("1200",), kind="number")
MC = Example(id="m-0", prompt="p", gold=("C",), kind="choice",
             choices=("Paris", "Rome", "Berlin", "Madrid"))


@pytest.mark.parametrize(
    "pred, contain, expected",
    [
        ("Shakespeare", False, 1.0),
        ("  the SHAKESPEARE.", False, 1.0),
        ("William  Shakespeare!", False, 1.0),
        ("Answer: Shakespeare. He wrote it in 1600.", False, 1.0),
        ("It was William Shakespeare, of course", False, 0.0),
        ("It was William Shakespeare, of course", True, 1.0),
        ("Shakespeares", True, 0.0),  # whole-word containment only
        ("Marlowe", True, 0.0),
        ("", True, 0.0),
    ],
)
def test_exact_match(pred, contain, expected):
    assert ExactMatchGrader(containment=contain).grade(pred, NQ) == expected


@pytest.mark.parametrize(
    "pred, expected",
    [("The total is 1,200 dollars.", 1.0), ("#### 1200\nthen 5", 1.0), ("A: 1200.0", 1.0),
     ("about 1199", 0.0), ("no number", 0.0), ("$1,200.00", 1.0)],
)
def test_numeric(pred, expected):
    assert NumericGrader().grade(pred, NUM) == expected


def test_numeric_tolerance():
    ex = Example(id="x", prompt="p", gold=("0.3333333",), kind="number")
    assert NumericGrader(rel_tol=1e-6).grade("1/3 = 0.33333333", ex) == 1.0
    assert NumericGrader(rel_tol=0.0).grade("0.3333334", ex) == 0.0


@pytest.mark.parametrize(
    "pred, expected",
    [("C", 1.0), (" C", 1.0), ("The answer is (C).", 1.0), ("Berlin", 1.0), ("B", 0.0),
     ("This", 0.0), ("A or C", 0.0)],
)
def test_choice(pred, expected):
    assert ChoiceGrader().grade(pred, MC) == expected


def test_choice_multiple_gold_and_empty_gold():
    two = Example(id="x", prompt="p", gold=("B", "D"), kind="choice", choices=("a", "b", "c", "d"))
    none = Example(id="y", prompt="p", gold=(), kind="choice", choices=("a", "b", "c", "d"))
    g = ChoiceGrader()
    assert [g.grade(x, two) for x in "ABCD"] == [0.0, 1.0, 0.0, 1.0]
    assert [g.grade(x, none) for x in "ABCD"] == [0.0] * 4


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_scores_are_in_unit_interval(text):
    for grader, ex in [(ExactMatchGrader(containment=True), NQ), (NumericGrader(), NUM),
                       (ChoiceGrader(), MC)]:
        assert grader.grade(text, ex) in (0.0, 1.0)


def test_grade_many_and_registry():
    g = get_grader("number")
    np.testing.assert_array_equal(g.grade_many(["1200", "7"], [NUM, NUM]), [1.0, 0.0])
    assert isinstance(get_grader("short"), ExactMatchGrader)
    assert get_grader("contains").containment is True
    assert isinstance(get_grader("choice"), ChoiceGrader)
    assert get_grader(g) is g


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: get_grader("bleu"), InvalidParameterError, "'kind_or_name'.*'choice'"),
        (lambda: get_grader("open"), InvalidParameterError, "judge"),
        (lambda: get_grader(3), InvalidTypeError, "'kind_or_name'"),
        (lambda: NumericGrader(rel_tol=-1), InvalidParameterError, "'rel_tol'"),
        (lambda: ExactMatchGrader(containment="yes"), InvalidTypeError, "'containment'"),
        (lambda: ChoiceGrader().grade(None, MC), InvalidTypeError, "'prediction'"),
        (lambda: ChoiceGrader().grade("A", {"gold": "A"}), InvalidTypeError, "'example'"),
        (lambda: NumericGrader().grade_many(["1"], [NUM, NUM]), InvalidParameterError,
         "same length"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
