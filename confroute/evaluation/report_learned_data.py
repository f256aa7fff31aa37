"""What the learned-estimators evaluation computes once and keeps on disk.

One greedy pass per question produces the answer, its token log-probs and
entropies, and the hidden states of the candidate layers, captured in the
decoding passes themselves (``GenerationConfig.hidden_layers``; no second
pass). Of the states, two pooled vectors per layer are kept: the mean over the
answer's tokens (what :class:`~confroute.estimators.HiddenStateProbe` reads with
``position="answer_mean"``) and the state at the prompt's last token, which is
the state that predicted the first answer token (what
:class:`~confroute.estimators.PromptProbe` reads after one prefill; the two are
equal up to float rounding, checked by ``tests/test_probes.py``).

:class:`HiddenStateStore` keeps them as one ``.npz`` file per (model, prompt,
configuration) next to the sqlite generation cache, so a re-run, or a larger run,
computes only the questions that are missing. Files are read with
``allow_pickle=False``: nothing from the store is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from confroute._validation import check_choice, check_same_length, param_error
from confroute.types import GenerationConfig, Prompt, Sample, Samples, prompt_key

__all__ = ["CURVE_SIZES", "ISSUE_SIZES", "LEARNED_DEFAULTS", "CapturedAnswer",
           "HiddenStateStore", "LazyEdge", "capture_answers", "edge_seconds",
           "option_logliks"]

# The sizes issue 15 asks for (training: NQ-open dev + TriviaQA; test: efficientqa_dev),
# and the defaults of `confroute evaluate-report --learned` (light: the CLI reads them).
ISSUE_SIZES = {"n_train": 3610, "n_trivia": 3000, "n_test": 1800}
LEARNED_DEFAULTS: dict[str, Any] = {**ISSUE_SIZES, "n_se": 400, "n_mc": 500, "n_samples": 5,
                                    "max_new_tokens": 32, "layers": (8, 15, 22, 29)}
CURVE_SIZES = (100, 300, 1000, 3000)


class HiddenStateStore:
    """A folder of ``.npz`` files, one per (model id, prompt, tag).

    Parameters
    ----------
    path : str or Path
        The folder (created on first write), e.g. ``runs/cache.sqlite.hidden``.
    """

    def __init__(self, path: str | Path) -> None:
        if not isinstance(path, (str, Path)):
            raise param_error("path", "HiddenStateStore", "a str or Path", path,
                              type_error=True)
        self.path = Path(path)
        self.n_hits = 0
        self.n_corrupt = 0

    def __repr__(self) -> str:
        return f"HiddenStateStore({str(self.path)!r})"

    def _file(self, model_id: str, prompt: Prompt, tag: str) -> Path:
        h = hashlib.sha256(json.dumps([model_id, prompt_key(prompt), tag]).encode()).hexdigest()
        return self.path / h[:2] / f"{h}.npz"

    def get(self, model_id: str, prompt: Prompt, tag: str) -> dict[str, np.ndarray] | None:
        """The arrays stored for the key, or None (a missing or unreadable file)."""
        f = self._file(model_id, prompt, tag)
        if not f.exists():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                out = {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError, KeyError):
            self.n_corrupt += 1
            return None
        self.n_hits += 1
        return out

    def put(self, model_id: str, prompt: Prompt, tag: str, arrays: dict[str, np.ndarray]) -> None:
        """Store ``arrays`` for the key (written to a temporary file, then renamed)."""
        f = self._file(model_id, prompt, tag)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, f)

    def read_json(self, name: str) -> dict[str, Any]:
        f = self.path / name
        return dict(json.loads(f.read_text())) if f.exists() else {}

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f"{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path / name)


@dataclass(frozen=True)
class CapturedAnswer:
    """A greedy answer with its pooled hidden states.

    Attributes
    ----------
    sample : Sample
        The greedy answer (tokens, log-probs, entropies; no hidden states).
    layers : tuple of int
    answer_mean : ndarray of shape (n_layers, hidden_size)
        Mean state over the answer's tokens (NaN for an answer without tokens).
    prompt_last : ndarray of shape (n_layers, hidden_size)
        State at the prompt's last token (NaN for an answer without tokens).
    seconds : float
        Edge seconds of the greedy pass (with capture) for this prompt.
    """

    sample: Sample
    layers: tuple[int, ...]
    answer_mean: np.ndarray
    prompt_last: np.ndarray
    seconds: float

    def samples(self, prompt: Prompt) -> Samples:
        """``Samples`` the probes read: the greedy answer carrying its mean state as a
        one-token state (what ``position="answer_mean"`` pools to) and the prompt
        state under :meth:`PromptProbe.extra_key`."""
        from confroute.estimators.probes import PromptProbe

        ok = bool(np.isfinite(self.answer_mean).all())
        hs = self.answer_mean[:, None, :] if ok else np.zeros(
            (len(self.layers), 0, self.answer_mean.shape[-1]), dtype=np.float32)
        greedy = replace(self.sample, hidden_states=hs, hidden_layers=self.layers)
        extra = {PromptProbe.extra_key(j): self.prompt_last[k]
                 for k, j in enumerate(self.layers)} if ok else {}
        return Samples(prompt=prompt, greedy=greedy, extra=extra)


def _pooled(sample: Sample, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    hs = sample.hidden_states
    if hs is None or hs.shape[1] == 0:
        width = 1 if hs is None else hs.shape[-1]
        nan = np.full((n_layers, width), np.nan, dtype=np.float32)
        return nan, nan.copy()
    return hs.mean(axis=1).astype(np.float32), hs[:, 0, :].astype(np.float32)


def _to_arrays(cap: CapturedAnswer) -> dict[str, np.ndarray]:
    from confroute.cache import encode_samples

    return {"answer_mean": cap.answer_mean, "prompt_last": cap.prompt_last,
            "layers": np.asarray(cap.layers, dtype=np.int64),
            "seconds": np.asarray(cap.seconds, dtype=np.float64),
            "sample": np.asarray(encode_samples([cap.sample]))}


def _from_arrays(a: dict[str, np.ndarray]) -> CapturedAnswer | None:
    from confroute.cache import decode_samples
    from confroute.errors import SerializationError

    try:
        sample = decode_samples(str(a["sample"]))[0]
        layers = tuple(int(i) for i in a["layers"])
        mean, last = a["answer_mean"].astype(np.float32), a["prompt_last"].astype(np.float32)
    except (KeyError, IndexError, ValueError, SerializationError):
        return None
    if mean.shape != last.shape or mean.ndim != 2 or mean.shape[0] != len(layers):
        return None
    return CapturedAnswer(sample, layers, mean, last, float(a["seconds"]))


def capture_answers(
    model: Any, model_id: str, prompts: Sequence[Prompt], *, layers: Sequence[int],
    max_new_tokens: int, store: HiddenStateStore | None, chunk_size: int = 16,
    desc: str = "greedy answers + hidden states",
) -> list[CapturedAnswer]:
    """Greedy answers and pooled hidden states, from the store or generated in one pass.

    Parameters
    ----------
    model : LanguageModel
        A local model whose ``generate`` honours ``GenerationConfig.hidden_layers``.
    model_id : str
        Identity of the model in the store (changes when weights or system prompt do).
    prompts : sequence of Prompt, length n
    layers : sequence of int
    max_new_tokens : int
    store : HiddenStateStore or None
    chunk_size : int, default 16
        Prompts per ``generate`` call (each chunk is stored as soon as it is done).

    Returns
    -------
    list of CapturedAnswer, length n
    """
    from tqdm.auto import tqdm

    config = GenerationConfig(max_new_tokens=max_new_tokens, hidden_layers=tuple(layers))
    tag = f"greedy:{config.key()}"
    got: list[CapturedAnswer | None] = [None] * len(prompts)
    if store is not None:
        for i, p in enumerate(prompts):
            arrays = store.get(model_id, p, tag)
            got[i] = None if arrays is None else _from_arrays(arrays)
    missing = [i for i, c in enumerate(got) if c is None]
    with tqdm(total=len(prompts), initial=len(prompts) - len(missing), desc=desc,
              unit="question") as bar:
        for k in range(0, len(missing), chunk_size):
            chunk = missing[k:k + chunk_size]
            t0 = time.perf_counter()
            out = model.generate([prompts[i] for i in chunk], config)
            per = (time.perf_counter() - t0) / len(chunk)
            for i, rows in zip(chunk, out):
                s = rows[0]
                mean, last = _pooled(s, len(layers))
                cap = CapturedAnswer(replace(s, hidden_states=None, hidden_layers=()),
                                     tuple(layers), mean, last, per)
                got[i] = cap
                if store is not None:
                    store.put(model_id, prompts[i], tag, _to_arrays(cap))
            bar.update(len(chunk))
    return [c for c in got if c is not None]


def edge_seconds(model: Any, model_id: str, prompts: Sequence[Prompt], layers: Sequence[int],
                 store: HiddenStateStore | None, *, max_new_tokens: int,
                 chunk_size: int = 16) -> tuple[float, float]:
    """Seconds per prompt of the greedy pass with capture and of the prefill, side by side.

    Each chunk of ``prompts`` (``chunk_size``, as :func:`capture_answers` batches) is
    answered greedily with the candidate layers captured, then prefilled alone
    (``prompt_hidden_states``, the pre-generation decision's cost), so both figures
    come from the same moment of the machine. Timed once and kept in the store's
    ``timings.json``: a re-run reports the first measurement.

    Returns
    -------
    greedy, prefill : float
        Seconds per prompt.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, hidden_layers=tuple(layers))
    key = json.dumps(["side-by-side", model_id, config.key(), chunk_size, len(prompts),
                      list(layers), hashlib.sha256("\n".join(prompt_key(p) for p in prompts)
                                                   .encode()).hexdigest()[:16]])
    saved = store.read_json("timings.json") if store is not None else {}
    if key in saved:
        g, pre = saved[key]
        return float(g), float(pre)
    plist = list(prompts)
    model.generate(plist[:1], config)  # untimed: loads the model, warms the kernels
    model.prompt_hidden_states(plist[:1], list(layers))
    greedy = prefill = 0.0
    for k in range(0, len(plist), chunk_size):
        chunk = plist[k:k + chunk_size]
        t0 = time.perf_counter()
        model.generate(chunk, config)
        t1 = time.perf_counter()
        model.prompt_hidden_states(chunk, list(layers))
        greedy, prefill = greedy + t1 - t0, prefill + time.perf_counter() - t1
    n = max(len(plist), 1)
    if store is not None:
        store.write_json("timings.json", {**saved, key: [greedy / n, prefill / n]})
    return greedy / n, prefill / n


