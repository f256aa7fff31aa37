"""Evaluation datasets read from local files in their standard public formats.

Nothing is downloaded: every loader reads a path the user gives. Each returns a
list of :class:`Example`, with the prompt formatted for the question kind, the
accepted gold answers, and, when the file holds model outputs, those outputs as
``recorded`` answers keyed by model name (replay them with
:class:`~confroute.evaluation.RecordedModel`).

Question kinds and how they are graded (``Example.grader``, a name resolved by
:func:`confroute.grading.resolve_grader`, the graders ``Router.calibrate`` uses):

* ``"short"``: short free-text answer, graded ``"contains"`` (a normalised
  alias occurs in the answer as whole words; Natural Questions, TriviaQA);
* ``"number"``: a final number, graded ``"number"`` (GSM8K, arithmetic);
* ``"choice"``: one option letter, graded ``"choice"``; ``gold`` holds the
  correct letter(s) (MMLU, ARC);
* ``"open"``: open-ended answer scored by an LLM judge (MT-Bench); no grader.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confroute._stats import id_split
from confroute._validation import check_choice, param_error
from confroute.errors import ConfrouteError, InvalidParameterError
from confroute.grading import BaseGrader, GraderLike, grader_for_kind, resolve_grader

__all__ = [
    "DatasetFormatError",
    "Example",
    "dataset_names",
    "format_choice_prompt",
    "load_arc",
    "load_dataset",
    "load_gsm8k",
    "load_gsm8k_solutions",
    "load_helm_combined",
    "load_helm_mmlu",
    "load_mmlu_redux",
    "load_mt_bench",
    "load_nq_open",
    "load_triviaqa",
    "split",
]

KINDS = ("short", "number", "choice", "open")
LETTERS = "ABCDEFGHIJ"


class DatasetFormatError(ConfrouteError, ValueError):
    """A dataset file does not have the expected format (names file and record)."""


@dataclass(frozen=True)
class Example:
    """One evaluation question.

    Attributes
    ----------
    id : str
        Stable identifier (used by :func:`split` and to join files).
    prompt : str
        The text sent to a model.
    gold : tuple of str
        Accepted answers: aliases (``"short"``), one number (``"number"``), the
        correct letter(s) (``"choice"``), reference answers or nothing (``"open"``).
    kind : {"short", "number", "choice", "open"}
    choices : tuple of str
        Option texts for ``"choice"`` questions, in letter order.
    recorded : mapping of str to str
        Stored answers of named models for this question.
    meta : mapping
        Everything else the source file holds (subject, annotations, turns, ...).
    grader : str or None
        Name of the grader of this question (:func:`confroute.grading.resolve_grader`);
        default: the kind's (:data:`confroute.grading.KIND_GRADERS`), None for ``"open"``.
    """

    id: str
    prompt: str
    gold: tuple[str, ...]
    kind: str
    choices: tuple[str, ...] = ()
    recorded: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    grader: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", "Example", KINDS)
        if not isinstance(self.id, str) or not self.id:
            raise param_error("id", "Example", "a non-empty string", self.id, type_error=True)
        object.__setattr__(self, "gold", tuple(self.gold))
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.grader is None:
            if self.kind != "open":
                object.__setattr__(self, "grader", grader_for_kind(self.kind, "Example"))
        elif not isinstance(self.grader, str):
            raise param_error("grader", "Example", "a grader name", self.grader,
                              type_error=True)
        else:
            resolve_grader(self.grader, "Example")

    @property
    def references(self) -> tuple[str, ...]:
        """The accepted answers a grader compares an answer with (``gold``)."""
        return self.gold

    def grade(self, answer: str, grader: GraderLike | None = None) -> float:
        """Quality in [0, 1] of ``answer``: ``grader(answer, self.references)``.

        Parameters
        ----------
        answer : str
        grader : str or callable, optional
            Default: this example's :attr:`grader`. A
            :class:`~confroute.grading.BaseGrader` grades through its ``grade``
            (a choice grader then also matches this example's option texts).

        Returns
        -------
        float in [0, 1]
        """
        if grader is None:
            if self.grader is None:
                grader_for_kind(self.kind, "Example.grade")  # raises: "open" needs a judge
            grader = self.grader
        g = resolve_grader(grader, "Example.grade")  # type: ignore[arg-type]
        if not isinstance(answer, str):
            raise param_error("answer", "Example.grade", "a str", answer, type_error=True)
        if isinstance(g, BaseGrader):
            return g.grade(answer, self)
        return float(g(answer, list(self.references)))

    @property
    def letters(self) -> str:
        """Option letters of a multiple-choice question (``"ABCD"`` for 4 choices)."""
        return LETTERS[: len(self.choices)]


# ---------------------------------------------------------------- prompt formatting


def format_short_prompt(question: str) -> str:
    """Prompt for a short-answer question."""
    return (
        "Answer the question with a short answer (a few words), no explanation.\n"
        f"Question: {question.strip()}\nAnswer:"
    )


def format_number_prompt(question: str) -> str:
    """Prompt for a math word problem whose answer is a number."""
    return (
        f"{question.strip()}\n\nSolve the problem step by step, then give the final numeric "
        "answer on the last line as '#### <number>'."
    )


def format_choice_prompt(question: str, choices: Sequence[str]) -> str:
    """Prompt for a multiple-choice question: lettered options, asks for the letter."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    letters = ", ".join(LETTERS[: len(choices)])
    return (
        f"Question: {question.strip()}\n{options}\n"
        f"Answer with the letter of the correct option ({letters}) only.\nAnswer:"
    )


# ---------------------------------------------------------------- file helpers


def _existing(path: Any, owner: str, name: str = "path", *, directory: bool | None = False
              ) -> Path:
    if not isinstance(path, (str, Path)):
        raise param_error(name, owner, "a path (str or pathlib.Path)", path, type_error=True)
    p = Path(path)
    if directory is None:
        ok = p.exists()
        what = "an existing file or directory"
    elif directory:
        ok = p.is_dir()
        what = "an existing directory"
    else:
        ok = p.is_file()
        what = "an existing file"
    if not ok:
        raise param_error(name, owner, what, str(p))
    return p


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(
                    f"{path}: line {lineno} is not valid JSON ({err.msg})."
                ) from None
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{path}: line {lineno} is not a JSON object.")
            rows.append(row)
    return rows


def _field(row: Mapping[str, Any], key: str, path: Path, where: str, typ: type | tuple[type, ...]
           ) -> Any:
    if key not in row:
        raise DatasetFormatError(f"{path}: {where} has no {key!r} field.")
    value = row[key]
    if not isinstance(value, typ):
        raise DatasetFormatError(
            f"{path}: {where} field {key!r} must be "
            f"{getattr(typ, '__name__', typ)}; got {type(value).__name__}."
        )
    return value


def _str_list(value: Any, path: Path, where: str, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetFormatError(f"{path}: {where} field {key!r} must be a list of strings.")
    return list(value)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for v in values:
        v = v.strip()
        if v and v not in seen:
            seen[v] = None
    return tuple(seen)


def _read_csv(path: Path) -> list[dict[str, str]]:
    """Read a CSV by header name: UTF-8 (cp1252 fallback), ``;`` or ``,`` sniffed."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    header = text.split("\n", 1)[0]
    delimiter = ";" if header.count(";") > header.count(",") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[dict[str, str]] = []
    for row in reader:
        clean = {
            (k or "").strip(): (v if isinstance(v, str) else "")
            for k, v in row.items()
            if k is not None and k.strip()
        }
        rows.append(clean)
    return rows


def _literal_choices(text: str, path: Path, where: str) -> tuple[str, ...]:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise DatasetFormatError(
            f"{path}: {where} 'choices' is not a Python list literal: {text[:60]!r}."
        ) from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise DatasetFormatError(f"{path}: {where} 'choices' must be a list of strings.")
    if not 2 <= len(value) <= len(LETTERS):
        raise DatasetFormatError(
            f"{path}: {where} must have 2 to {len(LETTERS)} choices; got {len(value)}."
        )
    return tuple(str(c) for c in value)


def _strip_qa_context(text: str) -> str:
    """``"Question: X\\nAnswer:"`` -> ``"X"`` (llm-foundry style contexts)."""
    t = text.strip()
    t = re.sub(r"^\s*Question:\s*", "", t)
    t = re.sub(r"\s*Answer:\s*$", "", t)
    return t.strip()


# ---------------------------------------------------------------- GSM8K


_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$")
_SOLUTION_GOLD = re.compile(r"(?:^|\n)\s*A:\s*(.+?)\s*$")


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").strip()


def load_gsm8k(path: str | Path) -> list[Example]:
    """GSM8K (Cobbe et al., 2021) from ``test.jsonl`` / ``train.jsonl``.

    Each line has ``question`` and ``answer``; the gold is the number after the
    final ``####`` (thousands separators removed). Ids are ``gsm8k-<line index>``,
    the same as :func:`load_gsm8k_solutions`, so the two files join on id.
    """
    owner = "load_gsm8k"
    p = _existing(path, owner)
    out = []
    for i, row in enumerate(_read_jsonl(p)):
        where = f"row {i}"
        q = _field(row, "question", p, where, str)
        ans = _field(row, "answer", p, where, str)
        m = _GSM8K_GOLD.search(ans)
        if m is None:
            raise DatasetFormatError(f"{p}: {where} answer has no '#### <number>' line.")
        out.append(Example(
            id=f"gsm8k-{i}", prompt=format_number_prompt(q), gold=(_clean_number(m.group(1)),),
            kind="number", meta={"question": q, "solution": ans}, grader="number",
        ))
    return out


GSM8K_SOLUTION_MODELS = ("6b_finetuning", "175b_finetuning", "6b_verification",
                         "175b_verification")


def load_gsm8k_solutions(path: str | Path) -> list[Example]:
    """Real model outputs of the GSM8K paper (``example_model_solutions.jsonl``).

    ``recorded`` maps each of ``6b_finetuning``, ``175b_finetuning``,
    ``6b_verification`` and ``175b_verification`` (those present) to its
    solution text; ``meta["is_correct"]`` maps the same names to the stored
    correctness. The gold is the number on the ``A: N`` line of ``ground_truth``.
    """
    owner = "load_gsm8k_solutions"
    p = _existing(path, owner)
    out = []
    for i, row in enumerate(_read_jsonl(p)):
        where = f"row {i}"
        q = _field(row, "question", p, where, str)
        gt = _field(row, "ground_truth", p, where, str)
        m = _SOLUTION_GOLD.search(gt)
        if m is None:
            raise DatasetFormatError(f"{p}: {where} ground_truth has no final 'A: <number>'.")
        recorded: dict[str, str] = {}
        correct: dict[str, bool] = {}
        for model in GSM8K_SOLUTION_MODELS:
            if model not in row:
                continue
            entry = _field(row, model, p, where, dict)
            recorded[model] = str(_field(entry, "solution", p, f"{where}.{model}", str))
            correct[model] = bool(_field(entry, "is_correct", p, f"{where}.{model}", bool))
        out.append(Example(
            id=f"gsm8k-{i}", prompt=format_number_prompt(q), gold=(_clean_number(m.group(1)),),
            kind="number", recorded=recorded, grader="number",
            meta={"question": q, "solution": gt, "is_correct": correct},
        ))
    return out


# ---------------------------------------------------------------- NQ-open / TriviaQA


def load_nq_open(path: str | Path) -> list[Example]:
    """NQ-open (Lee et al., 2019) and EfficientQA jsonl: ``question`` + ``answer`` aliases.

    For the EfficientQA test file, which also carries the competition's human
    ratings, the gold is ``answer_and_def_correct_predictions`` (the answers plus
    the predictions rated definitely correct, as upstream advises); the original
    ``answer`` list stays in ``meta["answer"]``. Ids are ``<file stem>-<line index>``.
    """
    owner = "load_nq_open"
    p = _existing(path, owner)
    out = []
    for i, row in enumerate(_read_jsonl(p)):
        where = f"row {i}"
        q = _field(row, "question", p, where, str)
        answers = _str_list(_field(row, "answer", p, where, (list, str)), p, where, "answer")
        gold_key = "answer_and_def_correct_predictions"
        gold = (
            _str_list(row[gold_key], p, where, gold_key) if gold_key in row else answers
        )
        meta = {k: v for k, v in row.items() if k not in ("question",)}
        out.append(Example(
            id=f"{p.stem}-{i}", prompt=format_short_prompt(q), gold=_unique(gold), kind="short",
            meta={"question": q, **meta}, grader="contains",
        ))
    return out


def _trivia_answers(answer: Any, row: Mapping[str, Any], p: Path, where: str) -> list[str]:
    values: list[str] = []
    if isinstance(answer, Mapping):  # official / HF form {"value"/"Value", "aliases"/"Aliases"}
        for key in ("value", "Value", "normalized_value", "NormalizedValue"):
            if isinstance(answer.get(key), str):
                values.append(answer[key])
        for key in ("aliases", "Aliases", "normalized_aliases", "NormalizedAliases"):
            if key in answer:
                values += _str_list(answer[key], p, where, key)
    else:
        values += _str_list(answer, p, where, "answer")
    if "aliases" in row:
        values += _str_list(row["aliases"], p, where, "aliases")
    return values


def load_triviaqa(path: str | Path) -> list[Example]:
    """TriviaQA (Joshi et al., 2017) questions with answer aliases.

    Accepted formats:

    * llm-foundry jsonl: ``{"context": "Question: ...\\nAnswer:", "answer": str,
      "aliases": [...]}``;
    * jsonl with ``question`` and ``answer`` (a string plus ``aliases``, or an
      object with ``value``/``aliases``, as in the Hugging Face copy);
    * the official JSON file ``{"Data": [{"Question", "QuestionId", "Answer":
      {"Value", "Aliases", ...}}]}``.

    Gold = the answer and all aliases (deduplicated). Ids are the question id when
    present, else ``<file stem>-<index>``.
    """
    owner = "load_triviaqa"
    p = _existing(path, owner)
    rows: list[dict[str, Any]]
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{p}: not valid JSON ({err.msg}).") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("Data"), list):
            raise DatasetFormatError(f"{p}: expected an object with a 'Data' list.")
        rows = [dict(r) for r in data["Data"]]
    else:
        rows = _read_jsonl(p)
    out = []
    for i, row in enumerate(rows):
        where = f"row {i}"
        if "question" in row or "Question" in row:
            q = _field(row, "question" if "question" in row else "Question", p, where, str)
        elif "context" in row:
            q = _strip_qa_context(_field(row, "context", p, where, str))
        else:
            raise DatasetFormatError(f"{p}: {where} has no 'question' or 'context' field.")
        akey = "answer" if "answer" in row else "Answer"
        if akey not in row:
            raise DatasetFormatError(f"{p}: {where} has no 'answer' field.")
        gold = _unique(_trivia_answers(row[akey], row, p, where))
        if not gold:
            raise DatasetFormatError(f"{p}: {where} has no non-empty answer.")
        qid = row.get("question_id", row.get("QuestionId"))
        out.append(Example(
            id=str(qid) if qid else f"{p.stem}-{i}", prompt=format_short_prompt(q), gold=gold,
            kind="short", meta={"question": q}, grader="contains",
        ))
    return out


# ---------------------------------------------------------------- MT-Bench


def _answer_turns(row: Mapping[str, Any], p: Path, where: str) -> list[str]:
    choices = _field(row, "choices", p, where, list)
    if not choices or not isinstance(choices[0], Mapping):
        raise DatasetFormatError(f"{p}: {where} 'choices' must hold at least one object.")
    return _str_list(_field(choices[0], "turns", p, f"{where}.choices[0]", list), p, where,
                     "turns")


def load_mt_bench(
    question_path: str | Path,
    reference_path: str | Path | None = None,
    answer_paths: Sequence[str | Path] = (),
) -> list[Example]:
    """MT-Bench (Zheng et al., 2023) in the FastChat ``llm_judge`` format.

    Parameters
    ----------
    question_path : path
        ``question.jsonl``: ``question_id``, ``category``, ``turns`` (and optional
        inline ``reference``).
    reference_path : path, optional
        A FastChat answer file (e.g. ``reference_answer/gpt-4.jsonl``) whose turns
        become ``gold`` and ``meta["reference"]``; inline references are used
        for questions it does not cover.
    answer_paths : sequence of paths
        FastChat answer files (``model_answer/<model>.jsonl``). ``recorded`` maps
        each ``model_id`` to its first-turn answer; ``meta["answers"]`` maps it to
        all turns.

    Returns
    -------
    list of Example
        ``kind="open"``, ``id`` = the question id, ``prompt`` = the first turn,
        ``meta["turns"]`` = both user turns, ``meta["category"]``.
    """
    owner = "load_mt_bench"
    qp = _existing(question_path, owner, "question_path")
    refs: dict[str, list[str]] = {}
    if reference_path is not None:
        rp = _existing(reference_path, owner, "reference_path")
        for i, row in enumerate(_read_jsonl(rp)):
            refs[str(_field(row, "question_id", rp, f"row {i}", (int, str)))] = _answer_turns(
                row, rp, f"row {i}")
    if isinstance(answer_paths, (str, Path)):
        raise param_error("answer_paths", owner, "a sequence of paths", answer_paths,
                          type_error=True)
    answers: dict[str, dict[str, list[str]]] = {}
    for ap_raw in answer_paths:
        ap = _existing(ap_raw, owner, "answer_paths")
        for i, row in enumerate(_read_jsonl(ap)):
            where = f"row {i}"
            qid = str(_field(row, "question_id", ap, where, (int, str)))
            model = str(row.get("model_id") or ap.stem)
            answers.setdefault(qid, {})[model] = _answer_turns(row, ap, where)
    out = []
    for i, row in enumerate(_read_jsonl(qp)):
        where = f"row {i}"
        qid = str(_field(row, "question_id", qp, where, (int, str)))
        turns = _str_list(_field(row, "turns", qp, where, list), qp, where, "turns")
        if not turns:
            raise DatasetFormatError(f"{qp}: {where} has no turns.")
        reference = refs.get(qid)
        if reference is None and isinstance(row.get("reference"), list):
            reference = _str_list(row["reference"], qp, where, "reference")
        model_turns = answers.get(qid, {})
        out.append(Example(
            id=qid, prompt=turns[0], gold=tuple(reference or ()), kind="open",
            recorded={m: t[0] for m, t in model_turns.items() if t},
            meta={"question_id": row["question_id"], "category": row.get("category", ""),
                  "turns": tuple(turns), "reference": tuple(reference or ()),
                  "answers": {m: tuple(t) for m, t in model_turns.items()}},
        ))
    return out


# ---------------------------------------------------------------- MMLU-Redux


def normalize_error_type(value: str) -> str:
    """MMLU-Redux ``error_type`` as lower case with ``_`` for spaces (``"OK"`` -> ``"ok"``)."""
    return re.sub(r"[\s_]+", "_", value.strip().lower())


_INDEX_LIST = re.compile(r"^\s*(?:either\s+)?\d+(?:\s*(?:,|and|or|\s)\s*\d+)*\s*$", re.I)
_LETTER_LIST = re.compile(r"^\s*[A-J](?:\s*(?:,|and|or|/|\s)\s*[A-J])*\s*$")


def parse_corrected_answer(text: str, choices: Sequence[str]) -> tuple[str, ...] | None:
    """Map an MMLU-Redux ``correct_answer`` cell to option letters.

    * an index or several (``"2"``, ``"1, 3"``, ``"2 and 3"``, ``"0 or 2"``): 0-based
      option indices;
    * a letter or several (``"C"``, ``"B,C"``);
    * free text equal (case-insensitively) to one option's text: that option.

    Returns
    -------
    tuple of str or None
        The letters, or None when the cell is empty / "ok" or names no existing
        option (an index out of range or free text that is not an option).
    """
    t = text.strip()
    if not t or t.lower() == "ok":
        return None
    n = len(choices)
    if _INDEX_LIST.match(t):
        idx = [int(x) for x in re.findall(r"\d+", t)]
        return tuple(sorted({LETTERS[i] for i in idx})) if all(i < n for i in idx) else None
    if _LETTER_LIST.match(t):
        letters = re.findall(r"[A-J]", t)
        ok = all(LETTERS.index(c) < n for c in letters)
        return tuple(sorted(set(letters))) if ok else None
    for i, c in enumerate(choices):
        if c.strip().lower() == t.lower():
            return (LETTERS[i],)
    return None


def _mmlu_files(path: Path, owner: str) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise param_error("dir_or_file", owner, "a directory holding .csv files", str(path))
        return files
    return [path]


def _subject(path: Path) -> str:
    return path.stem[len("mmlu_"):] if path.stem.startswith("mmlu_") else path.stem


def _redux_gold(row: Mapping[str, str], choices: tuple[str, ...], label: str, p: Path,
                where: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    raw = row.get("answer", "").strip()
    if not raw.isdigit() or int(raw) >= len(choices):
        raise DatasetFormatError(f"{p}: {where} 'answer' must be an option index; got {raw!r}.")
    original = (LETTERS[int(raw)],)
    error_type = normalize_error_type(row.get("error_type", "") or "ok")
    cell = row.get("correct_answer", "") or ""
    corrected = parse_corrected_answer(cell, choices)
    meta: dict[str, Any] = {
        "error_type": error_type, "original_gold": original, "correct_answer": cell.strip(),
        "source": row.get("source", ""), "potential_reason": row.get("potential_reason", ""),
    }
    if label == "original" or error_type == "ok":
        return original, meta
    if corrected is not None:
        meta["label_source"] = "correct_answer"
        return corrected, meta
    if cell.strip() and cell.strip().lower() != "ok":
        # the annotators say no listed option is right (e.g. index 6, or free text)
        meta["label_source"] = "no_listed_option"
        return (), meta
    meta["label_source"] = "original"
    return original, meta


def load_mmlu_redux(dir_or_file: str | Path, label: str = "original") -> list[Example]:
    """MMLU-Redux (Gema et al., 2024) CSV files: MMLU questions re-annotated by hand.

    Files are read by header name, the delimiter (``;`` or ``,``) is sniffed from
    the header line and the encoding falls back from UTF-8 to cp1252. ``choices``
    is a Python list literal. ``error_type`` is normalised (lower case, ``_``)
    and kept in ``meta`` with the raw ``correct_answer``.

    Parameters
    ----------
    dir_or_file : path
        A directory of ``mmlu_<subject>.csv`` files or one file.
    label : {"original", "corrected"}
        ``"original"``: the MMLU gold index ``answer``. ``"corrected"``: for rows
        flagged with an error (``error_type != "ok"``), the annotators'
        ``correct_answer`` when it names listed options (index, letter(s), or the
        exact text of an option; several options are all accepted). When it is
        empty, the original label is kept; when it names no listed option (an
        out-of-range index or other free text), ``gold`` is empty, so every answer
        scores 0. ``meta["label_source"]`` says which rule applied.

    Returns
    -------
    list of Example
        ``kind="choice"``, ``id = "mmlu_redux/<subject>-<row>"``, ``meta["subject"]``.
    """
    owner = "load_mmlu_redux"
    label = check_choice(label, "label", owner, ("original", "corrected"))
    p = _existing(dir_or_file, owner, "dir_or_file", directory=None)
    out = []
    for f in _mmlu_files(p, owner):
        subject = _subject(f)
        rows = _read_csv(f)
        if rows and not {"question", "choices", "answer"} <= set(rows[0]):
            missing = {"question", "choices", "answer"} - set(rows[0])
            raise DatasetFormatError(f"{f}: missing column(s) {sorted(missing)}.")
        for i, row in enumerate(rows):
            where = f"row {i}"
            choices = _literal_choices(row["choices"], f, where)
            gold, meta = _redux_gold(row, choices, label, f, where)
            q = row["question"]
            out.append(Example(
                id=f"mmlu_redux/{subject}-{i}", prompt=format_choice_prompt(q, choices),
                gold=gold, kind="choice", choices=choices, grader="choice",
                meta={"subject": subject, "question": q, **meta},
            ))
    return out


# ---------------------------------------------------------------- HELM MMLU dumps


def _helm_instances(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}: not valid JSON ({err.msg}).") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("request_states"), list):
        raise DatasetFormatError(f"{path}: expected a HELM run dump with 'request_states'.")
    return list(data["request_states"])


def load_helm_mmlu(dir: str | Path, models: Sequence[str] | None = None) -> list[Example]:
    """MMLU predictions of several models from HELM run dumps (``helm_original``).

    Layout: ``dir/<model>/<subject>.json``, each with ``request_states``. The gold
    is the reference tagged ``correct``; each model's completion (stripped of the
    leading space) is its recorded answer. Questions are matched across models by
    subject and HELM instance id; a model missing a question has no recorded
    answer for it.

    Parameters
    ----------
    dir : path
    models : sequence of str, optional
        Model directory names to read (default: all).

    Returns
    -------
    list of Example
        ``kind="choice"``, ``id = "helm/<subject>/<instance id>"``.
    """
    owner = "load_helm_mmlu"
    root = _existing(dir, owner, "dir", directory=True)
    available = sorted(d.name for d in root.iterdir() if d.is_dir())
    if models is None:
        chosen = available
    else:
        if isinstance(models, str):
            raise param_error("models", owner, "a sequence of model names", models,
                              type_error=True)
        chosen = list(models)
        unknown = [m for m in chosen if m not in available]
        if unknown:
            raise InvalidParameterError(
                f"The 'models' parameter of {owner} names unknown model(s) {unknown}. "
                f"Valid names: {', '.join(available)}."
            )
    if not chosen:
        raise param_error("dir", owner, "a directory of <model>/<subject>.json dumps", str(root))
    examples: dict[str, dict[str, Any]] = {}
    for model in chosen:
        for f in sorted((root / model).glob("*.json")):
            subject = f.stem
            for j, rs in enumerate(_helm_instances(f)):
                where = f"request_states[{j}]"
                inst = _field(rs, "instance", f, where, dict)
                iid = str(inst.get("id", j))
                key = f"helm/{subject}/{iid}"
                if key not in examples:
                    refs = _field(inst, "references", f, where, list)
                    choices = tuple(str(r["output"]["text"]) for r in refs)
                    gold = tuple(LETTERS[k] for k, r in enumerate(refs)
                                 if "correct" in r.get("tags", []))
                    q = str(inst["input"]["text"])
                    examples[key] = {
                        "id": key, "prompt": format_choice_prompt(q, choices), "gold": gold,
                        "choices": choices, "recorded": {},
                        "meta": {"subject": subject, "question": q, "helm_id": iid},
                    }
                completions = rs.get("result", {}).get("completions") or [{}]
                pred = str(completions[0].get("text", "")).strip()
                if pred:
                    examples[key]["recorded"][model] = pred
    return [Example(kind="choice", grader="choice", **e) for e in examples.values()]


def load_helm_combined(
    dir: str | Path, questions: str | Path, *, label: str = "original",
    models: Sequence[str] | None = None,
) -> list[Example]:
    """MMLU-Redux questions with the predicted letters of HELM models (``helm_combined``).

    ``helm_combined/<subject>.csv`` has ``question``, ``choices`` and one column
    of predicted letters per model, but no gold. Rows are joined to the
    MMLU-Redux files in ``questions`` (``mmlu_<subject>.csv``) on the stripped
    question text within a subject; only joined questions are returned, with the
    gold from :func:`load_mmlu_redux` (``label``). Blank prediction cells give no
    recorded answer; leading spaces are stripped.

    A Redux question repeated in MMLU joins only its first HELM row.

    Parameters
    ----------
    dir : path
        The ``helm_combined`` directory.
    questions : path
        The MMLU-Redux ``questions`` directory.
    label : {"original", "corrected"}
    models : sequence of str, optional
        Prediction columns to keep (default: all).
    """
    owner = "load_helm_combined"
    root = _existing(dir, owner, "dir", directory=True)
    redux = load_mmlu_redux(_existing(questions, owner, "questions", directory=True),
                            label=label)
    index: dict[tuple[str, str], Example] = {}
    for ex in redux:
        index.setdefault((str(ex.meta["subject"]), str(ex.meta["question"]).strip()), ex)
    wanted = None if models is None else set(models)
    out = []
    seen: set[str] = set()
    for f in sorted(root.glob("*.csv")):
        subject = f.stem
        for row in _read_csv(f):
            match = index.get((subject, row.get("question", "").strip()))
            # MMLU repeats a few questions: the first HELM row joins, later ones are dropped
            if match is None or match.id in seen:
                continue
            ex = match
            seen.add(ex.id)
            recorded = {
                k: v.strip() for k, v in row.items()
                if k not in ("question", "choices") and (wanted is None or k in wanted)
                and v.strip()
            }
            out.append(Example(
                id=ex.id, prompt=ex.prompt, gold=ex.gold, kind="choice", choices=ex.choices,
                recorded={**ex.recorded, **recorded}, meta=ex.meta, grader="choice",
            ))
    return out


# ---------------------------------------------------------------- ARC


def load_arc(path: str | Path) -> list[Example]:
    """ARC (Clark et al., 2018) multiple-choice questions.

    Accepted formats: llm-foundry jsonl ``{"query": "Question: ...", "choices":
    [...], "gold": int}`` and the AI2 jsonl ``{"id", "question": {"stem",
    "choices": [{"label", "text"}]}, "answerKey"}``. Ids are the AI2 id when
    present, else ``<file stem>-<index>``.
    """
    owner = "load_arc"
    p = _existing(path, owner)
    out = []
    for i, row in enumerate(_read_jsonl(p)):
        where = f"row {i}"
        if isinstance(row.get("question"), Mapping):
            qd = row["question"]
            q = str(_field(qd, "stem", p, where, str))
            opts = _field(qd, "choices", p, where, list)
            choices = tuple(str(o["text"]) for o in opts)
            labels = [str(o["label"]) for o in opts]
            key = str(_field(row, "answerKey", p, where, str))
            if key not in labels:
                raise DatasetFormatError(f"{p}: {where} answerKey {key!r} is not a label.")
            gold_idx = labels.index(key)
            ex_id = str(row.get("id") or f"{p.stem}-{i}")
        else:
            q = _strip_qa_context(_field(row, "query", p, where, str))
            choices = tuple(_str_list(_field(row, "choices", p, where, list), p, where,
                                      "choices"))
            gold_idx = _field(row, "gold", p, where, int)
            ex_id = f"{p.stem}-{i}"
        if not 0 <= gold_idx < len(choices) or len(choices) > len(LETTERS):
            raise DatasetFormatError(f"{p}: {where} gold index {gold_idx} is out of range.")
        out.append(Example(
            id=ex_id, prompt=format_choice_prompt(q, choices), gold=(LETTERS[gold_idx],),
            kind="choice", choices=choices, meta={"question": q}, grader="choice",
        ))
    return out


# ---------------------------------------------------------------- split / registry


def split(
    examples: Sequence[Example], fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministic development/test split by a hash of ``(seed, id)``.

    An example goes to the first part when ``u < fraction`` with
    ``u = sha256(seed, id)`` mapped to [0, 1). Membership depends only on the
    seed and the id, not on the order or on the other examples, so adding
    questions never moves existing ones across the split.

    Parameters
    ----------
    examples : sequence of Example
    fraction : float in [0, 1]
        Expected share of the first (development) part.
    seed : int >= 0

    Returns
    -------
    (dev, test) : tuple of lists, each in input order
    """
    owner = "split"
    ids = [e.id for e in examples]
    mask = id_split(ids, fraction, seed, owner=owner)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidParameterError(
            f"The 'examples' parameter of {owner} must have unique ids. Got {dup!r} twice."
        )
    dev = [e for e, m in zip(examples, mask) if m]
    test = [e for e, m in zip(examples, mask) if not m]
    return dev, test


_LOADERS: dict[str, Callable[..., list[Example]]] = {
    "arc": load_arc,
    "gsm8k": load_gsm8k,
    "gsm8k_solutions": load_gsm8k_solutions,
    "helm_combined": load_helm_combined,
    "helm_mmlu": load_helm_mmlu,
    "mmlu_redux": load_mmlu_redux,
    "mt_bench": load_mt_bench,
    "nq_open": load_nq_open,
    "triviaqa": load_triviaqa,
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_LOADERS)


def load_dataset(name: str, path: str | Path, **kwargs: Any) -> list[Example]:
    """Load a dataset by name from ``path`` (extra keywords go to the loader).

    Valid names: ``arc``, ``gsm8k``, ``gsm8k_solutions``, ``helm_combined``,
    ``helm_mmlu``, ``mmlu_redux``, ``mt_bench``, ``nq_open``, ``triviaqa``.
    """
    check_choice(name, "name", "load_dataset", dataset_names())
    return _LOADERS[name](path, **kwargs)
