"""Turning generated token rows into :class:`~confroute.types.Sample` objects.

Shared by both decoding back-ends of :class:`~confroute.models.hf.HFLanguageModel`
(``model.generate`` in :mod:`confroute.models._hf_generate` and the own loop in
:mod:`confroute.models._decode`): where a row ends (EOS, stop string, early stop,
length), its text, and the token statistics that belong to that text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from confroute.models._decode import decode
from confroute.types import GenerationConfig, Sample

__all__ = ["decode_samples", "first_stop", "make_sample", "tokens_covering"]


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index in ``text`` where the earliest stop string starts, or None."""
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(positions) if positions else None


def tokens_covering(tokenizer: Any, ids: list[int], text: str) -> int:
    """Smallest k such that the first k tokens decode to a text starting with ``text``.

    A byte-level token can end inside a multi-byte character, which decodes as a
    replacement character until the next token completes it; such a k is not
    enough even though its text is long enough.
    """
    def decoded(k: int) -> str:
        return str(tokenizer.decode(ids[:k], skip_special_tokens=True))

    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decoded(mid)) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    while lo < len(ids) and not decoded(lo).startswith(text):
        lo += 1
    return lo


def _row_end(
    row: list[int], config: GenerationConfig, eos_set: set[int], pad_id: int,
    stopped_at: int | None, padded: bool,
) -> tuple[int, str]:
    """Length kept of a generated row and its finish reason, before stop strings."""
    length = len(row)
    finish = "length"
    # After an early stop the row holds padding, which may be the EOS id.
    limit = length if stopped_at is None else stopped_at
    for t, tok in enumerate(row[:limit]):
        if tok in eos_set:
            return t + 1, "stop"
    if stopped_at is not None and stopped_at < config.max_new_tokens:
        length, finish = stopped_at, "early_stop"
    if config.stop and stopped_at is None and padded:
        # A row stopped by a stop string is padded while others continue.
        while length > 0 and row[length - 1] == pad_id:
            length -= 1
    return length, finish


def make_sample(
    tokenizer: Any,
    row: list[int],
    logprobs: np.ndarray,
    entropies: np.ndarray,
    config: GenerationConfig,
    eos_set: set[int],
    pad_id: int,
    prompt_tokens: int,
    stopped_at: int | None = None,
    *,
    padded: bool = True,
    hidden: np.ndarray | None = None,
    hidden_layers: tuple[int, ...] = (),
) -> Sample:
    """One :class:`~confroute.types.Sample` from a generated row.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    row : list of int
        Generated token ids (padded to the batch's length when ``padded``).
    logprobs, entropies : ndarray of shape (>= len(kept tokens),)
        Per-token statistics of the row.
    config : GenerationConfig
    eos_set : set of int
        End-of-sequence ids; the row ends at (and includes) the first one.
    pad_id : int
    prompt_tokens : int
    stopped_at : int or None
        Step at which an early-stop rule ended the row.
    padded : bool, default=True
        Whether trailing padding may follow a stop string (``model.generate``).
    hidden : ndarray of shape (n_layers, >= len(kept tokens), hidden_size), optional
        Captured hidden states of ``hidden_layers``, cut like the token arrays.

    Returns
    -------
    Sample
        Token arrays cut to the tokens that contribute characters to the text.
    """
    length, finish = _row_end(row, config, eos_set, pad_id, stopped_at, padded)
    ids = row[:length]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = first_stop(text, config.stop)
    if cut is not None:
        keep = tokens_covering(tokenizer, ids, text[:cut])
        ids, text, finish = ids[:keep], text[:cut], "stop"
        length = keep
    return Sample(
        text=text,
        token_ids=tuple(int(i) for i in ids),
        token_logprobs=logprobs[:length].copy(),
        token_entropies=entropies[:length].copy(),
        entropy_kind="exact",  # over the full vocabulary
        finish_reason=finish,  # type: ignore[arg-type]
        prompt_tokens=prompt_tokens,
        hidden_states=None if hidden is None else hidden[:, :length].copy(),
        hidden_layers=hidden_layers if hidden is not None else (),
    )


def decode_samples(
    model: Any,
    tokenizer: Any,
    encoded: list[list[int]],
    batches: Iterable[list[int]],
    configs: list[GenerationConfig],
    *,
    eos_ids: list[int],
    shared_prefill: bool,
    device: Any = None,
) -> list[list[list[Sample]]]:
    """Samples of every configuration from the own loop, over ``batches`` of
    indices into ``encoded``; inputs go to ``device`` (None: the model's first
    parameter's device).

    Returns
    -------
    list of length n_configs of list of length len(encoded) of list of Sample

    Raises
    ------
    UnsupportedModel
        From :func:`confroute.models._decode.decode`, before anything is drawn.
    """
    eos_set = set(eos_ids)
    pad_id = int(tokenizer.pad_token_id)
    layers = sorted({i for cfg in configs for i in cfg.hidden_layers})
    results: list[list[list[Sample]]] = [[[] for _ in encoded] for _ in configs]
    for idx in batches:
        rows = decode(
            model, [encoded[i] for i in idx], configs, pad_id=pad_id, eos_ids=eos_ids,
            tokenizer=tokenizer, shared_prefill=shared_prefill, device=device,
            hidden_layers=layers,
        )
        for c, cfg in enumerate(configs):
            pick = [layers.index(i) for i in cfg.hidden_layers]
            for i, per_prompt in zip(idx, rows[c]):
                results[c][i] = [
                    make_sample(tokenizer, row.token_ids, row.logprobs, row.entropies, cfg,
                                eos_set, pad_id, len(encoded[i]), padded=False,
                                hidden=None if row.hidden is None or not pick
                                else row.hidden[pick],
                                hidden_layers=cfg.hidden_layers)
                    for row in per_prompt
                ]
    return results
