"""Multiple choice: the answer is the most likely option, the uncertainty its spread.

For a prompt that lists options (``A. ...``, ``(B) ...``, ``C) ...`` on their own
lines), the edge model scores each option letter as the continuation of the
prompt by teacher forcing (``model.score``; one batched forward pass, no
decoding). The answer is the option with the highest log-likelihood, and the
uncertainty is the entropy of the option distribution

.. math::

    p_k = \\operatorname{softmax}_k(\\ell_k), \\qquad H = -\\sum_k p_k \\log p_k,

or one minus the margin :math:`1 - (p_{(1)} - p_{(2)})` between the two most
likely options.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

import numpy as np

from confroute._validation import check_choice, param_error
from confroute.errors import InvalidParameterError
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import Samples, prompt_text

__all__ = ["OptionEntropy", "parse_options"]

_OPTION = re.compile(r"^\s*\(?([A-Z])[\.\):]\s+\S", re.MULTILINE)


def parse_options(text: str, letters: Sequence[str]) -> list[str]:
    """Option letters listed in ``text`` (one per line, in order, among ``letters``)."""
    found = [m.group(1) for m in _OPTION.finditer(text)]
    out = [c for c in dict.fromkeys(found) if c in letters]
    return out if len(out) >= 2 else []


@estimator_registry.register("option_entropy")
class OptionEntropy(UncertaintyEstimator):
    """Entropy (or 1 - margin) of the edge model's distribution over answer options.

    Parameters
    ----------
    letters : str, default "ABCDE"
        Option letters recognised in the prompt.
    measure : {"entropy", "margin"}, default "entropy"
    prefix : str, default " "
        Text before the letter in the scored continuation (after "Answer:" a
        space is the natural token boundary).

    Notes
    -----
    Options are taken from ``Samples.extra["options"]`` (a list of letters) when
    the caller passes them, else parsed from the prompt. A prompt with fewer than
    two options scores NaN (counted as unscored). ``details["choice"]`` holds the
    index of the chosen option and ``details["n_options"]`` their number.
    """

    needs_generation: ClassVar[bool] = False
    extra_key: ClassVar[str] = "option_logliks"

    def __init__(self, letters: str = "ABCDE", measure: str = "entropy",
                 prefix: str = " ") -> None:
        self.letters = letters
        self.measure = measure
        self.prefix = prefix

    def sample_request(self) -> SampleRequest:
        return SampleRequest(greedy=False)

    def _options(self, s: Samples) -> list[str]:
        given = s.extra.get("options")
        if given is not None:
            return [str(o) for o in given]
        return parse_options(prompt_text(s.prompt), str(self.letters))

    def prepare_samples(
        self, samples: list[Samples], model: LanguageModel | None = None
    ) -> list[Samples]:
        owner = type(self).__name__
        if not isinstance(self.letters, str) or not self.letters:
            raise param_error("letters", owner, "a non-empty string of option letters",
                              self.letters, type_error=not isinstance(self.letters, str))
        if not isinstance(self.prefix, str):
            raise param_error("prefix", owner, "a string", self.prefix, type_error=True)
        todo = [(i, self._options(s)) for i, s in enumerate(samples)
                if self.extra_key not in s.extra]
        if not todo:
            return samples
        score = getattr(model, "score", None)
        if model is None or not callable(score):
            raise InvalidParameterError(
                f"The 'model' parameter of {owner} must be a model with score() (teacher "
                f"forcing, e.g. HFLanguageModel) when the samples lack option scores. Got "
                f"{type(model).__name__}."
            )
        pairs = [(i, o) for i, opts in todo for o in opts]
        lls = score([samples[i].prompt for i, _ in pairs],
                    [self.prefix + o for _, o in pairs]) if pairs else []
        per: dict[int, list[float]] = {}
        for (i, _), ll in zip(pairs, lls):
            per.setdefault(i, []).append(float(np.sum(ll)))
        out = list(samples)
        for i, _ in todo:
            extra = {**dict(out[i].extra), self.extra_key: np.asarray(per.get(i, []), float)}
            out[i] = replace(out[i], extra=extra)
        return out

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        measure = check_choice(self.measure, "measure", type(self).__name__,
                               ("entropy", "margin"))
        samples = self.prepare_samples(list(samples), model)
        n = len(samples)
        scores, choice, count = np.full(n, np.nan), np.full(n, -1.0), np.zeros(n)
        for i, s in enumerate(samples):
            ll = np.asarray(s.extra[self.extra_key], dtype=np.float64)
            count[i] = len(ll)
            if len(ll) < 2:
                continue
            p = np.exp(ll - ll.max())
            p /= p.sum()
            choice[i] = float(np.argmax(ll))
            top = np.sort(p)[::-1]
            scores[i] = (float(-(p[p > 0] * np.log(p[p > 0])).sum()) if measure == "entropy"
                         else 1.0 - float(top[0] - top[1]))
        return scores, {"choice": choice, "n_options": count}
