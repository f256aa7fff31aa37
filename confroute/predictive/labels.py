"""Preference labels for training query-only routers.

Offline, both models answer the same training prompts; the comparison of their
semantic entropies (SE) decides which model "wins" each prompt, following
Zhang et al. (2025). The labels are stored as JSON lines in the format of the
paper's released data (an LMSYS-arena-like pairwise format):

.. code-block:: json

    {"id": "q17", "prompt": "...", "model_a": "big-model", "model_b": "small-model",
     "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0, "se_a": 0.12, "se_b": 0.91}

**Convention: ``model_a`` is always the strong (cloud) model and ``model_b`` the
weak (edge) model**, so ``winner_model_a == 1`` means "the strong model wins":
the query is worth escalating.

References
----------
.. [1] T. Zhang, A. Mehradfar, D. Dimitriadis, S. Avestimehr, "Leveraging
   Uncertainty Estimation for Efficient LLM Routing", arXiv:2502.11021, 2025.
.. [2] Farquhar et al., "Detecting hallucinations in large language models using
   semantic entropy", Nature 630, 2024.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from confroute._serialization import write_atomic
from confroute._validation import (
    check_array,
    check_bool,
    check_float,
    check_int,
    check_same_length,
)
from confroute.errors import InvalidParameterError, InvalidTypeError, SerializationError, describe
from confroute.types import Prompt

__all__ = [
    "LABEL_CREDIT",
    "ROW_KEYS",
    "Label",
    "accuracy_label_file",
    "accuracy_labels",
    "label_credits",
    "make_se_labels",
    "preference_label",
    "preference_labels",
    "preference_rows",
    "read_labels_jsonl",
    "row_label",
    "write_labels_jsonl",
]

Label = Literal["strong", "weak", "tie"]

#: Strong-win credit of each label (the regression target of the routers).
LABEL_CREDIT: dict[str, float] = {"strong": 1.0, "weak": 0.0, "tie": 0.5}

#: Keys of one label row, in the paper's order.
ROW_KEYS: tuple[str, ...] = (
    "id", "prompt", "model_a", "model_b", "winner_model_a", "winner_model_b", "winner_tie",
    "se_a", "se_b",
)


def _check_se(values: Any, name: str, owner: str) -> np.ndarray:
    arr = check_array(values, name, owner, ndim=1)
    if (arr < 0).any():
        bad = float(arr[arr < 0][0])
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must contain only non-negative semantic "
            f"entropies. Got {bad!r}."
        )
    return arr


def preference_labels(se_strong: Any, se_weak: Any, tau: float) -> np.ndarray:
    r"""Vectorised semantic-entropy preference labels.

    .. math::

        \Delta_{SE} = \left| \frac{SE_{strong} - SE_{weak}}{SE_{strong}} \right|,
        \qquad
        \text{label} =
        \begin{cases}
            \arg\min_{m \in \{strong, weak\}} SE_m & \text{if } \Delta_{SE} > \tau \\
            \text{tie} & \text{otherwise.}
        \end{cases}

    The relative difference is undefined when :math:`SE_{strong} = 0`; it is
    defined here by continuity of the rule:

    * :math:`SE_{strong} = SE_{weak} = 0`: both models are fully consistent,
      :math:`\Delta_{SE} := 0`, so the label is ``"tie"`` for every ``tau``;
    * :math:`SE_{strong} = 0 < SE_{weak}`: the relative difference is infinite,
      so the strong model wins for every ``tau``.

    Parameters
    ----------
    se_strong : array-like of shape (n_prompts,)
        Semantic entropy of the strong (cloud) model on each prompt, >= 0.
    se_weak : array-like of shape (n_prompts,)
        Semantic entropy of the weak (edge) model on each prompt, >= 0.
    tau : float
        Relative-difference threshold, >= 0.

    Returns
    -------
    ndarray of str of shape (n_prompts,)
        ``"strong"``, ``"weak"`` or ``"tie"``.

    References
    ----------
    Zhang et al., arXiv:2502.11021, 2025 (section on SE-based preference data).
    """
    owner = "preference_labels"
    tau_f = check_float(tau, "tau", owner, min_value=0.0)
    s = _check_se(se_strong, "se_strong", owner)
    w = _check_se(se_weak, "se_weak", owner)
    check_same_length(owner, se_strong=s, se_weak=w)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        delta = np.abs((s - w) / s)
    # 0/0 -> tie, x/0 (x > 0) -> infinitely large relative difference.
    delta = np.where(s == 0, np.where(w == 0, 0.0, np.inf), delta)
    decisive = delta > tau_f
    out = np.full(s.shape, "tie", dtype="<U6")
    out[decisive & (s < w)] = "strong"
    out[decisive & (w < s)] = "weak"
    return out


def preference_label(se_strong: float, se_weak: float, tau: float) -> Label:
    """Preference label of one prompt; see :func:`preference_labels` for the rule.

    Returns
    -------
    {"strong", "weak", "tie"}
    """
    for name, v in (("se_strong", se_strong), ("se_weak", se_weak)):
        check_float(v, name, "preference_label", min_value=0.0)
    label = str(preference_labels([se_strong], [se_weak], tau)[0])
    return label  # type: ignore[return-value]


def accuracy_labels(correct_strong: Any, correct_weak: Any) -> np.ndarray:
    """Preference labels from answer correctness instead of semantic entropy.

    The strong model wins when only it is correct, the weak model wins when only
    it is correct, and the prompt is a tie when both or neither are correct.

    Parameters
    ----------
    correct_strong, correct_weak : array-like of bool or 0/1 of shape (n_prompts,)

    Returns
    -------
    ndarray of str of shape (n_prompts,)
    """
    owner = "accuracy_labels"
    arrs = []
    for name, v in (("correct_strong", correct_strong), ("correct_weak", correct_weak)):
        a = check_array(v, name, owner, dtype=float)
        if not np.isin(a, (0.0, 1.0)).all():
            raise InvalidParameterError(
                f"The '{name}' parameter of {owner} must contain only 0/1 (or bool) values. "
                f"Got {float(a[~np.isin(a, (0.0, 1.0))][0])!r}."
            )
        arrs.append(a.astype(bool))
    cs, cw = arrs
    check_same_length(owner, correct_strong=cs, correct_weak=cw)
    out = np.full(cs.shape, "tie", dtype="<U6")
    out[cs & ~cw] = "strong"
    out[cw & ~cs] = "weak"
    return out


def label_credits(labels: Any, owner: str = "label_credits", name: str = "labels") -> np.ndarray:
    """Strong-win credit of each label: ``strong`` -> 1, ``weak`` -> 0, ``tie`` -> 0.5.

    Numbers in [0, 1] are taken as credits already (1 / 0 / 0.5, or a soft
    credit such as an average over several judges).

    Parameters
    ----------
    labels : array-like of shape (n,)
        Strings among ``"strong"``, ``"weak"``, ``"tie"``, or numbers in [0, 1].

    Returns
    -------
    ndarray of float64 of shape (n,)
    """
    if isinstance(labels, (str, bytes)):
        raise InvalidTypeError(
            f"The '{name}' parameter of {owner} must be an array-like of labels. "
            f"Got {describe(labels)}."
        )
    raw = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    if raw.ndim != 1:
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be a 1-D array. "
            f"Got an array of shape {raw.shape}."
        )
    if raw.size == 0:
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be non-empty. Got an empty array."
        )
    if raw.dtype.kind in "US" or (raw.dtype == object and all(isinstance(v, str) for v in raw)):
        out = np.empty(raw.shape, dtype=np.float64)
        for i, v in enumerate(raw):
            credit = LABEL_CREDIT.get(str(v))
            if credit is None:
                raise InvalidParameterError(
                    f"The '{name}' parameter of {owner} must contain only 'strong', 'weak' "
                    f"or 'tie' (or numbers in [0, 1]). Got {v!r} at index {i}."
                )
            out[i] = credit
        return out
    if raw.dtype == object and any(isinstance(v, str) for v in raw):
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must not mix strings and numbers."
        )
    arr = check_array(raw, name, owner, dtype=float)
    bad = (arr < 0) | (arr > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must contain only 'strong', 'weak' or 'tie' "
            f"(or numbers in [0, 1]). Got {float(arr[i])!r} at index {i}."
        )
    return arr.astype(np.float64)


# --------------------------------------------------------------------------- rows


def _flags(label: str) -> tuple[int, int, int]:
    return (int(label == "strong"), int(label == "weak"), int(label == "tie"))


def preference_rows(
    ids: Sequence[str | int],
    prompts: Sequence[Prompt],
    labels: Sequence[str] | np.ndarray,
    *,
    strong_name: str,
    weak_name: str,
    se_strong: Sequence[float] | np.ndarray | None = None,
    se_weak: Sequence[float] | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Build label rows in the paper's pairwise format (``model_a`` = strong).

    Parameters
    ----------
    ids : sequence of str or int, length n
    prompts : sequence of Prompt, length n
    labels : sequence of {"strong", "weak", "tie"}, length n
    strong_name, weak_name : str
        Names written to ``model_a`` and ``model_b``.
    se_strong, se_weak : array-like of shape (n,), optional
        Semantic entropies written to ``se_a`` / ``se_b`` (None when the labels
        come from another signal, e.g. :func:`accuracy_labels`).

    Returns
    -------
    list of dict
    """
    owner = "preference_rows"
    n = check_same_length(owner, ids=ids, prompts=prompts, labels=labels)
    sa = [None] * n if se_strong is None else [float(v) for v in se_strong]
    sb = [None] * n if se_weak is None else [float(v) for v in se_weak]
    check_same_length(owner, ids=ids, se_strong=sa, se_weak=sb)
    rows = []
    for i in range(n):
        lab = str(labels[i])
        if lab not in LABEL_CREDIT:
            raise InvalidParameterError(
                f"The 'labels' parameter of {owner} must contain only 'strong', 'weak' or "
                f"'tie'. Got {lab!r} at index {i}."
            )
        a, b, t = _flags(lab)
        prompt = prompts[i]
        rows.append({
            "id": ids[i],
            "prompt": prompt if isinstance(prompt, str) else [dict(m) for m in prompt],
            "model_a": strong_name, "model_b": weak_name,
            "winner_model_a": a, "winner_model_b": b, "winner_tie": t,
            "se_a": sa[i], "se_b": sb[i],
        })
    return rows


