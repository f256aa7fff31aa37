"""confroute's own batched decoding loop for local causal LMs.

``transformers``' ``generate`` is general, but for the workload of uncertainty
estimation -- one greedy answer and N samples of the same prompt -- it leaves
speed on the table: it cannot decode rows with different settings (greedy and
sampled) in one batch, it filters top-p by sorting the whole vocabulary at every
step, and finished rows keep being computed until the longest one ends. This loop
does the following instead:

- **One batch for several configurations.** Rows of every requested
  :class:`~confroute.types.GenerationConfig` of every prompt are decoded together;
  a greedy row takes the argmax, a sampled row its own temperature/top-k/top-p.
- **Shared histories.** Each prompt is encoded once, and rows whose histories are
  identical (same prompt and same tokens so far: a greedy row and the samples
  that drew the argmax, samples of a confident model) share one cache row and one
  forward computation until they diverge; the cache is copied only where they do.
- **Finished rows leave the batch** (end of sequence, length limit, stop string),
  so the step cost follows the rows still decoding.
- **Cheap filtering.** Top-k is a ``topk`` of k entries and top-p is applied on
  those k sorted entries (the whole vocabulary is sorted only when ``top_k=0`` and
  ``top_p<1``).

Sampling is by inversion: each step draws one uniform number per row and takes the
first token whose cumulative probability exceeds it. With a seed, the uniforms of
sample *j* of a prompt come from their own generator, seeded from the seed, the
prompt's token ids and *j*: a prompt's samples do not depend on which other
prompts or configurations share the batch, on the batch size or on when other rows
finish, and the first five of ten samples are the five samples of ``n=5`` (up to
floating-point summation order in batched matrix products). Two configurations
with the same seed therefore draw the same uniforms: each is sampled from its own
distribution, but their samples are correlated (common random numbers); give them
different seeds when that matters. Without a seed the uniforms come from torch's
global generator.

The processed distribution is the one ``transformers`` samples from: logits
divided by the temperature, then the top-k filter, then the top-p filter (keep the
most probable tokens until their mass reaches ``top_p``; at least one), then
softmax. Statistics (chosen-token log-probability, entropy) are taken from the
unprocessed logits, as in :meth:`HFLanguageModel.generate`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from confroute.types import GenerationConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DecodedRow", "UnsupportedModel", "decode", "filtered_distribution", "left_pad"]


class UnsupportedModel(Exception):
    """The model's cache cannot be reindexed row by row; use ``generate`` instead."""


@dataclass
class DecodedRow:
    """The generated tokens of one row and their per-token statistics."""

    token_ids: list[int]
    logprobs: np.ndarray
    entropies: np.ndarray


def filtered_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampling probabilities after temperature, top-k and top-p, sorted by logit.

    Parameters
    ----------
    logits : Tensor of shape (n_rows, vocab)
        Unprocessed next-token logits.

    Returns
    -------
    probs : Tensor of shape (n_rows, k)
        Unnormalised probabilities of the k candidate tokens in descending order of
        logit (filtered-out tokens have probability 0).
    index : Tensor of shape (n_rows, k) or None
        Vocabulary ids of the candidates; None when no filter applies, in which
        case ``probs`` covers the vocabulary in its own order.
    """
    import torch

    vocab = logits.shape[-1]
    scaled = logits.float() / temperature
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and top_p >= 1.0:
        return torch.softmax(scaled, dim=-1), None
    if k < vocab:
        values, index = torch.topk(scaled, k, dim=-1, sorted=True)
    else:
        values, index = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    if top_p < 1.0:
        # Mass of the strictly more probable candidates; a token is kept while it
        # is below top_p, so the kept set is the smallest prefix reaching top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        keep = before < top_p
        keep[:, 0] = True
        probs = probs.masked_fill(~keep, 0.0)
    return probs, index


def _sample(probs: torch.Tensor, index: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row, with uniforms ``u`` of shape (n_rows,)."""
    import torch

    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    pos = torch.searchsorted(cdf, u.to(cdf.device)[:, None] * total, right=True)
    # u * total can round up to total; never step onto a zero-probability tail.
    last = (probs > 0).long().cumsum(-1).argmax(-1, keepdim=True)
    pos = torch.minimum(pos, last)
    if index is None:
        return pos.squeeze(-1)
    return index.gather(-1, pos).squeeze(-1)


