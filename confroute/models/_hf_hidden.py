"""Hidden states of a local causal LM at a prompt's last token (one prefill).

Used by pre-generation probes (:class:`~confroute.estimators.probes.PromptProbe`):
the prompt is run once, with no token generated, and the states of the chosen
layers at its last position are returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from confroute.models._decode import last_hidden, left_pad, takes_logits_to_keep

__all__ = ["model_signature", "prompt_hidden"]


def model_signature(model: Any) -> dict[str, Any]:
    """Architecture name, hidden size and layer count of a transformers model."""
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    return {
        "architecture": str(archs[0]),
        "hidden_size": int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)),
        "num_layers": int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0)),
    }


def prompt_hidden(
    model: Any, encoded: Sequence[Sequence[int]], layers: Sequence[int], *, pad_id: int,
    batch_size: int,
) -> np.ndarray:
    """States of ``layers`` at each prompt's last token.

    Parameters
    ----------
    encoded : sequence of token-id sequences, length n_prompts (each non-empty)
    layers : sequence of int
        Indices into the model's ``hidden_states`` (0 = embeddings).

    Returns
    -------
    ndarray of shape (n_prompts, n_layers, hidden_size), float32
    """
    import torch

    device = next(model.parameters()).device
    # Only hidden states are read: where the forward allows it, the vocabulary-wide
    # logits are computed for the last position alone (as the decoding loop's prefill
    # does), not for every prompt token.
    extra: dict[str, Any] = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    out_rows: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            ids, mask = left_pad(encoded[start:start + batch_size], pad_id)
            position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=position.to(device), use_cache=False,
                        output_hidden_states=True, **extra)
            got = last_hidden(out, layers)
            assert got is not None
            out_rows.append(got.cpu().numpy())
    return np.concatenate(out_rows, axis=0).astype(np.float32)
