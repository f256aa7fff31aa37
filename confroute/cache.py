"""On-disk cache of generations (sqlite), so evaluations and calibrations resume.

A row holds everything one ``generate`` call produced for one prompt: the list
of :class:`~confroute.types.Sample` (``config.n`` of them), keyed by

* the model id (``model.name`` unless given),
* the prompt's identity (:func:`confroute.types.prompt_key`, hashed),
* the generation parameters (:meth:`confroute.types.GenerationConfig.key`).

Values are JSON; token arrays are stored as base64 of their little-endian
float32 bytes. Nothing is ever unpickled, so a cache file from elsewhere is
safe to open. Each row also records the wall-clock seconds its generation took
(the batch time divided evenly among the prompts of the batch), so compute cost
can be reported even when every answer comes from the cache.

Corrupted rows
--------------
A row that cannot be decoded (bad JSON, wrong field types, wrong number of
samples, arrays whose length disagrees with the tokens) is treated as a miss:
it is regenerated and overwritten, and the count is kept in
:attr:`GenerationCache.n_corrupt`. With ``on_corrupt="raise"`` a
:class:`~confroute.errors.SerializationError` naming the row is raised instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from confroute._validation import check_choice, check_int, param_error
from confroute.errors import SerializationError
from confroute.types import GenerationConfig, Prompt, Sample, prompt_key

__all__ = ["CachedModel", "CallRecord", "GenerationCache"]

_SCHEMA_VERSION = 1
_FINISH = ("stop", "length", "early_stop", "error")


def _encode_array(arr: np.ndarray | None) -> str | None:
    if arr is None:
        return None
    return base64.b64encode(np.asarray(arr, dtype="<f4").tobytes()).decode("ascii")


def _decode_array(text: Any, where: str) -> np.ndarray | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise SerializationError(f"{where}: array field is not a base64 string.")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SerializationError(f"{where}: array field is not valid base64.") from None
    if len(raw) % 4:
        raise SerializationError(f"{where}: array byte length {len(raw)} is not a multiple of 4.")
    # copy: frombuffer views are read-only and tied to the bytes object
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def encode_samples(samples: Sequence[Sample]) -> str:
    """JSON text of a list of samples (arrays as base64 float32)."""
    rows = []
    for s in samples:
        rows.append({
            "text": s.text,
            "token_ids": [int(t) for t in s.token_ids],
            "token_logprobs": _encode_array(s.token_logprobs),
            "token_entropies": _encode_array(s.token_entropies),
            "finish_reason": s.finish_reason,
            "prompt_tokens": s.prompt_tokens,
            "entropy_kind": s.entropy_kind,
        })
    return json.dumps({"v": _SCHEMA_VERSION, "samples": rows}, ensure_ascii=False)


def decode_samples(text: str, where: str = "cache row") -> list[Sample]:
    """Inverse of :func:`encode_samples`.

    Raises
    ------
    SerializationError
        If the text is not a valid encoding of samples.
    """
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise SerializationError(f"{where}: not valid JSON.") from None
    if not isinstance(data, dict) or data.get("v") != _SCHEMA_VERSION:
        raise SerializationError(f"{where}: unknown format version.")
    rows = data.get("samples")
    if not isinstance(rows, list):
        raise SerializationError(f"{where}: 'samples' is not a list.")
    out = []
    for j, r in enumerate(rows):
        w = f"{where} sample {j}"
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise SerializationError(f"{w}: missing text.")
        ids = r.get("token_ids")
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise SerializationError(f"{w}: token_ids is not a list of ints.")
        lp = _decode_array(r.get("token_logprobs"), w)
        ent = _decode_array(r.get("token_entropies"), w)
        for name, arr in (("token_logprobs", lp), ("token_entropies", ent)):
            if arr is not None and ids and len(arr) != len(ids):
                raise SerializationError(f"{w}: {name} has {len(arr)} values for {len(ids)} "
                                         "tokens.")
        finish = r.get("finish_reason")
        if finish not in _FINISH:
            raise SerializationError(f"{w}: unknown finish_reason {finish!r}.")
        pt = r.get("prompt_tokens")
        if pt is not None and (not isinstance(pt, int) or isinstance(pt, bool)):
            raise SerializationError(f"{w}: prompt_tokens is not an int.")
        kind = r.get("entropy_kind")  # absent from rows written before it existed
        if kind is not None and (kind not in ("exact", "top_k_bound", "none")
                                 or (kind == "none") != (ent is None)):
            raise SerializationError(f"{w}: entropy_kind {kind!r} does not match the entropies.")
        out.append(Sample(text=r["text"], token_ids=tuple(ids), token_logprobs=lp,
                          token_entropies=ent, finish_reason=finish, prompt_tokens=pt,
                          entropy_kind=kind))
    return out


def _hash_prompt(prompt: Prompt) -> str:
    return hashlib.sha256(prompt_key(prompt).encode("utf-8")).hexdigest()


class GenerationCache:
    """A sqlite file of generations, safe to share between threads.

    Parameters
    ----------
    path : str or Path
        The database file (created with its parent folder). ``":memory:"`` keeps
        it in memory.
    on_corrupt : {"recompute", "raise"}, default "recompute"
        What a corrupted row does on lookup (see the module notes).

    Attributes
    ----------
    n_corrupt : int
        Corrupted rows met so far (treated as misses).
    """

    def __init__(self, path: str | Path, *, on_corrupt: str = "recompute") -> None:
        self.on_corrupt = check_choice(on_corrupt, "on_corrupt", "GenerationCache",
                                       ("recompute", "raise"))
        if not isinstance(path, (str, Path)):
            raise param_error("path", "GenerationCache", "a path", path, type_error=True)
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=60.0)
        with self._lock:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS generations ("
                " model TEXT NOT NULL, prompt_hash TEXT NOT NULL, config TEXT NOT NULL,"
                " samples TEXT NOT NULL, seconds REAL NOT NULL DEFAULT 0,"
                " created REAL NOT NULL,"
                " PRIMARY KEY (model, prompt_hash, config))"
            )
            self._conn.commit()
        self.n_corrupt = 0

    def __repr__(self) -> str:
        return f"GenerationCache({self.path!r})"

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM generations").fetchone()
        return int(row[0])

    def get(self, model: str, prompt: Prompt, config: GenerationConfig
            ) -> tuple[list[Sample], float] | None:
        """The cached samples and generation seconds, or None on a miss.

        A corrupted row counts as a miss (or raises, see ``on_corrupt``).
        """
        with self._lock:
            row = self._conn.execute(
                "SELECT samples, seconds FROM generations WHERE model=? AND prompt_hash=? "
                "AND config=?", (model, _hash_prompt(prompt), config.key()),
            ).fetchone()
        if row is None:
            return None
        where = f"{self.path}: row (model={model!r}, config={config.key()})"
        try:
            samples = decode_samples(row[0], where)
            if len(samples) != config.n:
                raise SerializationError(f"{where}: holds {len(samples)} samples, expected "
                                         f"{config.n}.")
            seconds = float(row[1])
        except (SerializationError, TypeError, ValueError):
            if self.on_corrupt == "raise":
                raise
            self.n_corrupt += 1
            return None
        return samples, seconds

    def put_many(self, model: str, items: Sequence[tuple[Prompt, list[Sample], float]],
                 config: GenerationConfig) -> None:
        """Store ``(prompt, samples, seconds)`` items in one transaction (replacing rows)."""
        now = time.time()
        rows = [(model, _hash_prompt(p), config.key(), encode_samples(s), float(sec), now)
                for p, s, sec in items]
        with self._lock:
            self._conn.executemany(
                "INSERT OR REPLACE INTO generations (model, prompt_hash, config, samples, "
                "seconds, created) VALUES (?, ?, ?, ?, ?, ?)", rows,
            )
            self._conn.commit()

    def put(self, model: str, prompt: Prompt, samples: list[Sample], config: GenerationConfig,
            seconds: float = 0.0) -> None:
        """Store the samples of one prompt."""
        self.put_many(model, [(prompt, samples, seconds)], config)


@dataclass
class CallRecord:
    """One ``generate`` call made through a :class:`CachedModel`.

    Attributes
    ----------
    config : GenerationConfig
    prompt_keys : list of str
        :func:`~confroute.types.prompt_key` of each prompt, in call order.
    seconds : list of float
        Generation seconds of each prompt (stored ones for hits).
    n_hits : int
        Prompts answered from the cache.
    """

    config: GenerationConfig
    prompt_keys: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    n_hits: int = 0


class CachedModel:
    """A :class:`~confroute.models.base.LanguageModel` that reads and fills a cache.

    Every prompt of a ``generate`` call is looked up; only the missing ones are
    sent to the wrapped model, in chunks of ``chunk_size`` prompts, and each
    chunk is stored as soon as it is generated, so an interrupted run resumes
    without recomputing anything already stored.

    Parameters
    ----------
    model : LanguageModel
        The wrapped model (only called on misses).
    cache : GenerationCache
    model_id : str or None
        Cache identity of the model; default ``model.name``. It must change when
        anything that changes the outputs changes (weights, system prompt, ...).
    chunk_size : int or None
        Prompts per call to the wrapped model; default its ``batch_size``
        attribute, or 16.

    Attributes
    ----------
    n_model_calls : int
        Calls made to the wrapped model (``generate`` or ``generate_multi``).
    calls : list of CallRecord
        One record per ``generate`` call on this object (for cost accounting).

    Notes
    -----
    With a sampling seed, a backend's draws may depend on the batch a prompt was
    generated in; the cache returns what was drawn the first time, so results
    are reproducible from the cache, not necessarily from scratch with
    different batch boundaries. ``score`` (when the wrapped model has it) is
    passed through uncached.
    """

    def __init__(self, model: Any, cache: GenerationCache, *, model_id: str | None = None,
                 chunk_size: int | None = None) -> None:
        if not callable(getattr(model, "generate", None)):
            raise param_error("model", "CachedModel", "a LanguageModel (with generate)", model,
                              type_error=True)
        if not isinstance(cache, GenerationCache):
            raise param_error("cache", "CachedModel", "a GenerationCache", cache,
                              type_error=True)
        self.model = model
        self.cache = cache
        self.model_id = model_id if model_id is not None else str(model.name)
        size = chunk_size if chunk_size is not None else getattr(model, "batch_size", 16)
        self.chunk_size = int(check_int(size, "chunk_size", "CachedModel", min_value=1) or 16)
        self.n_model_calls = 0
        self.calls: list[CallRecord] = []

    @property
    def name(self) -> str:
        return str(self.model.name)

    def __repr__(self) -> str:
        return f"CachedModel({self.model!r}, {self.cache!r})"

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[Sample]]:
        """Samples for every prompt: from the cache, else generated and stored.

        Returns
        -------
        list of length n_prompts of list of length config.n of Sample
        """
        return self.generate_multi(prompts, [config])[0]

    def generate_multi(
        self, prompts: Sequence[Prompt], configs: Sequence[GenerationConfig]
    ) -> list[list[list[Sample]]]:
        """:meth:`generate` for several configurations; those missing for the same
        prompts are generated together (``generate_multi`` of the wrapped model
        when it has one).

        Returns
        -------
        list of length n_configs of list of length n_prompts of list of Sample
        """
        for c, config in enumerate(configs):
            if not isinstance(config, GenerationConfig):
                name = "config" if len(configs) == 1 else f"configs[{c}]"
                raise param_error(name, "CachedModel.generate", "a GenerationConfig", config,
                                  type_error=True)
        plist = list(prompts)
        keys = [prompt_key(p) for p in plist]
        first_of: dict[str, int] = {}
        for i, key in enumerate(keys):
            first_of.setdefault(key, i)  # a duplicate prompt in one call is generated once
        unique = sorted(first_of.values())
        outs: list[list[list[Sample] | None]] = []
        secs: list[list[float]] = []
        n_missing: list[int] = []
        together: dict[tuple[int, ...], list[int]] = {}
        for c, config in enumerate(configs):
            out: list[list[Sample] | None] = [None] * len(plist)
            sec = [0.0] * len(plist)
            missing = []
            for i in unique:
                hit = self.cache.get(self.model_id, plist[i], config)
                if hit is None:
                    missing.append(i)
                else:
                    out[i], sec[i] = hit
            outs.append(out)
            secs.append(sec)
            n_missing.append(len(missing))
            together.setdefault(tuple(missing), []).append(c)
        for missing_t, cids in together.items():
            self._fill(plist, list(missing_t), [configs[c] for c in cids],
                       [outs[c] for c in cids], [secs[c] for c in cids])
        results: list[list[list[Sample]]] = []
        for c, config in enumerate(configs):
            record = CallRecord(config=config, n_hits=len(plist) - n_missing[c])
            result: list[list[Sample]] = []
            for i, key in enumerate(keys):
                j = first_of[key]
                got = outs[c][j]
                assert got is not None
                result.append(got)
                record.prompt_keys.append(key)
                record.seconds.append(secs[c][j] if j == i else 0.0)
            self.calls.append(record)
            results.append(result)
        return results

    def _fill(self, plist: list[Prompt], missing: list[int], configs: list[GenerationConfig],
              outs: list[list[list[Sample] | None]], secs: list[list[float]]) -> None:
        """Generate ``configs`` for the prompts at ``missing``, chunk by chunk, storing
        each chunk as soon as it is generated."""
        from confroute.models.base import generate_configs

        chunks = [missing[k:k + self.chunk_size]
                  for k in range(0, len(missing), self.chunk_size)]
        bar: Any = None
        if len(chunks) > 1:
            from tqdm.auto import tqdm

            ns = "+".join(str(c.n) for c in configs)
            bar = tqdm(total=len(missing), desc=f"generate ({self.model_id}, n={ns})",
                       unit="prompt")
        for chunk in chunks:
            start = time.perf_counter()
            self.n_model_calls += 1
            generated = generate_configs(self.model, [plist[i] for i in chunk], configs)
            # Edge time per prompt, shared evenly by configurations generated together.
            per = (time.perf_counter() - start) / len(chunk) / len(configs)
            for c, config in enumerate(configs):
                if len(generated[c]) != len(chunk):
                    raise SerializationError(
                        f"The wrapped model returned {len(generated[c])} results for "
                        f"{len(chunk)} prompts."
                    )
                self.cache.put_many(
                    self.model_id,
                    [(plist[i], list(g), per) for i, g in zip(chunk, generated[c])], config,
                )
                for i, g in zip(chunk, generated[c]):
                    outs[c][i], secs[c][i] = list(g), per
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()

    def score(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[np.ndarray]:
        """Pass-through to the wrapped model's ``score`` (not cached)."""
        fn = getattr(self.model, "score", None)
        if fn is None:
            raise AttributeError(f"The wrapped model {self.model!r} has no 'score' method.")
        return list(fn(prompts, continuations))