def _validate_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise SerializationError(
            f"{where}: a label row must be a JSON object. Got {describe(row)}."
        )
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise SerializationError(f"{where}: label row is missing key(s) {', '.join(missing)}.")
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise SerializationError(f"{where}: 'id' must be a string or an int. Got {describe(rid)}.")
    p = row["prompt"]
    ok_prompt = (isinstance(p, str) and p != "") or (
        isinstance(p, list) and len(p) > 0
        and all(isinstance(m, Mapping) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in p)
    )
    if not ok_prompt:
        raise SerializationError(
            f"{where}: 'prompt' must be a non-empty string or a list of chat messages."
        )
    for k in ("model_a", "model_b"):
        if not isinstance(row[k], str):
            raise SerializationError(f"{where}: {k!r} must be a string. Got {describe(row[k])}.")
    flags = [row["winner_model_a"], row["winner_model_b"], row["winner_tie"]]
    if any(isinstance(f, bool) or f not in (0, 1) for f in flags) or sum(flags) != 1:
        raise SerializationError(
            f"{where}: exactly one of winner_model_a, winner_model_b, winner_tie must be 1 "
            f"(the others 0). Got {flags}."
        )
    for k in ("se_a", "se_b"):
        v = row[k]
        if v is None:
            continue
        if (isinstance(v, bool) or not isinstance(v, (int, float))
                or not math.isfinite(v) or v < 0):
            raise SerializationError(
                f"{where}: {k!r} must be a non-negative finite number or null. Got {describe(v)}."
            )
    return {k: row[k] for k in ROW_KEYS}