def _seed_for(seed: int, prompt_ids: Sequence[int], sample: int) -> int:
    h = hashlib.sha256()
    h.update(f"{seed}:{sample}:".encode())
    h.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def _forward_params(model: Any) -> tuple[str, bool]:
    """Name of the cache argument of ``model.forward`` ('cache' in transformers 5), and
    whether it takes ``logits_to_keep``.

    Raises
    ------
    UnsupportedModel
        If the forward takes no cache or no position ids (the loop needs both).
    """
    params = inspect.signature(type(model).forward).parameters
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "cache" in params:
        name = "cache"
    elif "past_key_values" in params or has_kwargs:
        name = "past_key_values"
    else:
        raise UnsupportedModel(f"{type(model).__name__}.forward takes no cache argument")
    if "position_ids" not in params and not has_kwargs:
        raise UnsupportedModel(f"{type(model).__name__}.forward takes no position_ids")
    return name, "logits_to_keep" in params


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``batch``, left-padded to its longest row (CPU)."""
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, ids in enumerate(batch):
        input_ids[r, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[r, width - len(ids):] = 1
    return input_ids, mask


def cache_of(out: Any) -> Any:
    """The key/value cache of a forward output ('cache' in transformers 5)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def _check_cache(cache: Any) -> None:
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise UnsupportedModel("transformers has no DynamicCache") from None
    if not isinstance(cache, DynamicCache):
        raise UnsupportedModel(f"the model returned a {type(cache).__name__}, not a DynamicCache")
    for layer in getattr(cache, "layers", []):
        if not callable(getattr(layer, "batch_select_indices", None)):
            raise UnsupportedModel(f"cache layer {type(layer).__name__} cannot select rows")


