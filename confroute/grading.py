"""Graders: was an answer good, given reference answers?

The one grading module: :meth:`Router.calibrate <confroute.Router.calibrate>`,
the command line and the evaluation harness all grade through it, so "the edge
answer is good" means the same thing when a router is calibrated and when it is
evaluated.

A grader is any callable ``grader(answer, references) -> float`` in [0, 1]
(1 = good), with ``answer`` a str and ``references`` a sequence of str. A name
or a callable is resolved by :func:`resolve_grader`. Named graders:

``"contains"`` (the default for free-text short answers)
    Alias containment: :func:`grade_exact` matches, or some normalised
    reference occurs in the normalised answer as whole words. Suited to short
    factual answers from chatty models ("It was William Shakespeare.").
``"exact"`` (alias ``"exact_match"``)
    The normalised answer, or its first line/sentence without an
    ``Answer:`` / ``The answer is`` prefix, equals some normalised reference
    (SQuAD / NQ normalisation [1]_ [2]_: lower case, no punctuation, no
    articles, single spaces). ``"Answer: 42"`` matches ``"42"``.
``"number"`` (alias ``"numeric"``)
    The answer's final number (``#### N`` first, else the last number) equals a
    reference number within a relative tolerance of 1e-6.
``"choice"``
    The multiple-choice letter the answer commits to is a reference letter.

Dataset question kinds map to one grader each (:data:`KIND_GRADERS`): short
free text -> ``"contains"``, a number -> ``"number"``, multiple choice ->
``"choice"``; open-ended answers need an LLM judge
(:mod:`confroute.evaluation.judge`).

Answer extraction and normalisation come from :mod:`confroute.estimators.answers`
(the rules the consistency estimators use).

References
----------
.. [1] Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of
   Text", EMNLP 2016 (normalised exact match).
.. [2] Lee, Chang, Toutanova, "Latent Retrieval for Weakly Supervised Open Domain
   Question Answering", ACL 2019 (NQ-open: exact match against any alias).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from confroute._validation import check_bool, check_float, check_same_length, param_error
from confroute.errors import InvalidParameterError
from confroute.estimators.answers import (
    extract_choice,
    extract_number,
    extract_short_answer,
    normalize_answer,
)

__all__ = [
    "DEFAULT_GRADER",
    "GRADERS",
    "KIND_GRADERS",
    "BaseGrader",
    "ChoiceGrader",
    "ExactMatchGrader",
    "Grader",
    "GraderLike",
    "NumericGrader",
    "get_grader",
    "grade_choice",
    "grade_contains",
    "grade_exact",
    "grade_number",
    "grader_for_kind",
    "grader_names",
    "resolve_grader",
]

Grader = Callable[[str, Sequence[str]], float]
"""``grader(answer, references) -> float`` in [0, 1]."""
GraderLike = str | Grader

DEFAULT_GRADER = "contains"
"""The one default grader for free-text short answers (alias containment)."""

KIND_GRADERS: dict[str, str] = {"short": "contains", "number": "number", "choice": "choice"}
"""The grader of each question kind (``"open"`` has none: use an LLM judge)."""

LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------- plain functions


def _aliases(references: Sequence[str]) -> set[str]:
    return {a for a in (normalize_answer(r) for r in references) if a}


def _match(answer: str, references: Sequence[str], containment: bool) -> float:
    aliases = _aliases(references)
    if not aliases:
        return 0.0
    full = normalize_answer(answer)
    if {full, extract_short_answer(answer) or ""} & aliases:
        return 1.0
    if containment:
        padded = f" {full} "
        return float(any(f" {a} " in padded for a in aliases))
    return 0.0


def grade_exact(answer: str, references: Sequence[str]) -> float:
    """1.0 if the normalised answer (or its prefix-stripped first sentence) equals a reference.

    Parameters
    ----------
    answer : str
    references : sequence of str, shape (n_references,)

    Returns
    -------
    float in {0.0, 1.0}
    """
    return _match(answer, references, containment=False)


def grade_contains(answer: str, references: Sequence[str]) -> float:
    """1.0 if :func:`grade_exact` matches or a normalised reference occurs as whole words.

    Parameters
    ----------
    answer : str
    references : sequence of str, shape (n_references,)

    Returns
    -------
    float in {0.0, 1.0}
    """
    return _match(answer, references, containment=True)


def grade_number(answer: str, references: Sequence[str], *, rel_tol: float = 1e-6) -> float:
    """1.0 if the answer's final number equals a reference number.

    Match when ``math.isclose(got, want, rel_tol=rel_tol, abs_tol=1e-12)``.

    Parameters
    ----------
    answer : str
    references : sequence of str, shape (n_references,)
    rel_tol : float, default 1e-6

    Returns
    -------
    float in {0.0, 1.0}
    """
    got = extract_number(answer)
    if got is None:
        return 0.0
    for r in references:
        want = extract_number(r)
        if want is not None and math.isclose(float(got), float(want), rel_tol=rel_tol,
                                             abs_tol=1e-12):
            return 1.0
    return 0.0


def grade_choice(answer: str, references: Sequence[str], *, letters: str = "ABCDE",
                 choices: Sequence[str] = ()) -> float:
    """1.0 if the letter the answer commits to is a reference letter.

    The letter is :func:`~confroute.estimators.answers.extract_choice` over
    ``letters``; when none is found and ``choices`` (option texts in letter
    order) are given, an answer whose normalised text equals exactly one
    option's selects that option. References are read as their first letter,
    upper-cased (``"b"`` and ``"B) Paris"`` both mean B).

    Parameters
    ----------
    answer : str
    references : sequence of str, shape (n_references,)
    letters : str, default "ABCDE"
        The valid option letters.
    choices : sequence of str, shape (n_options,), optional

    Returns
    -------
    float in {0.0, 1.0}
    """
    letter = extract_choice(answer, letters)
    if letter is None and choices:
        norm = normalize_answer(answer)
        hits = [letters[i] for i, c in enumerate(choices)
                if norm and i < len(letters) and normalize_answer(c) == norm]
        letter = hits[0] if len(hits) == 1 else None
    gold = {r.strip().upper()[:1] for r in references if r.strip()}
    return float(letter is not None and letter in gold)


# ---------------------------------------------------------------- grader objects


class BaseGrader:
    """A configurable grader: call it as ``grader(answer, references) -> float``.

    Subclasses implement ``__call__``. :meth:`grade` and :meth:`grade_many`
    score answers to evaluation examples (anything with a ``references``
    attribute, e.g. :class:`~confroute.evaluation.Example`); a subclass may
    override :meth:`grade` alone to use other fields of the example.
    """

    def __call__(self, answer: str, references: Sequence[str]) -> float:  # pragma: no cover
        raise NotImplementedError

    def for_example(self, example: Any) -> Grader:
        """The grader to use on ``example`` (this one, unless the example adds options)."""
        return self

    def grade(self, prediction: str, example: Any) -> float:
        """Quality in [0, 1] of ``prediction`` as an answer to ``example``."""
        owner = type(self).__name__
        if not isinstance(prediction, str):
            raise param_error("prediction", owner, "a str", prediction, type_error=True)
        if not hasattr(example, "references"):
            raise param_error("example", owner, "an Example", example, type_error=True)
        return float(self.for_example(example)(prediction, list(example.references)))

    def grade_many(self, predictions: Sequence[str], examples: Sequence[Any]) -> np.ndarray:
        """Grade a batch; returns an ndarray of shape (n,)."""
        check_same_length(type(self).__name__, predictions=predictions, examples=examples)
        return np.array([self.grade(p, e) for p, e in zip(predictions, examples)], dtype=float)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class ExactMatchGrader(BaseGrader):
    """:func:`grade_exact`, or :func:`grade_contains` with ``containment=True``.

    Parameters
    ----------
    containment : bool, default False
    """

    def __init__(self, *, containment: bool = False) -> None:
        self.containment = check_bool(containment, "containment", "ExactMatchGrader")

    def __call__(self, answer: str, references: Sequence[str]) -> float:
        return _match(answer, references, containment=self.containment)


class NumericGrader(BaseGrader):
    """:func:`grade_number` with a relative tolerance.

    Parameters
    ----------
    rel_tol : float >= 0, default 1e-6
    """

    def __init__(self, *, rel_tol: float = 1e-6) -> None:
        self.rel_tol = check_float(rel_tol, "rel_tol", "NumericGrader", min_value=0.0)

    def __call__(self, answer: str, references: Sequence[str]) -> float:
        return grade_number(answer, references, rel_tol=self.rel_tol)


class ChoiceGrader(BaseGrader):
    """:func:`grade_choice` over given option letters and texts.

    Without ``choices``, :meth:`grade` takes the options of the example graded
    (its ``choices`` and ``letters``), so option texts are matched too.

    Parameters
    ----------
    letters : str, default "ABCDE"
        Valid option letters (upper case).
    choices : sequence of str, shape (n_options,), optional
        Option texts in letter order.
    """

    def __init__(self, *, letters: str = "ABCDE", choices: Sequence[str] = ()) -> None:
        owner = "ChoiceGrader"
        if not isinstance(letters, str) or not letters or not set(letters) <= set(LETTERS):
            raise param_error("letters", owner, f"a non-empty string of letters from {LETTERS}",
                              letters, type_error=not isinstance(letters, str))
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise param_error("choices", owner, "a sequence of str", choices, type_error=True)
        self.letters = letters
        self.choices = tuple(choices)

    def __call__(self, answer: str, references: Sequence[str]) -> float:
        return grade_choice(answer, references, letters=self.letters, choices=self.choices)

    def for_example(self, example: Any) -> Grader:
        choices = tuple(getattr(example, "choices", ()) or ())
        if self.choices or not choices:
            return self
        return ChoiceGrader(letters=LETTERS[: len(choices)], choices=choices)


# ---------------------------------------------------------------- registry


GRADERS: dict[str, BaseGrader] = {
    "contains": ExactMatchGrader(containment=True),
    "exact": ExactMatchGrader(),
    "number": NumericGrader(),
    "choice": ChoiceGrader(),
}
_ALIASES = {"exact_match": "exact", "numeric": "number"}


def grader_names() -> list[str]:
    """Every name :func:`resolve_grader` accepts (aliases included)."""
    return sorted([*GRADERS, *_ALIASES])


def resolve_grader(grader: GraderLike, owner: str = "Router.calibrate",
                   name: str = "grader") -> Grader:
    """The grader for a name (see :func:`grader_names`) or a callable (returned unchanged).

    Parameters
    ----------
    grader : str or callable
    owner : str
        Who asks, for error messages.
    name : str
        The parameter's name, for error messages.

    Returns
    -------
    callable ``(answer, references) -> float``
    """
    if isinstance(grader, str):
        key = _ALIASES.get(grader, grader)
        if key not in GRADERS:
            valid = ", ".join(repr(k) for k in grader_names())
            raise param_error(name, owner, f"a callable or one of {valid}", grader)
        return GRADERS[key]
    if callable(grader):
        return grader
    raise param_error(name, owner, "a callable or a grader name", grader, type_error=True)


def grader_for_kind(kind: str, owner: str = "grader_for_kind") -> str:
    """The grader name of a question kind (:data:`KIND_GRADERS`).

    Raises
    ------
    InvalidParameterError
        For ``"open"`` (no automatic grader) and unknown kinds.
    """
    if kind == "open":
        raise InvalidParameterError(
            f"The 'kind' parameter of {owner} is 'open': open-ended answers have no automatic "
            "grader; score them with confroute.evaluation.judge (MTBenchJudge)."
        )
    if kind not in KIND_GRADERS:
        raise param_error("kind", owner, "one of " + ", ".join(repr(k) for k in KIND_GRADERS),
                          kind, type_error=not isinstance(kind, str))
    return KIND_GRADERS[kind]


def get_grader(kind_or_name: Any) -> Grader:
    """Grader for a question kind (``"short"``, ``"number"``, ``"choice"``) or a grader name.

    A kind maps through :data:`KIND_GRADERS` (``"short"`` -> ``"contains"``); a
    callable is returned unchanged. ``"open"`` questions have no automatic
    grader: use :mod:`confroute.evaluation.judge`.
    """
    if callable(kind_or_name) and not isinstance(kind_or_name, str):
        return kind_or_name
    if kind_or_name == "open":
        grader_for_kind("open", "get_grader")
    if isinstance(kind_or_name, str) and kind_or_name in KIND_GRADERS:
        kind_or_name = KIND_GRADERS[kind_or_name]
    return resolve_grader(kind_or_name, "get_grader", "kind_or_name")
