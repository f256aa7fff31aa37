"""Answer extractors on adversarial strings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.estimators.answers import (
    extract_choice,
    extract_number,
    extract_short_answer,
    get_extractor,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48 clips in April and 24 in May. #### 72", "72"),
        ("First 5, then #### 1,234 and later 9", "1234"),
        ("#### -3.5", "-3.5"),
        ("####$12.00", "12"),
        ("The answer is 1,234.", "1234"),
        ("It costs $12 in total.", "12"),
        ("12.0", "12"),
        ("12.50 apples", "12.5"),
        ("temperature fell to -7 degrees", "-7"),
        ("\u22122", "-2"),
        ("pages 3-4", "4"),
        ("x-5", "5"),
        ("1,2,3", "3"),
        ("a .5 chance", "0.5"),
        ("It is 50%.", "50"),
        ("ratio 2.", "2"),
        ("between 10 and 20, so 15", "15"),
        ("no digits here", None),
        ("", None),
        ("#### no number after the marker", None),
        ("-0", "0"),
        ("1,000,000 people", "1000000"),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


def test_extract_number_equal_forms_agree() -> None:
    assert extract_number("12") == extract_number("12.0") == extract_number("$12.00") == "12"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(B)", "B"),
        ("Answer: C", "C"),
        ("the answer is d", "D"),
        ("The answer is d.", "D"),
        ("B.", "B"),
        ("B) Paris", "B"),
        ("B: Paris", "B"),
        ("B", "B"),
        ("  C\n", "C"),
        ("I think the answer is B because it is larger.", "B"),
        ("The correct answer is (c) obviously", "C"),
        ("Option E", "E"),
        ("answer: [A]", "A"),
        # ambiguous or absent
        ("the answer is a bit unclear", None),
        ("A or B", None),
        ("(A) or (B)", None),
        ("answer: A. Answer: B", None),
        ("answer is Bob", None),
        ("Banana", None),
        ("I am not sure.", None),
        ("answer is F", None),
        ("", None),
        # an explicit statement beats a listed option
        ("Options (A) and (B); the answer is B.", "B"),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_extract_choice_letters_restrict() -> None:
    assert extract_choice("Answer: E", letters="ABCD") is None
    assert extract_choice("Answer: E", letters="ABCDE") == "E"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a day ", "apple day"),
        ("Theater", "theater"),
        ("\u201cQuoted\u201d \u2014 text", "quoted text"),
        ("...", ""),
        ("A", ""),
        ("Hydro\u00adgen", "hydrogen"),  # soft hyphen (an NQ-open alias)
        ("zero\u200dwidth", "zerowidth"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris.", "paris"),
        ("Answer: The Paris. It is in France.", "paris"),
        ("The answer is Paris!\nMore text", "paris"),
        ("\n\n  William Shakespeare wrote it.", "william shakespeare wrote it"),
        ("It is 3.5 m. And so on", "it is 3 5 m"),
        ("Final answer: 42", "42"),
        ("", None),
        ("   \n ...", None),
    ],
)
def test_extract_short_answer(text: str, expected: str | None) -> None:
    assert extract_short_answer(text) == expected


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-10**9, max_value=10**9))
def test_extract_number_roundtrips_integers(n: int) -> None:
    assert extract_number(f"so the result is {n}") == str(n)
    assert extract_number(f"#### {n:,}") == str(n)


@pytest.mark.parametrize("name", ["short", "number", "choice", "normalized"])
def test_get_extractor_names(name: str) -> None:
    assert callable(get_extractor(name, "extractor", "X"))


def test_get_extractor_errors() -> None:
    with pytest.raises(InvalidParameterError, match=r"'extractor' parameter of X.*'number'"):
        get_extractor("digits", "extractor", "X")
    with pytest.raises(InvalidTypeError, match="'extractor' parameter of X"):
        get_extractor(3, "extractor", "X")
    assert get_extractor(str.upper, "extractor", "X")("a") == "A"
