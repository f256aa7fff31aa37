"""Labels without references: was the edge answer good?

Calibrating a router needs a 0/1 label per edge answer. On your own traffic there
is no reference answer, so a *labeler* makes the label from a stronger source:

:class:`CloudAgreementLabeler`
    The cloud model answers the prompt; the edge answer is good when it says the
    same thing. Answers are compared, not sentences: both sides are cut to their
    short answer first (:func:`short_answer`: the first line / sentence, without
    "The answer is" / "Answer:" and trailing punctuation). Backends:
    ``"exact"`` (containment both ways of the normalised short answers, numbers
    compared as numbers, :func:`answers_agree`), ``"embedding"`` (cosine of
    MiniLM sentence embeddings of the short answers, ``>= threshold``) and
    ``"nli"`` (bidirectional entailment of "question + short answer" statements
    with a local sequence-classification NLI model).
:class:`JudgeLabeler`
    An LLM judge (any :class:`~confroute.models.base.LanguageModel`) grades the
    edge answer against the cloud answer.
:class:`SEPreferenceLabeler`
    The semantic-entropy preference labels of Zhang et al. (2025): the edge
    answer is good when the edge (weak) model's samples are markedly more
    consistent than the cloud (strong) model's.

Every labeler returns floats: 1 = the edge answer is good, 0 = bad, NaN =
unknown (a cloud or judge call failed, a verdict could not be parsed, an SE tie
with ``ties="drop"``). Unknown labels are never guessed; they are counted in
:meth:`Labeler.describe` together with the cost of labelling (cloud and judge
requests, tokens, seconds).

Judge prompts
-------------
Pairwise mode (adapted from MT-Bench's ``pair-v2`` prompt, Zheng et al. 2023),
sent as a system message then a user message::

    [system]
    Please act as an impartial judge and evaluate the quality of the responses
    provided by two AI assistants to the user question displayed below. Choose the
    assistant whose answer is more correct and answers the question better. Begin
    your evaluation by comparing the two responses and provide a short
    explanation. Avoid any position biases and ensure that the order in which the
    responses were presented does not influence your decision. Do not allow the
    length of the responses to influence your evaluation. Be as objective as
    possible. After providing your explanation, output your final verdict by
    strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if
    assistant B is better, and "[[C]]" for a tie.
    [user]
    [User Question]
    {question}

    [The Start of Assistant A's Answer]
    {answer_a}
    [The End of Assistant A's Answer]

    [The Start of Assistant B's Answer]
    {answer_b}
    [The End of Assistant B's Answer]

The judge sees both orders (edge as A, then edge as B). The label is 1 when the
edge answer is judged at least as good in **both** orders (its win or a tie
``[[C]]`` each time), 0 when it loses in at least one order (so a verdict that
flips with the order, a position bias, counts as a loss for the edge answer), and
NaN when either verdict cannot be parsed. The verdict is the last
``[[A]]`` / ``[[B]]`` / ``[[C]]`` in the reply (judges conclude at the end).

Single mode (MT-Bench single-answer grading with a reference; the reference is
the cloud answer)::

    [system]
    Please act as an impartial judge and evaluate the correctness of the response
    provided by an AI assistant to the user question displayed below. A reference
    answer is given: the response is correct when it agrees with the reference
    answer on what the question asks, whatever its wording or length. Begin your
    evaluation by comparing the response with the reference answer and provide a
    short explanation. After providing your explanation, output your final verdict
    by strictly following this format: "[[CORRECT]]" or "[[INCORRECT]]".
    [user]
    [Question]
    {question}

    [The Start of Reference Answer]
    {reference}
    [The End of Reference Answer]

    [The Start of Assistant's Answer]
    {answer}
    [The End of Assistant's Answer]

The label is 1 for ``[[CORRECT]]``, 0 for ``[[INCORRECT]]`` (the last one in
the reply), NaN otherwise.

References
----------
.. [1] Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena",
   NeurIPS 2023 Datasets and Benchmarks.
.. [2] Zhang et al., "Leveraging Uncertainty Estimation for Efficient LLM
   Routing", arXiv:2502.11021, 2025.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confroute._params import ParamsMixin
from confroute._registry import Registry
from confroute._serialization import write_atomic
from confroute._validation import (
    check_array,
    check_choice,
    check_float,
    check_int,
    check_prompts,
    check_same_length,
    param_error,
)
from confroute.errors import InvalidParameterError, SerializationError
from confroute.estimators.answers import extract_number, normalize_answer
from confroute.models.base import LanguageModel
from confroute.types import GenerationConfig, Prompt, Sample, Samples, prompt_text

__all__ = [
    "AnswerLabeler",
    "CloudAgreementLabeler",
    "JudgeLabeler",
    "Labeler",
    "SEPreferenceLabeler",
    "agreement_kappa",
    "answers_agree",
    "labeler_registry",
    "parse_pairwise_verdict",
    "parse_single_verdict",
    "read_labels_jsonl",
    "short_answer",
    "write_labels_jsonl",
]

_CLOUD_DEFAULT = GenerationConfig(max_new_tokens=256, temperature=0.0)
_JUDGE_DEFAULT = GenerationConfig(max_new_tokens=512, temperature=0.0)

# --------------------------------------------------------------------------- answers

_PREFIX = re.compile(
    r"^\s*(?:(?:so|thus|therefore)\s*,?\s*)?(?:the\s+)?(?:final\s+|correct\s+|short\s+)?"
    r"answer\s*(?:is|would\s+be|:|=|-)\s*",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s")


def short_answer(text: str) -> str:
    """The short answer of a generation, with its original casing.

    The first non-empty line, cut at its first sentence end (``.``, ``!`` or
    ``?`` followed by whitespace, so ``3.5`` stays whole), without a leading
    "Answer:" / "The answer is" / "Final answer:" and without trailing
    punctuation or spaces.

    Parameters
    ----------
    text : str

    Returns
    -------
    str
        Possibly empty.
    """
    line = next((ln for ln in str(text).splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line.strip())
    first = _SENTENCE.split(line, maxsplit=1)[0]
    return first.strip().rstrip(".!?,;:").strip()


def answers_agree(edge: str, cloud: str) -> bool:
    """Do two generations give the same short answer (the ``"exact"`` backend)?

    Both are cut with :func:`short_answer` and normalised
    (:func:`~confroute.estimators.answers.normalize_answer`). When both short
    answers hold a number, they agree iff their final numbers are equal.
    Otherwise they agree when either normalised answer contains the other as
    whole words ("Paris" and "The capital of France is Paris" agree). An empty
    answer agrees with nothing.

    Parameters
    ----------
    edge, cloud : str

    Returns
    -------
    bool
    """
    se, sc = short_answer(edge), short_answer(cloud)
    ne, nc = normalize_answer(se), normalize_answer(sc)
    if not ne or not nc:
        return False
    xe, xc = extract_number(se), extract_number(sc)
    if xe is not None and xc is not None:
        return bool(math.isclose(float(xe), float(xc), rel_tol=1e-9, abs_tol=1e-12))
    return f" {ne} " in f" {nc} " or f" {nc} " in f" {ne} "


# --------------------------------------------------------------------------- base


class Labeler(ParamsMixin, ABC):
    """Makes 0/1/NaN labels for edge answers without reference answers.

    Subclasses store their constructor arguments unchanged, check them in
    :meth:`_validate` (called by :meth:`label` before any generation) and
    implement :meth:`_label`.

    Attributes
    ----------
    counts_ : dict of str to int
        ``good``, ``bad``, ``unknown`` over every :meth:`label` call, plus the
        reasons of unknown labels (``cloud_failed``, ``unparseable``, ...).
    cost_ : dict of str to float
        ``cloud_requests``, ``judge_requests``, ``failed_requests``,
        ``prompt_tokens``, ``completion_tokens``, ``cloud_cost`` (from the
        model's ``cost_of`` when it has one) and ``seconds``.
    """

    @property
    def name(self) -> str:
        """Registered name (class name when unregistered)."""
        return str(getattr(type(self), "_registry_name", type(self).__name__))

    def label(self, prompts: Sequence[Prompt], edge_samples: Sequence[Samples]) -> np.ndarray:
        """Label the edge answers of a batch.

        Parameters
        ----------
        prompts : sequence of Prompt, length n
        edge_samples : sequence of Samples, length n
            The edge generations; ``edge_samples[i].greedy`` is the edge answer.

        Returns
        -------
        ndarray of float64 of shape (n,)
            1 = edge answer good, 0 = bad, NaN = unknown.
        """
        owner = f"{type(self).__name__}.label"
        plist = check_prompts(prompts, owner)
        slist = _check_samples(edge_samples, owner)
        check_same_length(owner, prompts=plist, edge_samples=slist)
        self._validate()
        t0 = time.perf_counter()
        out = self._label(plist, slist)
        self._account(out, {}, seconds=time.perf_counter() - t0)
        return out

    def describe(self) -> dict[str, Any]:
        """What made the labels: backend, parameters, label balance and cost (JSON-safe)."""
        params = {k: _json_safe(v) for k, v in self.get_params(deep=False).items()}
        return {
            "labeler": self.name,
            "backend": self._backend(),
            "threshold": self._threshold(),
            "params": params,
            "counts": dict(self._counts()),
            "cost": dict(self._costs()),
        }

    # -- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    def _validate(self) -> None:
        """Check every parameter (and that the needed models are there)."""

    @abstractmethod
    def _label(self, prompts: list[Prompt], samples: list[Samples]) -> np.ndarray:
        """Labels of shape (n,) in {0, 1, NaN}."""

    def _backend(self) -> str:
        return self.name

    def _threshold(self) -> float | None:
        return None

    # -- bookkeeping ----------------------------------------------------------------------
    def _counts(self) -> dict[str, int]:
        if not hasattr(self, "counts_"):
            self.counts_ = {"good": 0, "bad": 0, "unknown": 0}
        return self.counts_

    def _costs(self) -> dict[str, float]:
        if not hasattr(self, "cost_"):
            self.cost_ = dict.fromkeys(
                ("cloud_requests", "judge_requests", "failed_requests", "prompt_tokens",
                 "completion_tokens", "cloud_cost", "seconds"), 0.0)
        return self.cost_

    def _account(self, labels: np.ndarray, reasons: Mapping[str, int], *, seconds: float) -> None:
        counts = self._counts()
        counts["good"] += int(np.sum(labels == 1.0))
        counts["bad"] += int(np.sum(labels == 0.0))
        counts["unknown"] += int(np.isnan(labels).sum())
        for k, v in reasons.items():
            counts[k] = counts.get(k, 0) + int(v)
        self._costs()["seconds"] += float(seconds)

    def _unknown(self, reason: str, n: int = 1) -> None:
        counts = self._counts()
        counts[reason] = counts.get(reason, 0) + n

    def _generate(
        self, model: LanguageModel, prompts: list[Prompt], config: GenerationConfig, kind: str
    ) -> list[list[Sample] | None]:
        """Batched generation with failures isolated per prompt (None) and cost recorded."""
        out = _isolated_generate(model, prompts, config)
        cost = self._costs()
        cost[f"{kind}_requests"] += len(prompts)
        cost_of = getattr(model, "cost_of", None)
        for res in out:
            if res is None:
                cost["failed_requests"] += 1
                continue
            cost["prompt_tokens"] += float(res[0].prompt_tokens or 0)
            cost["completion_tokens"] += float(sum(s.n_tokens for s in res))
            if callable(cost_of):
                # A gap in the price table must not lose the labels.
                with contextlib.suppress(Exception):
                    cost["cloud_cost"] += float(cost_of(res))
        return out


class AnswerLabeler(Labeler):
    """A labeler that compares one edge answer with one cloud answer.

    :meth:`label` asks ``cloud`` for its answers; :meth:`label_answers` labels
    answers already at hand (e.g. a shadow request served by the cloud).
    """

    cloud: Any
    cloud_config: Any

    def label_answers(
        self,
        prompts: Sequence[Prompt],
        edge_answers: Sequence[str],
        cloud_answers: Sequence[str | None],
    ) -> np.ndarray:
        """Label edge answers against given cloud answers (no cloud call).

        Parameters
        ----------
        prompts : sequence of Prompt, length n
        edge_answers : sequence of str, length n
        cloud_answers : sequence of str or None, length n
            None where the cloud answer is missing (the label is then NaN).

        Returns
        -------
        ndarray of float64 of shape (n,)
        """
        owner = f"{type(self).__name__}.label_answers"
        plist = check_prompts(prompts, owner)
        edge = _check_texts(edge_answers, "edge_answers", owner, allow_none=False)
        cloud = _check_texts(cloud_answers, "cloud_answers", owner, allow_none=True)
        check_same_length(owner, prompts=plist, edge_answers=edge, cloud_answers=cloud)
        self._validate(need_cloud=False)
        t0 = time.perf_counter()
        out, reasons = self._label_with(plist, edge, cloud)
        self._account(out, reasons, seconds=time.perf_counter() - t0)
        return out

    def _validate(self, need_cloud: bool = True) -> None:
        owner = type(self).__name__
        if need_cloud and not isinstance(self.cloud, LanguageModel):
            raise param_error(
                "cloud", owner, "a LanguageModel to answer the prompts (or call "
                "label_answers with the cloud answers)", self.cloud,
                type_error=self.cloud is not None,
            )
        _check_config(self.cloud_config, "cloud_config", owner)
        self._validate_backend()

    @abstractmethod
    def _validate_backend(self) -> None:
        """Check the backend's own parameters (and that its model exists)."""

    @abstractmethod
    def _compare(
        self, prompts: list[Prompt], edge: list[str], cloud: list[str]
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Labels (n,) for answer pairs that all exist, and the reasons of NaNs."""

    def _label(self, prompts: list[Prompt], samples: list[Samples]) -> np.ndarray:
        edge = [_edge_text(s, i) for i, s in enumerate(samples)]
        config = _check_config(self.cloud_config, "cloud_config", type(self).__name__)
        outs = self._generate(self.cloud, prompts, config or _CLOUD_DEFAULT, "cloud")
        cloud = [None if o is None else o[0].text for o in outs]
        out, reasons = self._label_with(prompts, edge, cloud)
        for k, v in reasons.items():
            self._unknown(k, v)
        return out

    def _label_with(
        self, prompts: list[Prompt], edge: list[str], cloud: list[str | None]
    ) -> tuple[np.ndarray, dict[str, int]]:
        out = np.full(len(prompts), np.nan)
        have = [i for i, c in enumerate(cloud) if c is not None]
        reasons = {"cloud_failed": len(prompts) - len(have)} if len(have) < len(prompts) else {}
        if have:
            labels, more = self._compare(
                [prompts[i] for i in have], [edge[i] for i in have],
                [str(cloud[i]) for i in have],
            )
            out[have] = labels
            for k, v in more.items():
                reasons[k] = reasons.get(k, 0) + v
        return out, reasons


labeler_registry: Registry[Labeler] = Registry("labeler", Labeler)  # type: ignore[type-abstract]


# --------------------------------------------------------------------------- cloud agreement


@labeler_registry.register("cloud_agreement")
class CloudAgreementLabeler(AnswerLabeler):
    """The edge answer is good when it agrees with the cloud's answer.

    Parameters
    ----------
    cloud : LanguageModel, optional
        Answers each prompt (one batched call; a failing batch is retried prompt
        by prompt, and prompts whose call still fails get a NaN label). Needed by
        :meth:`label`, not by :meth:`label_answers`.
    backend : {"exact", "embedding", "nli"}, default "exact"
        How the short answers are compared (see the module docstring):
        ``"exact"`` uses :func:`answers_agree`; ``"embedding"`` the cosine of
        sentence embeddings, :math:`\\cos(e_a, e_b) \\ge \\theta`; ``"nli"``
        bidirectional entailment ("strict" mode of
        :class:`~confroute.estimators.equivalence.NLIEquivalence`) of
        "question + short answer" statements. With every backend, two short
        answers that both hold a number are compared as numbers.
    threshold : float in [-1, 1], optional
        Cosine threshold :math:`\\theta` of the ``"embedding"`` backend (default
        0.8, not tuned); must be None for the other backends.
    model_path : path-like, optional
        Local model directory: the NLI sequence-classification model (required
        for ``"nli"``) or the sentence-embedding model for ``"embedding"``
        (default: the all-MiniLM-L6-v2 package). Nothing is downloaded.
    cloud_config : GenerationConfig, optional
        How the cloud answers (default greedy, 256 new tokens).
    """

    def __init__(
        self,
        cloud: LanguageModel | None = None,
        *,
        backend: str = "exact",
        threshold: float | None = None,
        model_path: str | os.PathLike[str] | None = None,
        cloud_config: GenerationConfig | None = None,
    ) -> None:
        self.cloud = cloud
        self.backend = backend
        self.threshold = threshold
        self.model_path = model_path
        self.cloud_config = cloud_config

    def _backend(self) -> str:
        return str(self.backend)

    def _threshold(self) -> float | None:
        if self.backend != "embedding":
            return None
        return 0.8 if self.threshold is None else float(self.threshold)

    def _validate_backend(self) -> None:
        owner = type(self).__name__
        backend = check_choice(self.backend, "backend", owner, ("exact", "embedding", "nli"))
        if backend == "embedding":
            check_float(self.threshold, "threshold", owner, min_value=-1.0, max_value=1.0,
                        allow_none=True)
        elif self.threshold is not None:
            raise param_error("threshold", owner, f"None with backend={backend!r} (only the "
                              "'embedding' backend has a threshold)", self.threshold)
        if backend == "nli" and self.model_path is None:
            raise param_error("model_path", owner, "the local directory of an NLI "
                              "sequence-classification model with backend='nli'", None)
        if self.model_path is not None:
            if not isinstance(self.model_path, (str, os.PathLike)):
                raise param_error("model_path", owner, "a path or None", self.model_path,
                                  type_error=True)
            if not Path(self.model_path).is_dir():
                raise param_error("model_path", owner, "an existing local model directory",
                                  self.model_path)
        if backend == "exact" and self.model_path is not None:
            raise param_error("model_path", owner, "None with backend='exact'", self.model_path)

    def _equivalence(self) -> Any:
        key = (self.backend, str(self.model_path), self._threshold())
        cached = self.__dict__.get("_equiv")
        if cached is not None and cached[0] == key:
            return cached[1]
        from confroute.estimators.equivalence import EmbeddingEquivalence, NLIEquivalence

        equiv: Any
        if self.backend == "nli":
            equiv = NLIEquivalence(self.model_path, mode="strict", include_question=False)
        else:
            embedder = None
            if self.model_path is not None:
                from confroute.models.embedded import Embedder

                embedder = Embedder(os.fspath(self.model_path))
            equiv = EmbeddingEquivalence(embedder, threshold=self._threshold() or 0.0)
        self._equiv = (key, equiv)
        return equiv

    def _compare(
        self, prompts: list[Prompt], edge: list[str], cloud: list[str]
    ) -> tuple[np.ndarray, dict[str, int]]:
        if self.backend == "exact":
            return np.array([float(answers_agree(a, b)) for a, b in zip(edge, cloud)]), {}
        se, sc = [short_answer(a) for a in edge], [short_answer(b) for b in cloud]
        # An empty edge answer is bad; an empty cloud answer tells nothing (NaN).
        out = np.where([bool(s) for s in sc], 0.0, np.nan)
        ok = [i for i in range(len(edge)) if se[i] and sc[i]]
        reasons = {"cloud_empty": int(np.isnan(out).sum())} if np.isnan(out).any() else {}
        # Embeddings and NLI models blur numbers ("41" ~ "42"): two numeric answers
        # are compared as numbers, like the "exact" backend does.
        numeric = [i for i in ok if extract_number(se[i]) is not None
                   and extract_number(sc[i]) is not None]
        for i in numeric:
            out[i] = float(answers_agree(se[i], sc[i]))
        ok = [i for i in ok if i not in set(numeric)]
        if ok:
            if self.backend == "nli":
                qs = [prompt_text(prompts[i]) for i in ok]
                pairs = [(f"{q} {se[i]}", f"{q} {sc[i]}") for q, i in zip(qs, ok)]
            else:
                pairs = [(se[i], sc[i]) for i in ok]
            out[ok] = self._equivalence().equivalent_pairs("", pairs).astype(np.float64)
        return out, reasons


# --------------------------------------------------------------------------- judge

PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user question displayed below. Choose the assistant whose answer "
    "is more correct and answers the question better. Begin your evaluation by comparing the "
    "two responses and provide a short explanation. Avoid any position biases and ensure that "
    "the order in which the responses were presented does not influence your decision. Do not "
    "allow the length of the responses to influence your evaluation. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly "
    'following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is '
    'better, and "[[C]]" for a tie.'
)
PAIRWISE_USER = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)
SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the correctness of the response provided "
    "by an AI assistant to the user question displayed below. A reference answer is given: "
    "the response is correct when it agrees with the reference answer on what the question "
    "asks, whatever its wording or length. Begin your evaluation by comparing the response "
    "with the reference answer and provide a short explanation. After providing your "
    "explanation, output your final verdict by strictly following this format: "
    '"[[CORRECT]]" or "[[INCORRECT]]".'
)
SINGLE_USER = (
    "[Question]\n{question}\n\n[The Start of Reference Answer]\n{reference}\n"
    "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)

_PAIR_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
_SINGLE_VERDICT = re.compile(r"\[\[\s*(CORRECT|INCORRECT)\s*\]\]", re.IGNORECASE)


def parse_pairwise_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"C"`` (tie): the last ``[[X]]`` verdict of a reply, or None."""
    found = _PAIR_VERDICT.findall(str(text))
    return found[-1].upper() if found else None


def parse_single_verdict(text: str) -> bool | None:
    """True for ``[[CORRECT]]``, False for ``[[INCORRECT]]`` (the last one), else None."""
    found = _SINGLE_VERDICT.findall(str(text))
    return found[-1].upper() == "CORRECT" if found else None


@labeler_registry.register("judge")
class JudgeLabeler(AnswerLabeler):
    """An LLM judge decides whether the edge answer is as good as the cloud's.

    See the module docstring for the two prompts and how ties, order flips and
    unparseable verdicts are handled.

    Parameters
    ----------
    judge : LanguageModel, optional
        The judge (required; a cloud model, another local model, ...).
    cloud : LanguageModel, optional
        Answers each prompt for :meth:`label`; not needed by :meth:`label_answers`.
    mode : {"pairwise", "single"}, default "pairwise"
        Pairwise comparison in both orders, or single-answer grading against
        the cloud answer as reference.
    cloud_config, judge_config : GenerationConfig, optional
        Defaults: greedy with 256 / 512 new tokens.
    """

    def __init__(
        self,
        judge: LanguageModel | None = None,
        cloud: LanguageModel | None = None,
        *,
        mode: str = "pairwise",
        cloud_config: GenerationConfig | None = None,
        judge_config: GenerationConfig | None = None,
    ) -> None:
        self.judge = judge
        self.cloud = cloud
        self.mode = mode
        self.cloud_config = cloud_config
        self.judge_config = judge_config

    def _backend(self) -> str:
        return f"judge-{self.mode}"

    def _validate_backend(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.judge, LanguageModel):
            raise param_error("judge", owner, "a LanguageModel (with .name and .generate)",
                              self.judge, type_error=self.judge is not None)
        check_choice(self.mode, "mode", owner, ("pairwise", "single"))
        _check_config(self.judge_config, "judge_config", owner)

    def _prompts(self, prompts: list[Prompt], edge: list[str], cloud: list[str]) -> list[Prompt]:
        out: list[Prompt] = []
        for p, e, c in zip(prompts, edge, cloud):
            q = prompt_text(p)
            if self.mode == "single":
                user = SINGLE_USER.format(question=q, reference=c, answer=e)
                out.append(_chat(SINGLE_SYSTEM, user))
            else:
                out.append(_chat(PAIRWISE_SYSTEM,
                                 PAIRWISE_USER.format(question=q, answer_a=e, answer_b=c)))
                out.append(_chat(PAIRWISE_SYSTEM,
                                 PAIRWISE_USER.format(question=q, answer_a=c, answer_b=e)))
        return out

    def _compare(
        self, prompts: list[Prompt], edge: list[str], cloud: list[str]
    ) -> tuple[np.ndarray, dict[str, int]]:
        config = _check_config(self.judge_config, "judge_config", type(self).__name__)
        assert self.judge is not None  # checked by _validate
        replies = self._generate(self.judge, self._prompts(prompts, edge, cloud),
                                 config or _JUDGE_DEFAULT, "judge")
        texts = [None if r is None else r[0].text for r in replies]
        out = np.full(len(prompts), np.nan)
        reasons = {"judge_failed": 0, "unparseable": 0}
        step = 1 if self.mode == "single" else 2
        for i in range(len(prompts)):
            got = texts[i * step:(i + 1) * step]
            if any(t is None for t in got):
                reasons["judge_failed"] += 1
                continue
            if self.mode == "single":
                ok = parse_single_verdict(str(got[0]))
                if ok is None:
                    reasons["unparseable"] += 1
                else:
                    out[i] = float(ok)
                continue
            first, second = parse_pairwise_verdict(str(got[0])), parse_pairwise_verdict(str(got[1]))
            if first is None or second is None:
                reasons["unparseable"] += 1
            else:  # edge is A in the first order, B in the second
                out[i] = float(first in ("A", "C") and second in ("B", "C"))
        return out, {k: v for k, v in reasons.items() if v}


# --------------------------------------------------------------------------- SE preference


@labeler_registry.register("se_preference")
class SEPreferenceLabeler(Labeler):
    """Semantic-entropy preference labels (Zhang et al., 2025) as edge labels.

    With :math:`SE_{weak}` the semantic entropy of the edge model's samples and
    :math:`SE_{strong}` that of the cloud model's samples,

    .. math::

        \\Delta_{SE} = \\left| \\frac{SE_{strong} - SE_{weak}}{SE_{strong}} \\right|,

    the prompt is won by the model with the lower SE when :math:`\\Delta_{SE} > \\tau`,
    else it is a tie (:func:`confroute.predictive.labels.preference_labels`, which
    also defines the :math:`SE_{strong} = 0` cases). The edge answer is labelled
    good (1) when the edge model wins, bad (0) when the cloud model wins, and
    ties follow ``ties``.

    Parameters
    ----------
    strong : LanguageModel, optional
        The cloud model, sampled ``n_samples`` times per prompt (required).
    edge : LanguageModel, optional
        The edge model, used only when ``edge_samples`` lack the draws needed.
    n_samples : int >= 2, default 5
    tau : float >= 0, default 0.1
    ties : {"drop", "edge", "cloud"}, default "drop"
        Ties become NaN (left out of a fit), 1, or 0.
    equivalence : {"embedding", "nli", "exact"} or Equivalence, default "embedding"
    temperature : float > 0, default 0.7
        Both models are sampled at this temperature, without top-p / top-k
        truncation.
    max_new_tokens : int >= 1, default 64
    seed : int, optional
    """

    def __init__(
        self,
        strong: LanguageModel | None = None,
        *,
        edge: LanguageModel | None = None,
        n_samples: int = 5,
        tau: float = 0.1,
        ties: str = "drop",
        equivalence: Any = "embedding",
        temperature: float = 0.7,
        max_new_tokens: int = 64,
        seed: int | None = None,
    ) -> None:
        self.strong = strong
        self.edge = edge
        self.n_samples = n_samples
        self.tau = tau
        self.ties = ties
        self.equivalence = equivalence
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    def _backend(self) -> str:
        eq = self.equivalence
        return f"se-{eq if isinstance(eq, str) else type(eq).__name__}"

    def _threshold(self) -> float | None:
        return float(self.tau)

    def _validate(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.strong, LanguageModel):
            raise param_error("strong", owner, "a LanguageModel (the cloud model to sample)",
                              self.strong, type_error=self.strong is not None)
        if self.edge is not None and not isinstance(self.edge, LanguageModel):
            raise param_error("edge", owner, "a LanguageModel or None", self.edge,
                              type_error=True)
        check_int(self.n_samples, "n_samples", owner, min_value=2)
        check_float(self.tau, "tau", owner, min_value=0.0)
        check_choice(self.ties, "ties", owner, ("drop", "edge", "cloud"))
        self._estimator().sample_request()  # checks sampling settings and equivalence

    def _estimator(self) -> Any:
        # Kept while the parameters do not change, so the equivalence model loads once.
        from confroute.estimators.semantic import SemanticEntropy

        key = (self.n_samples, self.temperature, self.max_new_tokens, id(self.equivalence),
               str(self.equivalence), self.seed)
        cached = self.__dict__.get("_se")
        if cached is None or cached[0] != key:
            cached = (key, SemanticEntropy(
                n_samples=self.n_samples, temperature=self.temperature, top_p=1.0, top_k=0,
                max_new_tokens=self.max_new_tokens, equivalence=self.equivalence,
                seed=self.seed,
            ))
            self._se = cached
        return cached[1]

    def _label(self, prompts: list[Prompt], samples: list[Samples]) -> np.ndarray:
        from confroute.predictive.labels import preference_labels

        est = self._estimator()
        cfg = est.sample_request().sampling
        se_weak = self._edge_entropy(est, cfg, samples)
        assert self.strong is not None  # checked by _validate
        outs = self._generate(self.strong, prompts, cfg, "cloud")
        ok = [i for i, o in enumerate(outs) if o is not None and len(o) >= cfg.n]
        self._unknown("cloud_failed", len(prompts) - len(ok))
        se_strong = np.full(len(prompts), np.nan)
        if ok:
            strong = [Samples(prompt=prompts[i], draws={cfg.sampling_key(): tuple(outs[i] or ())})
                      for i in ok]
            se_strong[ok] = est.score_samples(strong)[0]
        out = np.full(len(prompts), np.nan)
        both = np.isfinite(se_strong) & np.isfinite(se_weak)
        if both.any():
            won = preference_labels(se_strong[both], se_weak[both], float(self.tau))
            tie = {"drop": np.nan, "edge": 1.0, "cloud": 0.0}[str(self.ties)]
            out[both] = np.where(won == "weak", 1.0, np.where(won == "strong", 0.0, tie))
            self._unknown("tie_dropped", int(np.isnan(out[both]).sum()))
        return out

    def _edge_entropy(self, est: Any, cfg: GenerationConfig, samples: list[Samples]) -> np.ndarray:
        missing = [i for i, s in enumerate(samples) if len(s.sampled(cfg)) < cfg.n]
        if missing and self.edge is None:
            raise param_error(
                "edge", type(self).__name__, f"a LanguageModel: {len(missing)} edge_samples "
                f"lack {cfg.n} draws with this labeler's sampling settings", None,
            )
        if missing:
            from confroute.models.base import collect_samples

            done = collect_samples(self.edge, [samples[i].prompt for i in missing],
                                   [est.sample_request()], existing=[samples[i] for i in missing])
            samples = list(samples)
            for i, s in zip(missing, done):
                samples[i] = s
        return np.asarray(est.score_samples(samples)[0], dtype=np.float64)


# --------------------------------------------------------------------------- files and stats


def write_labels_jsonl(
    path: str | os.PathLike[str],
    prompts: Sequence[Prompt],
    labels: Any,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write labels to review and reuse them: a header line, then one row per prompt.

    The header is ``{"confroute_labels": 1, "meta": meta}``; each row is
    ``{"prompt": ..., "label": 1 | 0 | null}`` (null = unknown). Everything is
    validated first and the file is replaced atomically (the package's one
    durable write: a unique temporary file in the same directory, fsync, then
    ``os.replace``), so a crash never leaves half a file.

    Parameters
    ----------
    path : path-like
    prompts : sequence of Prompt, length n
    labels : array-like of shape (n,)
        1, 0 or NaN.
    meta : mapping, optional
        JSON-serialisable; typically ``labeler.describe()``.

    Returns
    -------
    Path
    """
    owner = "write_labels_jsonl"
    plist = check_prompts(prompts, owner)
    y = _check_label_values(labels, "labels", owner)
    check_same_length(owner, prompts=plist, labels=y)
    if meta is not None and not isinstance(meta, Mapping):
        raise param_error("meta", owner, "a mapping or None", meta, type_error=True)
    try:
        header = json.dumps({"confroute_labels": 1, "meta": dict(meta or {})}, allow_nan=False)
    except (TypeError, ValueError):
        raise param_error("meta", owner, "a JSON-serialisable mapping", meta) from None
    lines = [header] + [
        json.dumps({"prompt": p if isinstance(p, str) else [dict(m) for m in p],
                    "label": None if math.isnan(v) else int(v)}, ensure_ascii=False)
        for p, v in zip(plist, y)
    ]
    return write_atomic(path, "\n".join(lines) + "\n", owner=owner)


def read_labels_jsonl(
    path: str | os.PathLike[str],
) -> tuple[list[Prompt], np.ndarray, dict[str, Any]]:
    """Read what :func:`write_labels_jsonl` wrote.

    Returns
    -------
    prompts : list of Prompt, length n
    labels : ndarray of float64 of shape (n,)
        1, 0 or NaN.
    meta : dict

    Raises
    ------
    SerializationError
        Missing file, bad header, or a bad row.
    """
    p = Path(path)
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise SerializationError(f"No label file at {str(p)!r}.") from None
    try:
        head = json.loads(lines[0]) if lines else None
        if not isinstance(head, dict) or head.get("confroute_labels") != 1:
            raise ValueError("first line is not a confroute_labels header")
        rows = [json.loads(ln) for ln in lines[1:]]
        prompts = [check_prompts([r["prompt"]], "read_labels_jsonl")[0] for r in rows]
        labels = np.array([np.nan if r["label"] is None else float(r["label"]) for r in rows])
        _check_label_values(labels, "labels", "read_labels_jsonl", allow_empty=True)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise SerializationError(f"Label file {str(p)!r} is not valid: {exc}") from None
    return prompts, labels, dict(head.get("meta") or {})


def agreement_kappa(labels: Any, truth: Any) -> float:
    """Cohen's kappa between labels and true labels, NaN labels left out.

    .. math:: \\kappa = \\frac{p_o - p_e}{1 - p_e}

    (:func:`sklearn.metrics.cohen_kappa_score`), with :math:`p_o` the observed
    agreement and :math:`p_e` the agreement expected by chance.

    Parameters
    ----------
    labels : array-like of shape (n,)
        1, 0 or NaN (from a labeler).
    truth : array-like of shape (n,)
        1, 0 or NaN (e.g. graded against references).

    Returns
    -------
    float
        NaN when kappa is undefined (one class only on both sides).
    """
    from sklearn.metrics import cohen_kappa_score

    owner = "agreement_kappa"
    a = _check_label_values(labels, "labels", owner)
    b = _check_label_values(truth, "truth", owner)
    check_same_length(owner, labels=a, truth=b)
    keep = ~np.isnan(a) & ~np.isnan(b)
    if not keep.any():
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must have some position where both labels and "
            "truth are known. Got none."
        )
    ya, yb = a[keep].astype(int), b[keep].astype(int)
    if len(set(ya) | set(yb)) < 2:
        return math.nan
    return float(cohen_kappa_score(ya, yb))


# --------------------------------------------------------------------------- helpers


def _check_label_values(values: Any, name: str, owner: str, *, allow_empty: bool = False
                        ) -> np.ndarray:
    arr = check_array(values, name, owner, allow_nan=True, allow_empty=allow_empty)
    bad = ~np.isnan(arr) & ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must contain only 1, 0 or NaN. "
            f"Got {float(arr[bad][0])!r}."
        )
    return arr.astype(np.float64)


def _check_samples(samples: Any, owner: str) -> list[Samples]:
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)):
        raise param_error("edge_samples", owner, "a list of Samples", samples, type_error=True)
    for i, s in enumerate(samples):
        if not isinstance(s, Samples):
            raise param_error(f"edge_samples[{i}]", owner, "a Samples", s, type_error=True)
    return list(samples)


def _check_texts(values: Any, name: str, owner: str, *, allow_none: bool) -> list[Any]:
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise param_error(name, owner, "a list of str", values, type_error=True)
    for i, v in enumerate(values):
        if not isinstance(v, str) and not (allow_none and v is None):
            raise param_error(f"{name}[{i}]", owner, "a str" + (" or None" if allow_none else ""),
                              v, type_error=True)
    return list(values)


def _check_config(config: Any, name: str, owner: str) -> GenerationConfig | None:
    if config is not None and (not isinstance(config, GenerationConfig) or config.n != 1):
        raise param_error(name, owner, "a GenerationConfig with n=1 or None", config,
                          type_error=not isinstance(config, GenerationConfig))
    return config


def _edge_text(s: Samples, i: int) -> str:
    if s.greedy is None:
        raise param_error(f"edge_samples[{i}]", "Labeler.label",
                          "a Samples holding the edge answer (greedy)", s)
    return s.greedy.text


def _chat(system: str, user: str) -> Prompt:
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


def _isolated_generate(
    model: LanguageModel, prompts: list[Prompt], config: GenerationConfig
) -> list[list[Sample] | None]:
    """One batched call; if it raises, one call per prompt; None where a prompt failed."""
    try:
        res = list(model.generate(prompts, config))
        if len(res) != len(prompts):
            raise ValueError("wrong number of results")
        return [_usable(r) for r in res]
    except Exception:  # any backend failure is isolated per prompt
        if len(prompts) == 1:
            return [None]
    out: list[list[Sample] | None] = []
    for p in prompts:
        try:
            out.append(_usable(model.generate([p], config)[0]))
        except Exception:
            out.append(None)
    return out


def _usable(samples: Sequence[Sample]) -> list[Sample] | None:
    got = list(samples)
    if not got or any(s.finish_reason == "error" for s in got):
        return None
    return got


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, GenerationConfig):
        return {"max_new_tokens": value.max_new_tokens, "temperature": value.temperature}
    return str(getattr(value, "name", type(value).__name__))