def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    configs: Sequence[GenerationConfig],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    tokenizer: Any,
    shared_prefill: bool = True,
) -> list[list[list[DecodedRow]]]:
    """Decode ``config.n`` rows for every prompt and configuration in one batch.

    Parameters
    ----------
    model : transformers causal LM
    prompts : sequence of token-id sequences, length n_prompts
        Every prompt non-empty.
    configs : sequence of GenerationConfig, length n_configs
    pad_id, eos_ids : padding token and end-of-sequence tokens
    tokenizer : decodes rows for stop strings
    shared_prefill : bool
        Compute each distinct history once: the prompt for all its rows, then
        every common generated prefix (True); or every row on its own from the
        prompt on (False; the plain path, kept for comparison).

    Returns
    -------
    list (n_configs) of list (n_prompts) of list (config.n) of DecodedRow
        Tokens end at (and include) the end-of-sequence token, at the length
        limit, or at the token that completed a stop string (the caller cuts
        the text).

    Raises
    ------
    UnsupportedModel
        If the model's forward takes no cache or position ids, or its cache is not
        a row-selectable ``DynamicCache``; raised before any random number is drawn.
    """
    import torch

    device = next(model.parameters()).device
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], dtype=torch.long)
    # Row plan: prompt-major, then configuration, then sample.
    row_prompt: list[int] = []
    row_config: list[int] = []
    groups: list[tuple[int, int, list[int]]] = []  # (prompt, config, rows)
    for p in range(len(prompts)):
        for c, cfg in enumerate(configs):
            rows = list(range(len(row_prompt), len(row_prompt) + cfg.n))
            row_prompt += [p] * cfg.n
            row_config += [c] * cfg.n
            groups.append((p, c, rows))
    n_rows = len(row_prompt)
    max_steps = max(cfg.max_new_tokens for cfg in configs)
    limits = torch.tensor([configs[c].max_new_tokens for c in row_config])
    # Per sampled row: its own seeded generator, or None for the global one.
    generators: dict[int, torch.Generator | None] = {}
    for p, c, rows in groups:
        seed = configs[c].seed
        if configs[c].greedy:
            continue
        for j, r in enumerate(rows):
            if seed is None:
                generators[r] = None
            else:
                g = torch.Generator()
                g.manual_seed(_seed_for(seed, prompts[p], j))
                generators[r] = g
    global_rows = [r for r, g in generators.items() if g is None]
    seeded_rows = [(r, g) for r, g in generators.items() if g is not None]

    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    select = torch.tensor(row_prompt, dtype=torch.long)
    cache_arg, keeps_logits = _forward_params(model)
    prefill_extra: dict[str, Any] = {"logits_to_keep": 1} if keeps_logits else {}

    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs = np.zeros((n_rows, max_steps), dtype=np.float32)
    entropies = np.zeros((n_rows, max_steps), dtype=np.float32)
    stop_rows = {r for r in range(n_rows) if configs[row_config[r]].stop}

    with torch.inference_mode():
        if shared_prefill:
            first, mask = prompt_ids.to(device), prompt_mask.to(device)
            row_node = select.clone()  # the rows of a prompt share its node
        else:
            first, mask = prompt_ids[select].to(device), prompt_mask[select].to(device)
            row_node = torch.arange(n_rows)
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = model(input_ids=first, attention_mask=mask, position_ids=position, use_cache=True,
                    **prefill_extra)
        cache = cache_of(out)
        _check_cache(cache)
        # One cache row ("node") per distinct history; rows point at their node.
        logits = out.logits[:, -1, :]
        del out
        next_pos = mask.sum(-1)
        active = torch.arange(n_rows)  # global row ids, on CPU
        row_config_t = torch.tensor(row_config, dtype=torch.long)
        for step in range(max_steps):
            logp = torch.log_softmax(logits.float(), dim=-1)
            node_ent = torch.special.entr(logp.exp()).sum(-1)
            node_of = row_node.to(device)
            chosen = torch.empty(len(active), dtype=torch.long, device=device)
            active_config = row_config_t[active]
            # One uniform per sampled row, drawn for every row at every step, so
            # the streams stay aligned when rows finish.
            uniforms = torch.zeros(n_rows)
            if global_rows:
                uniforms[global_rows] = torch.rand(len(global_rows))
            for r, g in seeded_rows:
                uniforms[r] = torch.rand((), generator=g)
            for c, cfg in enumerate(configs):
                sel = torch.nonzero(active_config == c).flatten()
                if sel.numel() == 0:
                    continue
                sel_dev = sel.to(device)
                row_logits = logits[node_of[sel_dev]]
                if cfg.greedy:
                    chosen[sel_dev] = row_logits.argmax(-1)
                else:
                    probs, index = filtered_distribution(
                        row_logits, cfg.temperature, cfg.top_k, cfg.top_p
                    )
                    chosen[sel_dev] = _sample(probs, index, uniforms[active[sel]])
            lp = logp[node_of, chosen]
            act_np = active.numpy()
            logprobs[act_np, step] = lp.cpu().numpy()
            entropies[act_np, step] = node_ent[node_of].cpu().numpy()
            chosen_cpu = chosen.cpu()
            for r, tok in zip(act_np.tolist(), chosen_cpu.tolist()):
                tokens[r].append(tok)
            done = torch.isin(chosen_cpu, eos) | (step + 1 >= limits[active])
            for i, r in enumerate(act_np.tolist()):
                if r in stop_rows and not done[i]:
                    text = tokenizer.decode(tokens[r], skip_special_tokens=True)
                    if any(s in text for s in configs[row_config[r]].stop):
                        done[i] = True
            keep = torch.nonzero(~done).flatten()
            if keep.numel() == 0:
                break
            active = active[keep]
            parent, new_tok = row_node[keep], chosen_cpu[keep]
            if shared_prefill:
                # Rows with the same parent node and the same token still share one
                # history: they become one node.
                vocab = logits.shape[-1]
                keys, row_node = torch.unique(parent * vocab + new_tok, return_inverse=True)
                parent, new_tok = keys // vocab, keys % vocab
            else:
                row_node = torch.arange(len(active))
            if len(parent) != logits.shape[0] or not torch.equal(
                parent, torch.arange(len(parent))
            ):
                parent_dev = parent.to(device)
                cache.batch_select_indices(parent_dev)
                mask = mask[parent_dev]
                next_pos = next_pos[parent_dev]
            mask = torch.cat([mask, mask.new_ones((len(parent), 1))], dim=-1)
            out = model(input_ids=new_tok.to(device)[:, None], attention_mask=mask,
                        position_ids=next_pos[:, None], use_cache=True,
                        **{cache_arg: cache})
            cache = cache_of(out)
            logits = out.logits[:, -1, :]
            del out
            next_pos = next_pos + 1

    results: list[list[list[DecodedRow]]] = [[[] for _ in prompts] for _ in configs]
    for r in range(n_rows):
        length = len(tokens[r])
        results[row_config[r]][row_prompt[r]].append(
            DecodedRow(tokens[r], logprobs[r, :length].copy(), entropies[r, :length].copy())
        )
    return results
