"""The one grading module: plain graders, grader objects, the registry, Example grading."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import confroute.evaluation as ev
from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.evaluation.datasets import Example
from confroute.grading import (
    DEFAULT_GRADER,
    GRADERS,
    KIND_GRADERS,
    BaseGrader,
    ChoiceGrader,
    ExactMatchGrader,
    NumericGrader,
    get_grader,
    grade_choice,
    grade_contains,
    grade_exact,
    grade_number,
    grader_for_kind,
    grader_names,
    resolve_grader,
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
    plain = grade_contains if contain else grade_exact
    assert plain(pred, NQ.references) == expected


def test_answer_prefix_is_stripped_by_exact_and_contains():
    # the two graders used to disagree on this pair (calibrate 0, evaluation 1)
    for g in (grade_exact, grade_contains, resolve_grader("exact"), resolve_grader("contains")):
        assert g("Answer: 42", ["42"]) == 1.0
        assert g("The answer is 42.", ["42"]) == 1.0
    assert grade_exact("The answer is 420", ["42"]) == 0.0


def test_empty_references_never_match():
    for g in GRADERS.values():
        assert g("anything", []) == 0.0
        assert g("", [""]) == 0.0


@pytest.mark.parametrize(
    "pred, expected",
    [("The total is 1,200 dollars.", 1.0), ("#### 1200\nthen 5", 1.0), ("A: 1200.0", 1.0),
     ("about 1199", 0.0), ("no number", 0.0), ("$1,200.00", 1.0)],
)
def test_numeric(pred, expected):
    assert NumericGrader().grade(pred, NUM) == expected
    assert grade_number(pred, ["1200"]) == expected


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
    assert MC.grade(pred) == expected


def test_choice_option_text_needs_the_options():
    assert grade_choice("Berlin", ["C"]) == 0.0
    assert grade_choice("Berlin", ["C"], letters="ABCD", choices=MC.choices) == 1.0
    assert ChoiceGrader(letters="ABCD", choices=MC.choices)("berlin", ["c"]) == 1.0


def test_choice_multiple_gold_and_empty_gold():
    two = Example(id="x", prompt="p", gold=("B", "D"), kind="choice", choices=("a", "b", "c", "d"))
    none = Example(id="y", prompt="p", gold=(), kind="choice", choices=("a", "b", "c", "d"))
    g = ChoiceGrader()
    assert [g.grade(x, two) for x in "ABCD"] == [0.0, 1.0, 0.0, 1.0]
    assert [g.grade(x, none) for x in "ABCD"] == [0.0] * 4


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3))
def test_scores_are_in_unit_interval(text, refs):
    for name in grader_names():
        assert resolve_grader(name)(text, refs) in (0.0, 1.0)
    for grader, ex in [(ExactMatchGrader(containment=True), NQ), (NumericGrader(), NUM),
                       (ChoiceGrader(), MC)]:
        assert grader.grade(text, ex) in (0.0, 1.0)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3))
def test_contains_accepts_everything_exact_accepts(text, refs):
    assert grade_contains(text, refs) >= grade_exact(text, refs)


def test_registry_kinds_and_default():
    assert DEFAULT_GRADER == "contains" == KIND_GRADERS["short"]
    assert grader_for_kind("short") == "contains"
    assert grader_for_kind("number") == "number"
    assert grader_for_kind("choice") == "choice"
    assert resolve_grader("exact_match") is GRADERS["exact"]
    assert resolve_grader("numeric") is GRADERS["number"]
    assert get_grader("short") is GRADERS["contains"]
    assert get_grader("contains").containment is True  # type: ignore[attr-defined]
    assert isinstance(get_grader("choice"), ChoiceGrader)

    def fn(answer, references):
        return 1.0

    assert resolve_grader(fn) is fn and get_grader(fn) is fn


def test_examples_carry_references_and_their_kind_grader():
    assert NQ.references == NQ.gold and NQ.grader == "contains"
    assert NUM.grader == "number" and MC.grader == "choice"
    assert Example(id="o", prompt="p", gold=(), kind="open").grader is None
    exact = Example(id="e", prompt="p", gold=("Paris",), kind="short", grader="exact")
    assert exact.grade("It is Paris.") == 0.0 and NQ.grade("It was Shakespeare.") == 1.0
    assert exact.grade("It is Paris.", "contains") == 1.0
    assert exact.grade("x", lambda a, r: 0.5) == 0.5


def test_grade_many_and_evaluation_reexports():
    g = get_grader("number")
    assert isinstance(g, BaseGrader)
    np.testing.assert_array_equal(g.grade_many(["1200", "7"], [NUM, NUM]), [1.0, 0.0])
    assert ev.Grader is BaseGrader and ev.ExactMatchGrader is ExactMatchGrader
    assert ev.get_grader is get_grader and ev.NumericGrader is NumericGrader
    assert repr(ExactMatchGrader(containment=True)) == "ExactMatchGrader(containment=True)"


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: get_grader("bleu"), InvalidParameterError, "'kind_or_name'.*'choice'"),
        (lambda: get_grader("open"), InvalidParameterError, "judge"),
        (lambda: get_grader(3), InvalidTypeError, "'kind_or_name'"),
        (lambda: resolve_grader("fuzzy", "Router.calibrate"), InvalidParameterError,
         "'grader' parameter of Router.calibrate.*'contains'.*Got 'fuzzy'"),
        (lambda: resolve_grader(None), InvalidTypeError, "'grader'"),
        (lambda: grader_for_kind("essay"), InvalidParameterError, "'kind'.*'short'"),
        (lambda: NumericGrader(rel_tol=-1), InvalidParameterError, "'rel_tol'"),
        (lambda: ExactMatchGrader(containment="yes"), InvalidTypeError, "'containment'"),
        (lambda: ChoiceGrader(letters="a1"), InvalidParameterError, "'letters'"),
        (lambda: ChoiceGrader(choices="ABC"), InvalidTypeError, "'choices'"),
        (lambda: ChoiceGrader().grade(None, MC), InvalidTypeError, "'prediction'"),
        (lambda: ChoiceGrader().grade("A", {"gold": "A"}), InvalidTypeError, "'example'"),
        (lambda: NumericGrader().grade_many(["1"], [NUM, NUM]), InvalidParameterError,
         "same length"),
        (lambda: Example(id="x", prompt="p", gold=("a",), kind="short", grader="bleu"),
         InvalidParameterError, "'grader' parameter of Example"),
        (lambda: Example(id="o", prompt="p", gold=(), kind="open").grade("x"),
         InvalidParameterError, "judge"),
        (lambda: NQ.grade(3), InvalidTypeError, "'answer'"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
