"""LLM-as-a-judge with any :class:`~confroute.models.base.LanguageModel` as the judge.

Two protocols:

* :class:`BestOfKJudge`, the protocol of Zhang et al. (2025): the judge sees a
  question, its ground truth and K anonymised responses (shuffled with a seed,
  labelled "Response 1..K") and names the best one(s); ties are allowed. The score
  of a model is the share of queries on which it was selected, in percent.
* :class:`MTBenchJudge`, MT-Bench single-answer grading (Zheng et al., 2023) with
  the judge prompts of the user's FastChat ``judge_prompts.jsonl`` (read at run
  time, never bundled): a 1-10 rating written as ``[[rating]]``.

Verdicts that cannot be parsed are counted and reported, never dropped: they
count as "nobody selected" / NaN rating.

References
----------
.. [1] Zhang et al., "Leveraging Uncertainty Estimation for Efficient LLM
   Routing", arXiv:2502.11021, 2025.
.. [2] Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena",
   NeurIPS 2023 Datasets and Benchmarks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from confroute._validation import check_int, check_same_length, param_error
from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.evaluation.datasets import DatasetFormatError, Example
from confroute.models.base import LanguageModel
from confroute.types import GenerationConfig, Prompt

__all__ = [
    "BestOfKJudge",
    "BestOfKResult",
    "JudgePrompt",
    "MTBenchJudge",
    "MTBenchResult",
    "load_judge_prompts",
    "parse_best_verdict",
    "parse_rating",
]

_DEFAULT_CONFIG = GenerationConfig(max_new_tokens=1024, temperature=0.0)


def _check_judge(judge: Any, owner: str) -> LanguageModel:
    if not isinstance(judge, LanguageModel):
        raise param_error("judge", owner, "a LanguageModel (with .name and .generate)", judge,
                          type_error=True)
    return judge


def _check_config(config: Any, owner: str) -> GenerationConfig:
    if config is None:
        return _DEFAULT_CONFIG
    if not isinstance(config, GenerationConfig) or config.n != 1:
        raise param_error("config", owner, "a GenerationConfig with n=1 or None", config,
                          type_error=not isinstance(config, GenerationConfig))
    return config


# ---------------------------------------------------------------- best-of-K protocol

_NUM_LIST = r"\d+(?:\s*(?:,|&|and|/)\s*(?:responses?\s*)?\d+)*"
_BRACKETS = re.compile(r"\[\[\s*(" + _NUM_LIST + r")\s*\]\]", re.IGNORECASE)
_BEST_LABEL = re.compile(
    r"best(?:\s+responses?)?\s*(?:is|are|:|=)\s*(?:both\s+)?(?:responses?\s*)?#?(" + _NUM_LIST
    + r")",
    re.IGNORECASE,
)
_RESPONSES_ARE = re.compile(
    r"responses?\s*#?(" + _NUM_LIST + r")\s+(?:is|are)\s+(?:both\s+|all\s+)?"
    r"(?:the\s+)?(?:best|equally\s+good|equally\s+correct|tied|better)",
    re.IGNORECASE,
)
_RESPONSE_MENTION = re.compile(r"responses?\s*#?(\d+)", re.IGNORECASE)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(x) for x in re.findall(r"\d+", text)}))


def parse_best_verdict(text: str, k: int) -> tuple[int, ...] | None:
    """The response label(s) (1-based) a best-of-K verdict selects, or None.

    Rules, the first that applies decides (within a rule, the **last** match
    wins, since judges usually conclude at the end):

    1. a bracketed list ``[[2]]`` / ``[[1, 3]]``;
    2. a "best" statement: ``Best: Response 2``, ``The best response is 3``,
       ``Best responses are 1 and 2``;
    3. ``Response(s) 1 and 2 are equally good / the best / tied``;
    4. the text mentions exactly one response label and nothing else.

    Labels outside ``1..k`` make the verdict unparseable (None).

    Parameters
    ----------
    text : str
    k : int
        Number of responses shown.

    Returns
    -------
    tuple of int or None
    """
    if not isinstance(text, str):
        raise param_error("text", "parse_best_verdict", "a str", text, type_error=True)
    k = int(check_int(k, "k", "parse_best_verdict", min_value=1) or 1)
    found: tuple[int, ...] | None = None
    for pattern in (_BRACKETS, _BEST_LABEL, _RESPONSES_ARE):
        matches = list(pattern.finditer(text))
        if matches:
            found = _ints(matches[-1].group(1))
            break
    if found is None:
        mentioned = {int(m.group(1)) for m in _RESPONSE_MENTION.finditer(text)}
        if len(mentioned) == 1:
            found = tuple(mentioned)
    if not found or any(not 1 <= i <= k for i in found):
        return None
    return found


@dataclass(frozen=True)
class BestOfKResult:
    """Outcome of :meth:`BestOfKJudge.evaluate`.

    Attributes
    ----------
    scores : mapping of str to float
        Per model, ``100 * (queries where it was selected) / (all queries)``;
        unparseable verdicts count in the denominator.
    selected : list of tuple of str
        Per query, the models the judge selected (empty if unparseable).
    verdicts : list of str
        Raw judge outputs.
    orders : list of tuple of str
        Per query, the model shown as "Response 1", "Response 2", ...
    n_unparseable : int
    """

    scores: Mapping[str, float]
    selected: list[tuple[str, ...]]
    verdicts: list[str]
    orders: list[tuple[str, ...]]
    n_unparseable: int


class BestOfKJudge:
    """Best-of-K judging of anonymised responses (Zhang et al., 2025).

    Parameters
    ----------
    judge : LanguageModel
        The judge (any backend; a :class:`~confroute.evaluation.RecordedModel`
        replays scripted verdicts).
    seed : int, default 0
        Seed of the per-query shuffle of the responses.
    config : GenerationConfig, optional
        Judge decoding (default greedy, 1024 new tokens).
    """

    def __init__(self, judge: LanguageModel, *, seed: int = 0,
                 config: GenerationConfig | None = None) -> None:
        self.judge = _check_judge(judge, "BestOfKJudge")
        self.seed = int(check_int(seed, "seed", "BestOfKJudge", min_value=0) or 0)
        self.config = _check_config(config, "BestOfKJudge")

    @staticmethod
    def format_prompt(question: str, ground_truth: str, responses: Sequence[str]) -> str:
        """The judge prompt for one query (responses already in display order)."""
        k = len(responses)
        shown = "\n\n".join(f"[Response {i + 1}]\n{r}\n[End of Response {i + 1}]"
                            for i, r in enumerate(responses))
        return (
            f"You are grading {k} candidate responses to a question. The correct answer is "
            "given. Decide which response(s) answer the question best: correct first, then "
            "clear and complete. Several responses may be equally good.\n\n"
            f"[Question]\n{question}\n\n[Ground truth]\n{ground_truth}\n\n{shown}\n\n"
            "Explain briefly, then end with the number(s) of the best response(s) in double "
            f"brackets, e.g. [[2]] or [[1, 3]] (numbers from 1 to {k})."
        )

    def build_prompts(
        self, questions: Sequence[str], ground_truths: Sequence[str],
        responses: Mapping[str, Sequence[str]],
    ) -> tuple[list[str], list[tuple[str, ...]]]:
        """Judge prompts and display orders (model names by label), seeded.

        Parameters
        ----------
        questions, ground_truths : sequence of str, shape (n_queries,)
        responses : mapping of model name to sequence of str, each (n_queries,)

        Returns
        -------
        prompts : list of str
        orders : list of tuple of str
            ``orders[q][i]`` is the model shown as "Response i+1" for query q.
        """
        owner = "BestOfKJudge"
        if not isinstance(responses, Mapping) or len(responses) < 2:
            raise param_error("responses", owner, "a mapping of at least 2 model names to "
                              "answer lists", responses, type_error=not isinstance(
                                  responses, Mapping))
        check_same_length(owner, questions=questions, ground_truths=ground_truths,
                          **{f"responses[{m!r}]": r for m, r in responses.items()})
        models = list(responses)
        rng = np.random.default_rng(self.seed)
        prompts, orders = [], []
        for q in range(len(questions)):
            order = tuple(models[i] for i in rng.permutation(len(models)))
            prompts.append(self.format_prompt(
                str(questions[q]), str(ground_truths[q]),
                [str(responses[m][q]) for m in order]))
            orders.append(order)
        return prompts, orders

    def evaluate(
        self, questions: Sequence[str], ground_truths: Sequence[str],
        responses: Mapping[str, Sequence[str]],
    ) -> BestOfKResult:
        """Judge every query and score the models (see :class:`BestOfKResult`)."""
        prompts, orders = self.build_prompts(questions, ground_truths, responses)
        outs = self.judge.generate(list(prompts), self.config)
        verdicts = [o[0].text for o in outs]
        counts = dict.fromkeys(responses, 0)
        selected: list[tuple[str, ...]] = []
        bad = 0
        for verdict, order in zip(verdicts, orders):
            labels = parse_best_verdict(verdict, len(order))
            if labels is None:
                bad += 1
                selected.append(())
                continue
            chosen = tuple(order[i - 1] for i in labels)
            for m in chosen:
                counts[m] += 1
            selected.append(chosen)
        n = len(prompts)
        return BestOfKResult(
            scores={m: 100.0 * c / n for m, c in counts.items()}, selected=selected,
            verdicts=verdicts, orders=orders, n_unparseable=bad,
        )


# ---------------------------------------------------------------- MT-Bench single grading

_DOUBLE = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_SINGLE = re.compile(r"(?<!\[)\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\](?!\])")


def parse_rating(text: str) -> float | None:
    """The 1-10 rating of an MT-Bench single-answer verdict, or None.

    The last ``[[x]]`` (``x`` an integer or decimal, optionally ``x/10``) is the
    rating; without any, the last single-bracket ``[x]``. A rating outside
    [1, 10] makes the verdict unparseable.
    """
    if not isinstance(text, str):
        raise param_error("text", "parse_rating", "a str", text, type_error=True)
    matches = _DOUBLE.findall(text) or _SINGLE.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if 1.0 <= value <= 10.0 else None


@dataclass(frozen=True)
class JudgePrompt:
    """One entry of FastChat's ``judge_prompts.jsonl``."""

    name: str
    type: str
    system_prompt: str
    prompt_template: str
    output_format: str = ""
    category: str = ""


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """Read FastChat judge prompts (``judge_prompts.jsonl``) keyed by ``name``."""
    owner = "load_judge_prompts"
    if not isinstance(path, (str, Path)):
        raise param_error("path", owner, "a path", path, type_error=True)
    p = Path(path)
    if not p.is_file():
        raise param_error("path", owner, "an existing file", str(p))
    out: dict[str, JudgePrompt] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["name"]] = JudgePrompt(
                name=str(row["name"]), type=str(row.get("type", "")),
                system_prompt=str(row["system_prompt"]),
                prompt_template=str(row["prompt_template"]),
                output_format=str(row.get("output_format", "")),
                category=str(row.get("category", "")),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DatasetFormatError(f"{p}: line {lineno} is not a judge prompt ({err}).") from None
    return out


@dataclass(frozen=True)
class MTBenchResult:
    """Outcome of :meth:`MTBenchJudge.evaluate`.

    Attributes
    ----------
    ratings : ndarray of shape (n_questions,)
        1-10 ratings, NaN where the verdict was unparseable.
    verdicts : list of str
    prompt_names : list of str
        Judge prompt used per question.
    n_unparseable : int
    """

    ratings: np.ndarray
    verdicts: list[str]
    prompt_names: list[str]
    n_unparseable: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean rating over the parseable verdicts (NaN if none)."""
        ok = self.ratings[~np.isnan(self.ratings)]
        return float(ok.mean()) if ok.size else math.nan


class _Fields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise InvalidParameterError(
            f"The judge prompt template needs the field {{{key}}}, which MTBenchJudge does not "
            f"provide (it fills question, answer, ref_answer and their _1/_2 turn variants)."
        )


class MTBenchJudge:
    """MT-Bench single-answer grading with FastChat judge prompts.

    Prompt choice follows MT-Bench: questions with a reference answer (math,
    reasoning, coding) use ``single-math-v1``, the others ``single-v1``; turn 2
    uses the ``-multi-turn`` variants.

    Parameters
    ----------
    judge : LanguageModel
    prompts : path or mapping of str to JudgePrompt
        The user's ``judge_prompts.jsonl`` (or its parsed content).
    config : GenerationConfig, optional
        Judge decoding (default greedy, 1024 new tokens).
    """

    def __init__(self, judge: LanguageModel, prompts: str | Path | Mapping[str, JudgePrompt],
                 *, config: GenerationConfig | None = None) -> None:
        self.judge = _check_judge(judge, "MTBenchJudge")
        self.prompts = (dict(prompts) if isinstance(prompts, Mapping)
                        else load_judge_prompts(prompts))
        self.config = _check_config(config, "MTBenchJudge")

    def _template(self, name: str) -> JudgePrompt:
        if name not in self.prompts:
            raise InvalidParameterError(
                f"The 'prompts' parameter of MTBenchJudge has no judge prompt {name!r}. "
                f"Available: {', '.join(sorted(self.prompts))}."
            )
        return self.prompts[name]

    def build_prompt(self, example: Example, answers: Sequence[str], turn: int = 1
                     ) -> tuple[str, Prompt]:
        """(judge prompt name, chat prompt) for one question and one model's answer turns."""
        owner = "MTBenchJudge"
        if not isinstance(example, Example):
            raise param_error("example", owner, "an Example", example, type_error=True)
        turn = int(check_int(turn, "turn", owner, min_value=1, max_value=2) or 1)
        questions = [str(t) for t in example.meta.get("turns", (example.prompt,))]
        reference = [str(r) for r in (example.meta.get("reference") or example.gold)]
        if len(answers) < turn or len(questions) < turn:
            raise InvalidParameterError(
                f"The 'answers' parameter of {owner} must hold {turn} turn(s) for question "
                f"{example.id!r}. Got {len(answers)} answer turn(s) and {len(questions)} "
                "question turn(s)."
            )
        name = "single-math-v1" if reference else "single-v1"
        if turn == 2:
            name += "-multi-turn"
        tpl = self._template(name)
        fields = _Fields(question=questions[0], answer=str(answers[0]),
                         question_1=questions[0], answer_1=str(answers[0]))
        if turn == 2:
            fields.update(question_2=questions[1], answer_2=str(answers[1]))
        if reference:
            fields.update(ref_answer=reference[0], ref_answer_1=reference[0])
            if len(reference) > 1:
                fields["ref_answer_2"] = reference[1]
        user = tpl.prompt_template.format_map(fields)
        chat = ({"role": "system", "content": tpl.system_prompt},
                {"role": "user", "content": user})
        return name, chat

    def evaluate(self, examples: Sequence[Example], model: str | Sequence[Sequence[str]],
                 *, turn: int = 1) -> MTBenchResult:
        """Rate one model's answers to MT-Bench questions.

        Parameters
        ----------
        examples : sequence of Example
            From :func:`~confroute.evaluation.datasets.load_mt_bench`.
        model : str or sequence of sequences of str
            A model name whose answers are recorded in the examples
            (``meta["answers"]``, else ``recorded`` for turn 1), or the answer
            turns per example.
        turn : {1, 2}

        Returns
        -------
        MTBenchResult
        """
        owner = "MTBenchJudge"
        if isinstance(model, str):
            all_answers = []
            for ex in examples:
                turns = ex.meta.get("answers", {}).get(model)
                if turns is None and model in ex.recorded:
                    turns = (ex.recorded[model],)
                if turns is None:
                    raise InvalidParameterError(
                        f"The 'model' parameter of {owner} names {model!r}, which has no "
                        f"recorded answer for question {ex.id!r}."
                    )
                all_answers.append(list(turns))
        else:
            if not isinstance(model, Sequence):
                raise InvalidTypeError(
                    f"The 'model' parameter of {owner} must be a model name or answer turns "
                    f"per example. Got {type(model).__name__}."
                )
            check_same_length(owner, examples=examples, model=model)
            all_answers = [list(a) for a in model]
        built = [self.build_prompt(ex, a, turn) for ex, a in zip(examples, all_answers)]
        outs = self.judge.generate([b[1] for b in built], self.config)
        verdicts = [o[0].text for o in outs]
        parsed = [parse_rating(v) for v in verdicts]
        ratings = np.array([math.nan if r is None else r for r in parsed], dtype=float)
        return MTBenchResult(ratings=ratings, verdicts=verdicts,
                             prompt_names=[b[0] for b in built],
                             n_unparseable=sum(r is None for r in parsed))

