"""Graders: was an answer good, given reference answers?

A grader is any callable ``grader(prediction, references) -> float`` in [0, 1]
(1 = good). The Router uses one to turn references into calibration labels; the
evaluation harness uses the same functions. Named graders:

``"contains"``
    Some normalised reference appears in the normalised prediction (word
    boundaries respected). Suited to short factual answers from chatty models.
``"exact"``
    The normalised prediction equals some normalised reference (SQuAD / NQ
    normalisation: lower case, no punctuation, no articles, single spaces).
``"number"``
    The prediction's final number (``#### N`` first, else the last number)
    equals a reference number (relative tolerance 1e-6).
``"choice"``
    The multiple-choice letter extracted from the prediction equals the
    reference letter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from confroute.errors import InvalidParameterError, InvalidTypeError, describe

__all__ = ["GRADERS", "Grader", "grade_choice", "grade_contains", "grade_exact", "grade_number",
           "resolve_grader"]

Grader = Callable[[str, Sequence[str]], float]
GraderLike = str | Grader

def _norm(text: str) -> str:
    from confroute.estimators.answers import normalize_answer

    return normalize_answer(text)

def grade_exact(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference."""
    p = _norm(prediction)
    return float(any(p == _norm(r) for r in references if _norm(r)))

def grade_contains(prediction: str, references: Sequence[str]) -> float:
    """1.0 if a normalised reference occurs in the normalised prediction as whole words."""
    p = f" {_norm(prediction)} "
    for r in references:
        nr = _norm(r)
        if nr and f" {nr} " in p:
            return 1.0
    return 0.0

def grade_number(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the prediction's final number equals a reference number."""
    from confroute.estimators.answers import extract_number

    got = extract_number(prediction)
    if got is None:
        return 0.0
    for r in references:
        want = extract_number(r)
        if want is not None and math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-9):
            return 1.0
    return 0.0

def grade_choice(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the extracted choice letter equals a reference letter."""
    from confroute.estimators.answers import extract_choice

    got = extract_choice(prediction)
    return float(got is not None and any(got == r.strip().upper()[:1] for r in references))

GRADERS: dict[str, Grader] = {
    "contains": grade_contains,
    "exact": grade_exact,
    "number": grade_number,
    "choice": grade_choice,
}

def resolve_grader(grader: GraderLike, owner: str = "Router.calibrate") -> Grader:
    """Return the grader function for a name or a callable."""
    if isinstance(grader, str):
        if grader not in GRADERS:
            raise InvalidParameterError(
                f"The 'grader' parameter of {owner} must be a callable or one of "
                f"{', '.join(repr(k) for k in GRADERS)}. Got {grader!r}."
            )
        return GRADERS[grader]
    if callable(grader):
        return grader
    raise InvalidTypeError(
        f"The 'grader' parameter of {owner} must be a callable or a grader name. "
        f"Got {describe(grader)}."
    )

