"""Graders: score a model's answer to an :class:`~confroute.evaluation.Example` in [0, 1].

Answer extraction and normalisation come from :mod:`confroute.estimators.answers`
(the same rules the consistency estimators use), so "the edge answer is good"
means the same thing to the router and to the evaluation.

References
----------
.. [1] Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of
   Text", EMNLP 2016 (normalised exact match).
.. [2] Lee, Chang, Toutanova, "Latent Retrieval for Weakly Supervised Open Domain
   Question Answering", ACL 2019 (NQ-open: exact match against any alias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
from confroute.evaluation.datasets import Example

__all__ = ["ChoiceGrader", "ExactMatchGrader", "Grader", "NumericGrader", "get_grader"]


class Grader:
    """Base class: ``grade(prediction, example)`` returns a quality in [0, 1]."""

    def grade(self, prediction: str, example: Example) -> float:  # pragma: no cover
        raise NotImplementedError

    def grade_many(self, predictions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        """Grade a batch; returns an ndarray of shape (n,)."""
        owner = type(self).__name__
        check_same_length(owner, predictions=predictions, examples=examples)
        return np.array([self.grade(p, e) for p, e in zip(predictions, examples)], dtype=float)

    def _check(self, prediction: Any, example: Any) -> None:
        owner = type(self).__name__
        if not isinstance(prediction, str):
            raise param_error("prediction", owner, "a str", prediction, type_error=True)
        if not isinstance(example, Example):
            raise param_error("example", owner, "an Example", example, type_error=True)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class ExactMatchGrader(Grader):
    """Normalised exact match against any gold alias (SQuAD / NQ normalisation).

    The prediction matches when its normalised text, or its normalised first
    line/sentence without an "Answer:" prefix, equals a normalised alias. With
    ``containment=True`` it also matches when a (non-empty) normalised alias
    occurs as a whole-word span inside the normalised prediction.

    Parameters
    ----------
    containment : bool, default False
    """

    def __init__(self, *, containment: bool = False) -> None:
        self.containment = check_bool(containment, "containment", "ExactMatchGrader")

    def grade(self, prediction: str, example: Example) -> float:
        self._check(prediction, example)
        aliases = {a for a in (normalize_answer(g) for g in example.gold) if a}
        if not aliases:
            return 0.0
        full = normalize_answer(prediction)
        candidates = {full, extract_short_answer(prediction) or ""} - {""}
        if candidates & aliases:
            return 1.0
        if self.containment:
            padded = f" {full} "
            return float(any(f" {a} " in padded for a in aliases))
        return 0.0


class NumericGrader(Grader):
    """The final number of the prediction equals the gold number.

    The prediction's number is :func:`~confroute.estimators.answers.extract_number`
    (``#### N`` if present, else the last number); it matches when
    ``math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=1e-12)``.

    Parameters
    ----------
    rel_tol : float, default 1e-6
    """

    def __init__(self, *, rel_tol: float = 1e-6) -> None:
        self.rel_tol = check_float(rel_tol, "rel_tol", "NumericGrader", min_value=0.0)

    def grade(self, prediction: str, example: Example) -> float:
        self._check(prediction, example)
        pred = extract_number(prediction)
        if pred is None:
            return 0.0
        for g in example.gold:
            gold = extract_number(g)
            if gold is not None and math.isclose(float(pred), float(gold),
                                                 rel_tol=float(self.rel_tol or 0.0),
                                                 abs_tol=1e-12):
                return 1.0
        return 0.0


class ChoiceGrader(Grader):
    """The option the prediction commits to is one of the gold letters.

    The letter is :func:`~confroute.estimators.answers.extract_choice` over the
    example's letters; if no letter is found, a prediction whose normalised text
    equals exactly one option's normalised text selects that option. Ambiguous or
    absent answers score 0.
    """

    def grade(self, prediction: str, example: Example) -> float:
        self._check(prediction, example)
        letters = example.letters or "ABCD"
        letter = extract_choice(prediction, letters)
        if letter is None and example.choices:
            norm = normalize_answer(prediction)
            hits = [letters[i] for i, c in enumerate(example.choices)
                    if norm and normalize_answer(c) == norm]
            letter = hits[0] if len(hits) == 1 else None
        return float(letter is not None and letter in example.gold)


_GRADERS: dict[str, tuple[type[Grader], dict[str, Any]]] = {
    "short": (ExactMatchGrader, {}),
    "exact_match": (ExactMatchGrader, {}),
    "contains": (ExactMatchGrader, {"containment": True}),
    "number": (NumericGrader, {}),
    "numeric": (NumericGrader, {}),
    "choice": (ChoiceGrader, {}),
}


def get_grader(kind_or_name: str | Grader) -> Grader:
    """Grader for a question kind (``"short"``, ``"number"``, ``"choice"``) or name.

    Names: ``exact_match``, ``contains`` (exact match with containment),
    ``numeric``. A :class:`Grader` instance is returned unchanged. ``"open"``
    questions have no automatic grader: use :mod:`confroute.evaluation.judge`.
    """
    if isinstance(kind_or_name, Grader):
        return kind_or_name
    if kind_or_name == "open":
        raise InvalidParameterError(
            "The 'kind_or_name' parameter of get_grader is 'open': open-ended answers have no "
            "automatic grader; score them with confroute.evaluation.judge (MTBenchJudge)."
        )
    if not isinstance(kind_or_name, str) or kind_or_name not in _GRADERS:
        raise param_error("kind_or_name", "get_grader",
                          "one of " + ", ".join(repr(k) for k in sorted(_GRADERS)), kind_or_name,
                          type_error=not isinstance(kind_or_name, str))
    cls, kwargs = _GRADERS[kind_or_name]
    return cls(**kwargs)
