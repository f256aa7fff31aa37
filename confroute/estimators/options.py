"""Multiple choice: the answer is the most likely option, the uncertainty its spread.

For a prompt that lists options (``A. ...``, ``(B) ...``, ``C) ...`` on their own
lines), the edge model scores each option as the continuation of the prompt by
teacher forcing (``model.score``; one batched forward pass, no decoding). Three
scorings:

* ``scoring="letter"``: the continuation is the option's letter (``" A"``); its
  log-likelihood :math:`\\ell_k` is the option's score;
* ``scoring="text"``: the continuation is the option's
  text (``" Paris"``) and, with ``normalize="mean"``, its score is the mean token
  log-probability :math:`\\ell_k = \\frac{1}{T_k} \\sum_{t=1}^{T_k} \\log p(c_{k,t} \\mid
  \\text{prompt}, c_{k,<t})` (so long options are not penalised for their length;
  ``normalize="sum"`` keeps the total), after the prompt as given (options listed);
* ``scoring="cloze"``: the same option-text scores after the question **stem**
  only (the prompt's text before its first option line, then ``"\nAnswer:"``),
  the cloze formulation of Brown et al. 2020 (used by lm-eval-harness and the
  SmolLM2 evaluations): the options are not listed, so the model cannot just
  copy one. Small models that cannot answer in letter format often rank option
  texts far better this way.

The answer is the option with the highest score, and the uncertainty is the
entropy of the option distribution

.. math::

    p_k = \\operatorname{softmax}_k(\\ell_k), \\qquad H = -\\sum_k p_k \\log p_k,

or one minus the margin :math:`1 - (p_{(1)} - p_{(2)})` between the two most
likely options.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from confroute._validation import check_choice, param_error
from confroute.errors import InvalidParameterError
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import Prompt, Samples, prompt_text

__all__ = ["CLOZE_SUFFIX", "OptionEntropy", "cloze_prompt", "parse_option_texts",
           "parse_options"]

_OPTION = re.compile(r"^[ \t]*\(?([A-Z])[\.\):][ \t]+(\S[^\n]*?)[ \t]*$", re.MULTILINE)
SCORINGS = ("letter", "text", "cloze")
#: Appended to the question stem of the cloze scoring (the stem is the prompt's text
#: before its first option line).
CLOZE_SUFFIX = "\nAnswer:"
NORMALIZATIONS = ("mean", "sum")


def parse_option_texts(text: str, letters: Sequence[str]) -> list[tuple[str, str]]:
    """Options listed in ``text``: ``(letter, option text)`` pairs, in order.

    One option per line, written ``A. Paris``, ``(B) Rome``, ``C) Oslo`` or
    ``D: Bern``; the first line of each letter among ``letters`` counts.

    Parameters
    ----------
    text : str
    letters : sequence of str
        The option letters recognised (e.g. ``"ABCDE"``).

    Returns
    -------
    list of (str, str)
        Empty when fewer than two options are listed.
    """
    out: dict[str, str] = {}
    for m in _OPTION.finditer(text):
        if m.group(1) in letters and m.group(1) not in out:
            out[m.group(1)] = m.group(2)
    return list(out.items()) if len(out) >= 2 else []


def cloze_prompt(prompt: Prompt) -> Prompt:
    """The question stem of a multiple-choice prompt, for the cloze scoring.

    The text before the first option line (``A. ...``), stripped, then
    :data:`CLOZE_SUFFIX`; a conversation gets its last user turn replaced that
    way. A prompt without option lines is returned unchanged.

    Parameters
    ----------
    prompt : Prompt

    Returns
    -------
    Prompt
        Of the same kind (a string, or a list of messages).
    """
    text = prompt_text(prompt)
    m = _OPTION.search(text)
    if m is None:
        return prompt
    stem = text[:m.start()].strip() + CLOZE_SUFFIX
    if isinstance(prompt, str):
        return stem
    msgs = [dict(msg) for msg in prompt]
    last = max((i for i, msg in enumerate(msgs) if msg.get("role") == "user"),
               default=len(msgs) - 1)
    msgs[last]["content"] = stem
    return msgs


def parse_options(text: str, letters: Sequence[str]) -> list[str]:
    """Option letters listed in ``text`` (one per line, in order, among ``letters``)."""
    return [c for c, _ in parse_option_texts(text, letters)]


@estimator_registry.register("option_entropy")
class OptionEntropy(UncertaintyEstimator):
    """Entropy (or 1 - margin) of the edge model's distribution over answer options.

    Parameters
    ----------
    letters : str, default "ABCDE"
        Option letters recognised in the prompt.
    measure : {"entropy", "margin"}, default "entropy"
    prefix : str, default " "
        Text before the letter (or option text) in the scored continuation (after
        "Answer:" a space is the natural token boundary).
    scoring : {"letter", "text", "cloze"}, default "letter"
        Score each option's letter, its text after the prompt, or its text after
        the question stem alone (:func:`cloze_prompt`).
    normalize : {"mean", "sum"}, default "mean"
        With ``scoring="text"`` or ``"cloze"``: an option's score is the mean
        (length-normalised) or the total log-probability of its tokens. Letter
        scoring uses the total (a letter is one token in common tokenizers).

    Notes
    -----
    Options are taken from ``Samples.extra["options"]`` (a list of letters) when
    the caller passes them, else parsed from the prompt; with ``scoring="text"``
    or ``"cloze"`` their texts from ``Samples.extra["option_texts"]`` (a list of str aligned with
    the letters) when given, else parsed from the prompt's option lines
    (:func:`parse_option_texts`). A prompt with fewer than two options (or an
    option whose text cannot be found) scores NaN (counted as unscored).
    ``details["choice"]`` holds the index of the chosen option and
    ``details["n_options"]`` their number.

    The scores are kept in ``Samples.extra`` under :attr:`cache_key`, which
    differs between the scorings, so one never feeds the other:
    ``"option_logliks"`` (letter; shape (n_options,), summed log-prob) and
    ``"option_text_logliks"`` / ``"option_cloze_logliks"`` (text / cloze; shape
    (n_options, 2): summed log-prob and token count, from which both
    normalisations follow).
    """

    needs_generation: ClassVar[bool] = False
    extra_key: ClassVar[str] = "option_logliks"
    text_extra_key: ClassVar[str] = "option_text_logliks"
    cloze_extra_key: ClassVar[str] = "option_cloze_logliks"

    def __init__(self, letters: str = "ABCDE", measure: str = "entropy",
                 prefix: str = " ", scoring: str = "letter", normalize: str = "mean") -> None:
        self.letters = letters
        self.measure = measure
        self.prefix = prefix
        self.scoring = scoring
        self.normalize = normalize

    @property
    def cache_key(self) -> str:
        """The ``Samples.extra`` key of this scoring's option scores."""
        return {"text": self.text_extra_key, "cloze": self.cloze_extra_key}.get(
            str(self.scoring), self.extra_key)

    def sample_request(self) -> SampleRequest:
        return SampleRequest(greedy=False)

    def _check(self) -> tuple[str, str, str]:
        """Validated (measure, scoring, normalize); letters and prefix checked too."""
        owner = type(self).__name__
        if not isinstance(self.letters, str) or not self.letters:
            raise param_error("letters", owner, "a non-empty string of option letters",
                              self.letters, type_error=not isinstance(self.letters, str))
        if not isinstance(self.prefix, str):
            raise param_error("prefix", owner, "a string", self.prefix, type_error=True)
        return (check_choice(self.measure, "measure", owner, ("entropy", "margin")),
                check_choice(self.scoring, "scoring", owner, SCORINGS),
                check_choice(self.normalize, "normalize", owner, NORMALIZATIONS))

    def _options(self, s: Samples) -> list[str]:
        given = s.extra.get("options")
        if given is not None:
            return [str(o) for o in given]
        texts = s.extra.get("option_texts")
        if texts is not None and self.scoring != "letter":
            return list(str(self.letters)[:len(texts)])
        return parse_options(prompt_text(s.prompt), str(self.letters))

    def _option_texts(self, s: Samples, options: list[str]) -> list[str]:
        """Texts of ``options`` (given or parsed); empty when one cannot be found."""
        given = s.extra.get("option_texts")
        if given is not None:
            ok = (not isinstance(given, (str, bytes)) and isinstance(given, Sequence)
                  and all(isinstance(t, str) for t in given) and len(given) == len(options))
            if not ok:
                raise param_error(
                    "samples", type(self).__name__, "Samples whose extra['option_texts'] is "
                    f"a list of {len(options)} strings (one per option letter)", given)
            return list(given)
        parsed = dict(parse_option_texts(prompt_text(s.prompt), options))
        return [parsed[o] for o in options] if all(o in parsed for o in options) else []

    def _continuations(self, s: Samples) -> list[str]:
        options = self._options(s)
        if self.scoring != "letter" and options:
            options = self._option_texts(s, options)
        return [self.prefix + o for o in options]

    def prepare_samples(
        self, samples: list[Samples], model: LanguageModel | None = None
    ) -> list[Samples]:
        owner = type(self).__name__
        _, scoring, _ = self._check()
        key = self.cache_key
        todo = [(i, self._continuations(s)) for i, s in enumerate(samples)
                if key not in s.extra]
        if not todo:
            return samples
        score = getattr(model, "score", None)
        if model is None or not callable(score):
            raise InvalidParameterError(
                f"The 'model' parameter of {owner} must be a model with score() (teacher "
                f"forcing, e.g. HFLanguageModel) when the samples lack option scores. Got "
                f"{type(model).__name__}."
            )
        pairs = [(i, c) for i, conts in todo for c in conts]
        asked = [cloze_prompt(samples[i].prompt) if scoring == "cloze" else samples[i].prompt
                 for i, _ in pairs]
        lls = score(asked, [c for _, c in pairs]) if pairs else []
        per: dict[int, list[tuple[float, int]]] = {}
        for (i, _), ll in zip(pairs, lls):
            per.setdefault(i, []).append((float(np.sum(ll)), int(np.size(ll))))
        out = list(samples)
        for i, _ in todo:
            got = np.asarray(per.get(i, []), dtype=np.float64).reshape(-1, 2)
            value = got[:, 0] if scoring == "letter" else got
            out[i] = replace(out[i], extra={**dict(out[i].extra), key: value})
        return out

    def option_scores(self, s: Samples) -> np.ndarray:
        """The options' scores :math:`\\ell_k` of one prepared sample, shape (n_options,).

        NaN everywhere when an option has no token (it cannot be scored).
        """
        raw = np.asarray(s.extra[self.cache_key], dtype=np.float64)
        if self.scoring == "letter":
            return raw.reshape(-1)
        raw = raw.reshape(-1, 2)
        sums, counts = raw[:, 0], raw[:, 1]
        if np.any(counts <= 0):
            return np.full(len(raw), np.nan)
        return sums / counts if self.normalize == "mean" else sums

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        measure, _, _ = self._check()
        samples = self.prepare_samples(list(samples), model)
        n = len(samples)
        scores, choice, count = np.full(n, np.nan), np.full(n, -1.0), np.zeros(n)
        for i, s in enumerate(samples):
            ll = self.option_scores(s)
            count[i] = len(ll)
            if len(ll) < 2 or not np.all(np.isfinite(ll)):
                continue
            choice[i], scores[i] = _spread(ll, measure)
        return scores, {"choice": choice, "n_options": count}


def _spread(ll: np.ndarray, measure: str) -> tuple[float, float]:
    """(index of the best option, entropy or 1 - margin of softmax(ll))."""
    p = np.exp(ll - ll.max())
    p /= p.sum()
    top = np.sort(p)[::-1]
    value: Any = (-(p[p > 0] * np.log(p[p > 0])).sum() if measure == "entropy"
                  else 1.0 - (top[0] - top[1]))
    return float(np.argmax(ll)), float(value)