def _stored_options(store: HiddenStateStore | None, model_id: str, prompt: Prompt,
                    tag: str, scoring: str) -> np.ndarray | None:
    """The stored option scores of one question in ``OptionEntropy``'s cached form."""
    a = None if store is None else store.get(model_id, prompt, tag)
    if a is None:
        return None
    if scoring == "letter":
        return np.asarray(a["logliks"], dtype=np.float64)
    return np.column_stack([np.asarray(a["sums"], dtype=np.float64),
                            np.asarray(a["counts"], dtype=np.float64)])


def option_logliks(model: Any, model_id: str, prompts: Sequence[Prompt],
                   letters: Sequence[str], store: HiddenStateStore | None,
                   desc: str = "option log-likelihoods", *, scoring: str = "letter",
                   option_texts: Sequence[Sequence[str]] | None = None) -> list[np.ndarray]:
    """Each question's option scores, as ``OptionEntropy(scoring=scoring)`` caches them.

    Parameters
    ----------
    model : LanguageModel with ``score``
    model_id : str
    prompts : sequence of Prompt of length n_prompts
    letters : sequence of str of length n_prompts
        The option letters of each question (``"ABCD"``).
    store : HiddenStateStore or None
        Keeps the scores: tag ``options:{letters}`` (letter scoring, unchanged) or
        ``options-text:{letters}`` / ``options-cloze:{letters}`` (text / cloze
        scoring: per-option summed token log-prob ``sums`` and token ``counts``, so
        both normalisations can be derived).
    scoring : {"letter", "text", "cloze"}, default "letter"
    option_texts : sequence of sequence of str, optional
        With ``scoring="text"``: each question's option texts in letter order
        (default: parsed from the prompt).

    Returns
    -------
    list of length n_prompts of ndarray
        Shape (n_options,) summed log-likelihoods (letter) or (n_options, 2) summed
        log-prob and token count per option (text).
    """
    from tqdm.auto import tqdm

    from confroute.estimators.options import OptionEntropy

    check_choice(scoring, "scoring", "option_logliks", ("letter", "text", "cloze"))
    check_same_length("option_logliks", prompts=prompts, letters=letters)
    if option_texts is not None:
        check_same_length("option_logliks", prompts=prompts, option_texts=option_texts)
    est = OptionEntropy(scoring=scoring)
    stem = {"letter": "options", "text": "options-text", "cloze": "options-cloze"}[scoring]
    tags = [f"{stem}:{lt}" for lt in letters]
    out = [_stored_options(store, model_id, p, t, scoring) for p, t in zip(prompts, tags)]
    missing = [i for i, o in enumerate(out) if o is None]
    with tqdm(total=len(prompts), initial=len(prompts) - len(missing), desc=desc,
              unit="question") as bar:
        for k in range(0, len(missing), 32):
            chunk = missing[k:k + 32]
            asked = [Samples(prompt=prompts[i], extra={"options": list(letters[i]), **(
                {} if option_texts is None else {"option_texts": list(option_texts[i])})})
                for i in chunk]
            for i, s in zip(chunk, est.prepare_samples(asked, model)):
                v = np.asarray(s.extra[est.cache_key], dtype=np.float64)
                out[i] = v
                if store is not None:
                    store.put(model_id, prompts[i], tags[i], {"logliks": v} if scoring ==
                              "letter" else {"sums": v[:, 0], "counts": v[:, 1]})
            bar.update(len(chunk))
    return [o for o in out if o is not None]


class LazyEdge:
    """A local model loaded on first use: ``generate``, ``score``, ``prompt_hidden_states``.

    A re-run whose answers are all stored never loads the model.

    Parameters
    ----------
    name : str
        The model's identity, known before loading.
    loader : callable
        Returns the model (e.g. :func:`confroute.models.embedded.load_default_edge_model`).
    """

    def __init__(self, name: str, loader: Callable[[], Any]) -> None:
        self.name = name
        self.loader = loader
        self.model: Any = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def batch_size(self) -> int:
        return 16

    def get(self) -> Any:
        if self.model is None:
            self.model = self.loader()
        return self.model

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> Any:
        return self.get().generate(prompts, config)

    def generate_multi(self, prompts: Sequence[Prompt], configs: Sequence[GenerationConfig]
                       ) -> Any:
        from confroute.models.base import generate_configs

        return generate_configs(self.get(), prompts, configs)

    def score(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> Any:
        return self.get().score(prompts, continuations)

    def prompt_hidden_states(self, prompts: Sequence[Prompt], layers: Sequence[int]) -> Any:
        return self.get().prompt_hidden_states(prompts, layers)
