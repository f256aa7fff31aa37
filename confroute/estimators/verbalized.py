"""Verbalized confidence: ask the model how sure it is of its own answer.

References
----------
.. [1] Tian et al., "Just Ask for Calibration: Strategies for Eliciting Calibrated
   Confidence Scores from Language Models Fine-Tuned with Human Feedback",
   EMNLP 2023.
.. [2] Xiong et al., "Can LLMs Express Their Uncertainty? An Empirical Evaluation of
   Confidence Elicitation in LLMs", ICLR 2024.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from confroute._validation import check_int, param_error
from confroute.errors import EstimationError, InvalidParameterError
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import GenerationConfig, Message, Prompt, Sample, Samples

__all__ = ["VerbalizedConfidence", "parse_confidence"]

DEFAULT_QUESTION = (
    "How confident are you that your answer is correct? Reply with a number from 0 to 100."
)

_NUM = re.compile(
    r"(?<![\d.])(?P<sign>-\s?)?(?P<a>\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*%?\s*(?:-|\u2013|\u2014)\s*(?P<b>\d+(?:\.\d+)?))?"
    r"\s*(?P<pct>%|percent\b|per\s+cent\b)?",
    re.IGNORECASE,
)
_SCALE = re.compile(
    r"(?:(?:on\s+a\s+scale\s+)?from\s+)?\b0\s*(?:to|-|\u2013)\s*100\b(?!\s*%)", re.IGNORECASE
)
_KEYWORD = re.compile(r"confiden|certain|sure|probability|likel", re.IGNORECASE)

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}
_WORDS = re.compile(
    r"\b(?P<hundred>(?:one\s+|a\s+)?hundred)\b|\b(?P<tens>" + "|".join(_TENS) +
    r")(?:[\s-]+(?P<unit>" + "|".join(k for k, v in _UNITS.items() if 0 < v < 10) + r"))?\b"
    r"|\b(?P<small>" + "|".join(_UNITS) + r")\b",
    re.IGNORECASE,
)


def _value(m: re.Match[str]) -> float | None:
    a = m.group("a")
    if m.group("sign"):
        return None
    values = [a] if m.group("b") is None else [a, m.group("b")]
    out = []
    for v in values:
        x = float(v)
        # "0.85" is a probability; "85" or "85%" a percentage.
        if "." in v and x <= 1.0 and m.group("pct") is None:
            x *= 100.0
        out.append(x)
    x = sum(out) / len(out)
    return x if 0.0 <= x <= 100.0 else None


def parse_confidence(text: str) -> float | None:
    """A confidence in [0, 100] from a model's free-text reply.

    Accepted forms: ``"85"``, ``"85%"``, ``"85 percent"``, ``"Confidence: 0.85"``
    (a number with a decimal point in [0, 1] and no percent sign is a
    probability, multiplied by 100), ranges ``"80-90"`` (midpoint), and number
    words ``"eighty"``, ``"ninety-five"``, ``"one hundred"`` when the reply has
    no digits.

    When several numbers appear, the first one next to a confidence word
    (*confident*, *certain*, *sure*, *probability*, *likely*) wins, then the first
    with a percent sign, then the first number.

    Parameters
    ----------
    text : str
        The model's own reply (never the question that was asked).

    Returns
    -------
    float or None
        Confidence in percent, or None when nothing usable is found or the number
        chosen is negative or above 100.
    """
    # The scale the question names ("from 0 to 100") is not an answer.
    text = _SCALE.sub(" ", text)
    matches = list(_NUM.finditer(text))
    if not matches:
        return _parse_words(text)

    def priority(m: re.Match[str]) -> int:
        window = text[max(0, m.start() - 40): m.start()]
        if _KEYWORD.search(window):
            return 0
        if m.group("pct"):
            return 1
        return 2

    best = min(matches, key=priority)  # min keeps the first among equals
    return _value(best)


def _parse_words(text: str) -> float | None:
    m = _WORDS.search(text)
    if m is None:
        return None
    if m.group("hundred"):
        return 100.0
    if m.group("tens"):
        unit = m.group("unit")
        return float(_TENS[m.group("tens").lower()] + (_UNITS[unit.lower()] if unit else 0))
    return float(_UNITS[m.group("small").lower()])


@estimator_registry.register("verbalized")
class VerbalizedConfidence(UncertaintyEstimator):
    """Uncertainty from the confidence the model states about its own answer.

    After the greedy answer :math:`y`, the conversation
    ``[user: prompt, assistant: y, user: question]`` is sent to the same model
    (greedy, ``max_new_tokens`` tokens) and only the model's reply is parsed with
    :func:`parse_confidence`:

    .. math:: u(x) = 1 - c(x) / 100, \\qquad c(x) \\in [0, 100].

    An unparseable reply scores NaN (counted in :attr:`Estimate.n_unscored`);
    ``details["parsed"]`` is 1 where a confidence was read, 0 elsewhere, and
    ``details["confidence"]`` holds :math:`c(x)`. The reply is kept in
    ``Samples.extra`` under :attr:`extra_key`, so given samples are reused
    without asking again.

    Parameters
    ----------
    max_new_tokens : int >= 1, default 16
        Length bound of the confidence reply.
    question : str
        The follow-up question.
    answer_max_new_tokens : int >= 1, default 64
        Length bound of the greedy answer itself.

    Notes
    -----
    Small instruction-tuned models tend to answer 100 regardless; the score is
    then constant and uninformative, which calibration shows honestly.
    """

    def __init__(
        self,
        max_new_tokens: int = 16,
        question: str = DEFAULT_QUESTION,
        answer_max_new_tokens: int = 64,
    ) -> None:
        self.max_new_tokens = max_new_tokens
        self.question = question
        self.answer_max_new_tokens = answer_max_new_tokens

    @property
    def extra_key(self) -> str:
        """Key of the reply in ``Samples.extra``."""
        return f"verbalized:{self.max_new_tokens}:{self.question}"

    def _validate(self) -> int:
        owner = type(self).__name__
        m = check_int(self.max_new_tokens, "max_new_tokens", owner, min_value=1)
        check_int(self.answer_max_new_tokens, "answer_max_new_tokens", owner, min_value=1)
        if not isinstance(self.question, str) or not self.question.strip():
            raise param_error("question", owner, "a non-empty string", self.question,
                              type_error=not isinstance(self.question, str))
        assert m is not None
        return m

    def sample_request(self) -> SampleRequest:
        self._validate()
        return SampleRequest(greedy=True, max_new_tokens=int(self.answer_max_new_tokens))

    def followup_prompt(self, prompt: Prompt, answer: str) -> list[Message]:
        """The conversation that asks for the confidence in ``answer``."""
        msgs: list[Message] = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str)
            else [{"role": m["role"], "content": m["content"]} for m in prompt]
        )
        msgs.append({"role": "assistant", "content": answer})
        msgs.append({"role": "user", "content": self.question})
        return msgs

    def prepare_samples(
        self, samples: list[Samples], model: LanguageModel | None = None
    ) -> list[Samples]:
        """Ask the follow-up question where ``samples`` have no stored reply yet."""
        max_new = self._validate()
        key = self.extra_key
        missing = [i for i, s in enumerate(samples) if key not in s.extra]
        if not missing:
            return samples
        if model is None:
            raise InvalidParameterError(
                "The 'model' parameter of VerbalizedConfidence is None but the samples hold "
                "no confidence reply; pass the edge model to ask the follow-up question."
            )
        convs = []
        for i in missing:
            g = samples[i].greedy
            if g is None:
                raise EstimationError(
                    f"VerbalizedConfidence needs the greedy answer; prompt {i} has none."
                )
            convs.append(self.followup_prompt(samples[i].prompt, g.text))
        outs = model.generate(convs, GenerationConfig(max_new_tokens=max_new, temperature=0.0))
        out = list(samples)
        for i, reply in zip(missing, outs):
            out[i] = replace(out[i], extra={**dict(out[i].extra), key: reply[0]})
        return out

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        samples = self.prepare_samples(list(samples), model)
        key = self.extra_key
        n = len(samples)
        conf = np.full(n, math.nan)
        parsed = np.zeros(n)
        for i, s in enumerate(samples):
            reply = s.extra[key]
            text = reply.text if isinstance(reply, Sample) else str(reply)
            c = parse_confidence(text)
            if c is not None:
                conf[i] = c
                parsed[i] = 1.0
        return 1.0 - conf / 100.0, {"parsed": parsed, "confidence": conf}
