"""Teacher-forced scoring for :meth:`confroute.models.hf.HFLanguageModel.score`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from confroute._validation import param_error

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["continuation_ids", "score_batch"]


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
