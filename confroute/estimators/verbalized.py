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

__all__ = ["VerbalizedConfidence", "copies_answer", "parse_confidence"]

DEFAULT_QUESTION = (
    "How confident are you that your answer is correct? Do not repeat your answer. End your "
    "reply with one line of the form 'Confidence: N', where N is a whole number from 0 to 100."
)

# The whole last non-empty line: "Confidence: N" with N an integer 0-100, optional "%".
_FINAL = re.compile(r"confidence\s*:\s*(?P<n>\d{1,3})\s*%?", re.IGNORECASE)
_TOKEN = re.compile(r"\w+")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def copies_answer(reply: str, answer: str) -> bool:
    """Whether a confidence ``reply`` repeats the ``answer`` it was asked about.

    True when the answer's words (case-folded, punctuation ignored) appear as a
    contiguous run in the reply's lines before the final ``Confidence: N`` line,
    or when the answer itself carries the reply's final confidence line (a
    prompt injection that makes the model echo a planted confidence).

    Parameters
    ----------
    reply, answer : str

    Returns
    -------
    bool
    """
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    if not lines:
        return False
    words = _tokens(answer)
    if words and _contains_run(_tokens("\n".join(lines[:-1])), words):
        return True
    final = _tokens(lines[-1])
    return bool(final) and any(_tokens(a) == final for a in answer.splitlines())


def parse_confidence(text: str, answer: str | None = None) -> float | None:
    """The confidence in [0, 100] stated on the final line of a model's reply.

    Only one form is accepted: the last non-empty line is exactly
    ``Confidence: N`` (case-insensitive, optional ``%``) with ``N`` a whole
    number from 0 to 100. Anything else (a number elsewhere in the text, a
    decimal, a range, a word, scientific notation, a value above 100) is
    unparsed, so no number is ever read from an answer or an explanation.

    Parameters
    ----------
    text : str
        The model's own reply (never the question that was asked).
    answer : str or None, default None
        The answer the confidence is about. When given, a reply that repeats it
        (see :func:`copies_answer`) is unparsed: the model was steered into
        echoing its answer rather than rating it.

    Returns
    -------
    float or None
        Confidence in percent, or None when the reply does not end with a valid
        ``Confidence: N`` line.

    Examples
    --------
    >>> parse_confidence("I checked the sum.\nConfidence: 85%")
    85.0
    >>> parse_confidence("A spider has 8 legs.") is None
    True
    """
    if not isinstance(text, str):
        return None
    m = _FINAL.fullmatch(_last_line(text))
    if m is None or int(m.group("n")) > 100:
        return None
    if answer is not None and copies_answer(text, answer):
        return None
    return float(int(m.group("n")))


@estimator_registry.register("verbalized")
class VerbalizedConfidence(UncertaintyEstimator):
    """Uncertainty from the confidence the model states about its own answer.

    After the greedy answer :math:`y`, the conversation
    ``[user: prompt, assistant: y, user: question]`` is sent to the same model
    (greedy, ``max_new_tokens`` tokens) and only the model's reply is parsed with
    :func:`parse_confidence`:

    .. math:: u(x) = 1 - c(x) / 100, \\qquad c(x) \\in [0, 100].

    The question asks for a final line ``Confidence: N`` (N a whole number from
    0 to 100) and nothing else is read: a reply without that final line, or one
    that repeats the answer (a sign the prompt steered the model, see
    :func:`copies_answer`), is unparsed. An unparsed reply scores NaN (counted in
    :attr:`Estimate.n_unscored`);
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
            c = parse_confidence(text, s.greedy.text if s.greedy is not None else None)
            if c is not None:
                conf[i] = c
                parsed[i] = 1.0
        return 1.0 - conf / 100.0, {"parsed": parsed, "confidence": conf}