def row_label(row: Mapping[str, Any]) -> Label:
    """The ``"strong"`` / ``"weak"`` / ``"tie"`` label of one row (model_a = strong)."""
    if row["winner_model_a"] == 1:
        return "strong"
    if row["winner_model_b"] == 1:
        return "weak"
    return "tie"


def write_labels_jsonl(
    rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], *, append: bool = False
) -> Path:
    """Write label rows as JSON lines (validated first; nothing is written on error).

    Parameters
    ----------
    rows : iterable of mapping
        Rows with the keys of :data:`ROW_KEYS`.
    path : path-like
    append : bool, default False
        Append to an existing file instead of replacing it.

    Returns
    -------
    Path
    """
    checked = [_validate_row(r, f"row {i}") for i, r in enumerate(rows)]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in checked)
    if append:
        with p.open("a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
    else:
        write_atomic(p, lines, owner="write_labels_jsonl")
    return p


def read_labels_jsonl(
    path: str | os.PathLike[str], *, allow_truncated_tail: bool = False
) -> list[dict[str, Any]]:
    """Read and validate label rows written by :func:`write_labels_jsonl`.

    Parameters
    ----------
    path : path-like
    allow_truncated_tail : bool, default False
        Ignore (with a warning) a final line that is not valid JSON, as left by a
        run killed while writing. Any other bad line is an error.

    Returns
    -------
    list of dict

    Raises
    ------
    SerializationError
        If the file is missing, a line is not a valid row, or ids repeat.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SerializationError(f"No label file at {str(p)!r}: the file does not exist.") from None
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{p.name} line {i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if allow_truncated_tail and i == last and not text.endswith("\n"):
                warnings.warn(f"{where}: ignoring a truncated last line.", stacklevel=2)
                break
            raise SerializationError(f"{where} is not valid JSON: {exc}") from None
        row = _validate_row(obj, where)
        key = (type(row["id"]).__name__, row["id"])
        if key in seen:
            raise SerializationError(f"{where}: duplicate id {row['id']!r}.")
        seen.add(key)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- generation


def _repair_tail(p: Path) -> None:
    """Cut a partially written last line (left by a killed run) so appends stay valid."""
    data = p.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        warnings.warn(
            f"{p.name}: dropping a truncated last line left by an interrupted run.", stacklevel=3
        )
        with p.open("r+b") as fh:
            fh.truncate(cut)


def make_se_labels(
    prompts: Sequence[Prompt],
    ids: Sequence[str | int],
    weak_model: Any,
    strong_model: Any,
    estimator: Any,
    tau: float,
    out_path: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Sample both models, compute semantic entropy, and write preference rows.

    The run is **resumable**: rows are appended to ``out_path`` batch by batch
    (flushed and fsynced after each batch), and ids already present in the file
    are skipped, so re-running after an interruption finishes the remaining
    prompts only. Prompts whose SE is NaN for either model (the estimator could
    not score them) are not written; a warning gives their number, and a later
    run retries them.

    Parameters
    ----------
    prompts : sequence of Prompt, length n
    ids : sequence of str or int, length n
        Unique, stable identifiers (the resume key).
    weak_model, strong_model : LanguageModel
        Anything the estimator accepts, with a ``name`` attribute (written to
        ``model_b`` / ``model_a``).
    estimator : UncertaintyEstimator
        Typically :class:`~confroute.estimators.SemanticEntropy`; called as
        ``estimator.estimate(batch, model).scores``.
    tau : float
        Threshold of :func:`preference_labels`.
    out_path : path-like
        JSON-lines output (created if missing).
    batch_size : int, default 16
    progress : bool, default True
        Show a tqdm progress bar.

    Returns
    -------
    list of dict
        Every row now in ``out_path`` (earlier runs included).

    Raises
    ------
    InvalidParameterError
        On bad inputs, duplicate ids, or an existing file made with other models.
    """
    owner = "make_se_labels"
    plist, id_list = _check_prompts_and_ids(prompts, ids, owner)
    tau_f = check_float(tau, "tau", owner, min_value=0.0)
    bs = check_int(batch_size, "batch_size", owner, min_value=1)
    _check_parts(weak_model, strong_model, estimator, progress, owner)
    assert tau_f is not None and bs is not None
    names = (_model_name(strong_model), _model_name(weak_model))
    p = Path(out_path)
    done = _labelled_ids(p, names, owner)
    todo = [i for i, r in enumerate(id_list) if _id_key(r) not in done]

    from tqdm.auto import tqdm

    n_nan = 0
    with tqdm(total=len(todo), desc="SE labels", unit="prompt", disable=not progress) as bar:
        for idx in (todo[start:start + bs] for start in range(0, len(todo), bs)):
            n_nan += _label_batch(
                [id_list[i] for i in idx], [plist[i] for i in idx], (weak_model, strong_model),
                estimator, tau_f, names, p,
            )
            bar.update(len(idx))
    if n_nan:
        warnings.warn(
            f"{owner}: {n_nan} prompt(s) got a NaN semantic entropy and were not labelled; "
            "re-running retries them.", stacklevel=2,
        )
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    return read_labels_jsonl(p)


def _check_parts(weak_model: Any, strong_model: Any, estimator: Any, progress: Any,
                 owner: str) -> None:
    """Models and estimator checked before anything is generated.

    A model only needs a name here (the resume key); what the estimator asks of it
    is the estimator's check.
    """
    for name, model in (("weak_model", weak_model), ("strong_model", strong_model)):
        if model is None or isinstance(model, (str, bytes)) or not isinstance(
                getattr(model, "name", None), str):
            raise InvalidTypeError(
                f"The '{name}' parameter of {owner} must be a model object with a 'name' "
                f"(a LanguageModel). Got {describe(model)}.")
    if not callable(getattr(estimator, "estimate", None)):
        raise InvalidTypeError(
            f"The 'estimator' parameter of {owner} must be an UncertaintyEstimator (e.g. "
            f"SemanticEntropy()). Got {describe(estimator)}.")
    check_bool(progress, "progress", owner)


def _check_prompts_and_ids(
    prompts: Sequence[Prompt], ids: Sequence[str | int], owner: str
) -> tuple[list[Prompt], list[str | int]]:
    """Checked prompts and ids (same length, each id a str or an int, unique)."""
    from confroute._validation import check_prompts

    plist = check_prompts(prompts, owner)
    id_list = list(ids)
    check_same_length(owner, prompts=plist, ids=id_list)
    for i, rid in enumerate(id_list):
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise InvalidTypeError(
                f"The 'ids[{i}]' parameter of {owner} must be a str or an int. "
                f"Got {describe(rid)}."
            )
    if len({_id_key(r) for r in id_list}) != len(id_list):
        raise InvalidParameterError(f"The 'ids' parameter of {owner} must be unique.")
    return plist, id_list


def _id_key(rid: Any) -> tuple[str, Any]:
    # 1 and "1" are different ids.
    return type(rid).__name__, rid


def _model_name(model: Any) -> str:
    return str(getattr(model, "name", type(model).__name__))


def _labelled_ids(p: Path, names: tuple[str, str], owner: str) -> set[tuple[str, Any]]:
    """Ids already labelled in ``p`` (after repairing a truncated tail).

    Raises
    ------
    InvalidParameterError
        If ``p`` holds rows made with other models than ``names`` (strong, weak).
    """
    done: set[tuple[str, Any]] = set()
    if not p.exists():
        return done
    _repair_tail(p)
    for r in read_labels_jsonl(p):
        if (r["model_a"], r["model_b"]) != names:
            raise InvalidParameterError(
                f"The 'out_path' parameter of {owner} points to labels made with "
                f"model_a={r['model_a']!r}, model_b={r['model_b']!r}, not "
                f"{names[0]!r} / {names[1]!r}; use another file."
            )
        done.add(_id_key(r["id"]))
    return done


def _label_batch(
    batch_ids: list[str | int],
    batch: list[Prompt],
    models: tuple[Any, Any],
    estimator: Any,
    tau: float,
    names: tuple[str, str],
    p: Path,
) -> int:
    """Score one batch with both models (weak, strong), append its rows to ``p``.

    Returns
    -------
    int
        The number of prompts left unlabelled because an SE was NaN.
    """
    weak_model, strong_model = models
    se_s = _scores(estimator.estimate(batch, strong_model), len(batch), "strong_model")
    se_w = _scores(estimator.estimate(batch, weak_model), len(batch), "weak_model")
    ok = np.isfinite(se_s) & np.isfinite(se_w)
    keep = np.flatnonzero(ok)
    if keep.size:
        labels = preference_labels(se_s[keep], se_w[keep], tau)
        rows = preference_rows(
            [batch_ids[k] for k in keep], [batch[k] for k in keep], labels,
            strong_name=names[0], weak_name=names[1],
            se_strong=se_s[keep], se_weak=se_w[keep],
        )
        write_labels_jsonl(rows, p, append=True)
    return int((~ok).sum())


def _scores(est: Any, n: int, which: str) -> np.ndarray:
    scores = np.asarray(getattr(est, "scores", None), dtype=np.float64)
    if scores.shape != (n,):
        raise InvalidParameterError(
            f"The estimator of make_se_labels returned scores of shape {scores.shape} for "
            f"{which}; expected ({n},)."
        )
    if (scores < 0).any():
        raise InvalidParameterError(
            f"The estimator of make_se_labels returned a negative semantic entropy for {which}."
        )
    return scores


def _done_ids(p: Path, strong_name: str, weak_name: str, owner: str) -> set[tuple[str, Any]]:
    """(type name, id) of the rows already in ``p``, checking they pair the same models."""
    done: set[tuple[str, Any]] = set()
    if not p.exists():
        return done
    for r in read_labels_jsonl(p, allow_truncated_tail=True):
        if (r["model_a"], r["model_b"]) != (strong_name, weak_name):
            raise InvalidParameterError(
                f"The 'out_path' parameter of {owner} points to labels made with "
                f"model_a={r['model_a']!r}, model_b={r['model_b']!r}, not {strong_name!r} / "
                f"{weak_name!r}; use another file."
            )
        done.add((type(r["id"]).__name__, r["id"]))
    return done


def accuracy_label_file(
    prompts: Sequence[Prompt],
    ids: Sequence[str | int],
    references: Sequence[Sequence[str]],
    weak: Any,
    strong: Any,
    out_path: str | os.PathLike[str],
    *,
    grader: str = "contains",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy preference labels (greedy answers graded against references), resumable.

    Both models answer greedily; each answer is graded with ``grader``; the
    label is :func:`accuracy_labels` of the two grades. Rows are appended batch
    by batch and ids already in ``out_path`` are skipped, as in
    :func:`make_se_labels`.

    Parameters
    ----------
    prompts : sequence of Prompt, length n
    ids : sequence of str or int, length n
        Unique, stable identifiers (the resume key).
    references : sequence of length n of sequence of str
        Accepted answers per prompt.
    weak, strong : LanguageModel
        With a ``name`` (written to ``model_b`` / ``model_a``).
    out_path : path-like
        JSON-lines output (created if missing).
    grader : str, default="contains"
        A grader name of :mod:`confroute.grading`.
    max_new_tokens : int, default=32
    batch_size : int, default=8
    progress : bool, default=True

    Returns
    -------
    list of dict
        Every row now in ``out_path``.
    """
    from tqdm.auto import tqdm

    from confroute._validation import check_prompts
    from confroute.grading import resolve_grader
    from confroute.types import GenerationConfig

    owner = "accuracy_label_file"
    plist = check_prompts(prompts, owner)
    check_same_length(owner, prompts=plist, ids=list(ids), references=list(references))
    bs = check_int(batch_size, "batch_size", owner, min_value=1)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    grade = resolve_grader(grader, owner)
    strong_name, weak_name = str(strong.name), str(weak.name)
    p = Path(out_path)
    done = _done_ids(p, strong_name, weak_name, owner)
    todo = [i for i, r in enumerate(ids) if (type(r).__name__, r) not in done]
    bar = tqdm(total=len(todo), desc="accuracy labels", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(todo), bs):
            idx = todo[start:start + bs]
            batch = [plist[i] for i in idx]
            ws = [o[0].text for o in weak.generate(batch, cfg)]
            ss = [o[0].text for o in strong.generate(batch, cfg)]
            cw = [grade(a, references[i]) >= 0.5 for a, i in zip(ws, idx)]
            cs = [grade(a, references[i]) >= 0.5 for a, i in zip(ss, idx)]
            rows = preference_rows([ids[i] for i in idx], batch, accuracy_labels(cs, cw),
                                   strong_name=strong_name, weak_name=weak_name)
            write_labels_jsonl(rows, p, append=True)
            bar.update(len(idx))
    finally:
        bar.close()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    return read_labels_jsonl(p)
