"""Answer extractors: turn a free-text generation into a comparable short answer.

Each extractor maps a text to a canonical string, or to None when no answer can
be found. Two generations agree when their extracted answers are equal strings.
Extractors are looked up by name (``"number"``, ``"choice"``, ``"short"``,
``"normalized"``) through :func:`get_extractor`, or given as any callable.

References
----------
.. [1] Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of
   Text", EMNLP 2016 (answer normalisation of the official evaluation script).
.. [2] Cobbe et al., "Training Verifiers to Solve Math Word Problems", 2021
   (GSM8K, final answers written after ``####``).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from confroute._validation import param_error

__all__ = [
    "EXTRACTORS",
    "Extractor",
    "extract_choice",
    "extract_number",
    "extract_short_answer",
    "get_extractor",
    "normalize_answer",
]

Extractor = Callable[[str], "str | None"]

# A number: optional sign (only when not glued to a preceding word/digit, so "3-4" is
# two positive numbers), optional currency sign, then thousands-grouped or plain digits.
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<sign>[-\u2212])\s?)?"
    r"\$?\s?"
    r"(?P<num>(?<![\d,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|\d+(?:\.\d+)?|\.\d+)"
)
_GSM8K = re.compile(r"####\s*(?P<body>[^\n]*)")


def _canonical_number(sign: str | None, digits: str) -> str | None:
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only lets digits through
        return None
    if sign:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The final numeric answer of a text, in canonical form.

    Rules, in order:

    1. GSM8K style: if the text contains ``#### N``, the first number after the
       first ``####`` is the answer.
    2. Otherwise the **last** number in the text.

    Numbers may carry a sign (``-3.5``; a hyphen glued to a preceding word or digit,
    as in ``3-4``, is not a sign), a ``$`` prefix and thousands separators
    (``1,234``). The result drops separators and trailing zeros, so ``"12.0"``,
    ``"12"`` and ``"$12.00"`` all give ``"12"``.

    Parameters
    ----------
    text : str

    Returns
    -------
    str or None
        Canonical number, or None when the text holds no number.
    """
    gsm = _GSM8K.search(text)
    if gsm is not None:
        m = _NUMBER.search(gsm.group("body"))
        if m is not None:
            return _canonical_number(m.group("sign"), m.group("num"))
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - we want the final match
        pass
    if last is None:
        return None
    return _canonical_number(last.group("sign"), last.group("num"))


_CHOICE_STATEMENT = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|would\s+be|:|=)?\s*"
    r"(?:option\s+|choice\s+)?[(\[]?(?P<letter>[A-Za-z])(?P<close>[)\]]?)",
    re.IGNORECASE,
)
_PAREN_LETTER = re.compile(r"[(\[](?P<letter>[A-Za-z])[)\]]")
_LEADING_LETTER = re.compile(r"^\s*(?P<letter>[A-Z])(?:\s*$|[.):]|\s*[-\u2013]\s)")


def _statement_letter(text: str, m: re.Match[str]) -> str | None:
    letter = m.group("letter")
    rest = text[m.end():]
    if m.group("close"):
        return letter.upper()
    if letter.isupper():
        # "The answer is B because ..." is fine; "answer is Bob" is not a letter.
        return letter if not rest[:1].isalnum() else None
    # A lowercase letter must end the statement ("the answer is d."), so that
    # "the answer is a bit unclear" is not read as option A.
    return letter.upper() if re.match(r"\s*(?:$|[.,;:!)\]\n])", rest) else None


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The multiple-choice letter a text commits to.

    Rules, the first that applies decides:

    1. Explicit statements ``answer is X`` / ``Answer: X`` / ``option X`` /
       ``choice X`` (any case, X optionally in parentheses). A lowercase letter
       counts only when it ends the statement (``"the answer is d"``), so
       ``"the answer is a bit unclear"`` is not option A. If the statements name
       several different letters, the answer is ambiguous: None.
    2. Letters in parentheses, ``(B)``: exactly one distinct letter, else None.
    3. A bare capital letter opening the text: ``"B."``, ``"B)"``, ``"B: Paris"``,
       ``"B"``.

    Parameters
    ----------
    text : str
    letters : str, default "ABCDE"
        The valid option letters (upper case).

    Returns
    -------
    str or None
        The upper-case letter, or None when absent or ambiguous.
    """
    valid = set(letters.upper())
    found: list[str] = []
    for m in _CHOICE_STATEMENT.finditer(text):
        letter = _statement_letter(text, m)
        if letter is not None and letter in valid:
            found.append(letter)
    if found:
        return found[0] if len(set(found)) == 1 else None
    paren = {m.group("letter").upper() for m in _PAREN_LETTER.finditer(text)}
    paren &= valid
    if paren:
        return paren.pop() if len(paren) == 1 else None
    lead = _LEADING_LETTER.match(text)
    if lead is not None and lead.group("letter") in valid:
        return lead.group("letter")
    return None


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD / Natural Questions answer normalisation.

    Lower-case, remove punctuation (ASCII and Unicode), remove the articles
    *a*, *an*, *the*, and collapse whitespace — the steps of the official SQuAD
    evaluation script [1]_. Invisible format characters (Unicode category Cf:
    soft hyphens, zero-width joiners, as in the NQ-open alias "Hydro\u00adgen")
    are dropped first, so they never split a word.

    Parameters
    ----------
    text : str

    Returns
    -------
    str
        The normalised text (possibly empty).
    """
    text = "".join(ch for ch in text.lower() if unicodedata.category(ch) != "Cf")
    text = "".join(
        " " if unicodedata.category(ch).startswith("P") or ch in string.punctuation else ch
        for ch in text
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_ANSWER_PREFIX = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+|correct\s+|short\s+)?answer\s*(?:is|:)\s*)", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def extract_short_answer(text: str) -> str | None:
    """The first line / sentence of a text, without an "Answer:" prefix, normalised.

    Takes the first non-empty line, cuts it at the first sentence end (``.``,
    ``!`` or ``?`` followed by whitespace, so ``3.5`` stays whole), drops a
    leading ``Answer:`` / ``The answer is`` / ``Final answer:`` and applies
    :func:`normalize_answer`.

    Parameters
    ----------
    text : str

    Returns
    -------
    str or None
        The normalised short answer, or None when nothing is left.
    """
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _ANSWER_PREFIX.sub("", line.strip())
    first = _SENTENCE_END.split(line, maxsplit=1)[0]
    out = normalize_answer(first)
    return out or None


def _normalized_or_none(text: str) -> str | None:
    out = normalize_answer(text)
    return out or None


EXTRACTORS: dict[str, Extractor] = {
    "choice": extract_choice,
    "normalized": _normalized_or_none,
    "number": extract_number,
    "short": extract_short_answer,
}
"""Named extractors accepted wherever an ``extractor`` parameter is taken."""


def get_extractor(extractor: Any, param: str, owner: str) -> Extractor:
    """Resolve an extractor name or callable.

    Raises
    ------
    InvalidParameterError
        Unknown name (the message lists the valid ones).
    InvalidTypeError
        Neither a string nor a callable.
    """
    if isinstance(extractor, str):
        try:
            return EXTRACTORS[extractor]
        except KeyError:
            raise param_error(
                param, owner, "one of " + ", ".join(repr(k) for k in sorted(EXTRACTORS)) +
                " or a callable", extractor,
            ) from None
    if callable(extractor):
        return extractor
    raise param_error(param, owner, "an extractor name or a callable", extractor, type_error=True)
