"""Teacher-forced scoring for :meth:`confroute.models.hf.HFLanguageModel.score`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from confroute._validation import param_error

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["continuation_ids", "score_batch", "score_pairs", "score_shared_prompt"]


def continuation_ids(tokenizer: Any, model: Any, cont: Any, name: str, owner: str) -> list[int]:
    """Token ids of one continuation: its text tokenised without special tokens, or
    its ids checked against the vocabulary.

    Raises
    ------
    InvalidTypeError
        If ``cont`` is neither a string nor a sequence of ints.
    InvalidParameterError
        If an id lies outside the vocabulary.
    """
    if isinstance(cont, str):
        return list(tokenizer(cont, add_special_tokens=False)["input_ids"])
    if (
        isinstance(cont, (Sequence, np.ndarray))
        and not isinstance(cont, (bytes, Mapping))
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in cont)
    ):
        vocab = max(len(tokenizer), int(model.get_output_embeddings().weight.shape[0]))
        ids = [int(t) for t in cont]
        if any(t < 0 or t >= vocab for t in ids):
            raise param_error(name, owner, "token ids inside the vocabulary", cont)
        return ids
    raise param_error(name, owner, "a string or a list of token ids", cont, type_error=True)


def score_batch(
    model: Any, prompts: list[list[int]], conts: list[list[int]], *, pad_id: int,
    device: torch.device,
) -> list[np.ndarray]:
    """:math:`\\log p(c_t \\mid \\text{prompt}, c_{<t})` of each continuation token.

    Parameters
    ----------
    model : transformers causal LM
    prompts, conts : list of token-id lists, length n_pairs
    pad_id : int
    device : torch.device

    Returns
    -------
    list of length n_pairs of ndarray of shape (len(conts[i]),), float32
    """
    import torch

    seqs = [p + c for p, c in zip(prompts, conts)]
    width = max(len(s) for s in seqs)
    # Right padding keeps the default position ids of real tokens correct.
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        results: list[np.ndarray] = []
        for r, (p, c) in enumerate(zip(prompts, conts)):
            if not c:
                results.append(np.zeros(0, dtype=np.float32))
                continue
            # Logits at position t predict token t + 1.
            rows = logits[r, len(p) - 1 : len(p) - 1 + len(c)].float()
            logp = torch.log_softmax(rows, dim=-1)
            target = torch.tensor(c, dtype=torch.long, device=logp.device)
            chosen = logp.gather(-1, target[:, None]).squeeze(-1)
            results.append(chosen.cpu().numpy().astype(np.float32))
    return results


def score_shared_prompt(
    model: Any, prompt: list[int], conts: list[list[int]], *, pad_id: int,
    device: torch.device,
) -> list[np.ndarray]:
    """Like :func:`score_batch` for several continuations of **one** prompt, which is
    run once: its key/value cache is repeated for the continuations, so k options of
    a long multiple-choice prompt cost one prefill plus k short passes (one-token
    continuations, e.g. option letters, need no second pass at all).

    Parameters
    ----------
    model : transformers causal LM
    prompt : list of int
    conts : list of token-id lists, length k
    pad_id : int
    device : torch.device

    Returns
    -------
    list of length k of ndarray of shape (len(conts[i]),), float32
    """
    import torch

    from confroute.models._decode import cache_of, forward_params

    cache_arg = forward_params(model)[0]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt], dtype=torch.long, device=device),
                    use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        results = [first[c[:1]].cpu().numpy().astype(np.float32) if c else
                   np.zeros(0, dtype=np.float32) for c in conts]
        longer = [i for i, c in enumerate(conts) if len(c) > 1]
        if not longer:
            return results
        cache = cache_of(out)
        if not callable(getattr(cache, "batch_repeat_interleave", None)):  # a legacy tuple
            plain = score_batch(model, [prompt] * len(longer), [conts[i] for i in longer],
                                pad_id=pad_id, device=device)
            for i, scored in zip(longer, plain):
                results[i] = scored
            return results
        cache.batch_repeat_interleave(len(longer))
        width = max(len(conts[i]) - 1 for i in longer)
        # Token t of a continuation is predicted at its token t - 1: feed c[:-1],
        # right-padded (real positions never attend to the padding after them).
        ids = torch.full((len(longer), width), pad_id, dtype=torch.long)
        for r, i in enumerate(longer):
            ids[r, : len(conts[i]) - 1] = torch.tensor(conts[i][:-1], dtype=torch.long)
        mask = torch.ones((len(longer), len(prompt) + width), dtype=torch.long)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       use_cache=True, **{cache_arg: cache}).logits
        for r, i in enumerate(longer):
            c = conts[i]
            logp = torch.log_softmax(logits[r, : len(c) - 1].float(), dim=-1)
            target = torch.tensor(c[1:], dtype=torch.long, device=logp.device)
            tail = logp.gather(-1, target[:, None]).squeeze(-1).cpu().numpy()
            results[i] = np.concatenate([results[i], tail]).astype(np.float32)
    return results


def score_pairs(
    model: Any, prompts: list[list[int]], conts: list[list[int]], *, pad_id: int,
    device: torch.device, batch_size: int,
) -> list[np.ndarray]:
    """:func:`score_batch` over all pairs, with the pairs that share a prompt (the
    options of a multiple-choice question) scored by :func:`score_shared_prompt`.

    Returns
    -------
    list of length n_pairs of ndarray of shape (len(conts[i]),), float32
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    out: list[np.ndarray | None] = [None] * len(prompts)
    single = [g[0] for g in groups.values() if len(g) == 1]
    for start in range(0, len(single), batch_size):
        chunk = single[start:start + batch_size]
        for i, r in zip(chunk, score_batch(model, [prompts[i] for i in chunk],
                                           [conts[i] for i in chunk], pad_id=pad_id,
                                           device=device)):
            out[i] = r
    for key, idx in groups.items():
        if len(idx) > 1:
            for i, r in zip(idx, score_shared_prompt(model, list(key), [conts[i] for i in idx],
                                                     pad_id=pad_id, device=device)):
                out[i] = r
    return [r if r is not None else np.zeros(0, dtype=np.float32) for r in out]
