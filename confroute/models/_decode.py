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

__all__ = [
    "DecodedRow",
    "RowPlan",
    "Uniforms",
    "UnsupportedModel",
    "cache_of",
    "check_cache",
    "decode",
    "filtered_distribution",
    "forward_params",
    "left_pad",
    "sample_inverse_cdf",
    "select_cache_rows",
    "takes_logits_to_keep",
]


class UnsupportedModel(Exception):
    """The model's cache cannot be reindexed row by row; use ``generate`` instead."""


@dataclass
class DecodedRow:
    """The generated tokens of one row and their per-token statistics.

    ``hidden`` has shape (n_layers, n_tokens, hidden_size) when hidden layers were
    requested: the state at the position that predicted each token.
    """

    token_ids: list[int]
    logprobs: np.ndarray
    entropies: np.ndarray
    hidden: np.ndarray | None = None


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


def sample_inverse_cdf(
    probs: torch.Tensor, index: torch.Tensor | None, u: torch.Tensor
) -> torch.Tensor:
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


def forward_params(model: Any) -> tuple[str, bool]:
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
    return name, takes_logits_to_keep(model)


def takes_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` can compute the logits of the last positions only."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


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


def select_cache_rows(cache: Any, rows: torch.Tensor, rows_here: torch.Tensor) -> None:
    """Keep ``rows`` of every cache layer, with the index on that layer's device.

    ``rows_here`` is ``rows`` already on the inputs' device (the usual place of every
    layer); a layer of a sharded model on another device gets its own copy.
    """
    import torch

    on_device = {rows_here.device: rows_here}
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        where = keys.device if isinstance(keys, torch.Tensor) else rows_here.device
        if where not in on_device:
            on_device[where] = rows.to(where)
        layer.batch_select_indices(on_device[where])


def check_cache(cache: Any) -> None:
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise UnsupportedModel("transformers has no DynamicCache") from None
    if not isinstance(cache, DynamicCache):
        raise UnsupportedModel(f"the model returned a {type(cache).__name__}, not a DynamicCache")
    for layer in getattr(cache, "layers", []):
        if not callable(getattr(layer, "batch_select_indices", None)):
            raise UnsupportedModel(f"cache layer {type(layer).__name__} cannot select rows")


@dataclass
class RowPlan:
    """Which prompt and configuration each row decodes: prompt-major, then
    configuration, then sample.

    Attributes
    ----------
    prompt, config : list of int, length n_rows
        Prompt and configuration index of each row.
    groups : list of (prompt, config, rows)
        The rows of each (prompt, configuration) pair, in sample order.
    """

    prompt: list[int]
    config: list[int]
    groups: list[tuple[int, int, list[int]]]

    @classmethod
    def build(cls, n_prompts: int, configs: Sequence[GenerationConfig]) -> RowPlan:
        plan = cls([], [], [])
        for p in range(n_prompts):
            for c, cfg in enumerate(configs):
                rows = list(range(len(plan.prompt), len(plan.prompt) + cfg.n))
                plan.prompt += [p] * cfg.n
                plan.config += [c] * cfg.n
                plan.groups.append((p, c, rows))
        return plan


@dataclass
class Uniforms:
    """Where each sampled row's uniforms come from: torch's global generator
    (``global_rows``) or its own seeded one (``seeded``)."""

    n_rows: int
    global_rows: list[int]
    seeded: list[tuple[int, torch.Generator]]

    @classmethod
    def build(
        cls, plan: RowPlan, prompts: Sequence[Sequence[int]], configs: Sequence[GenerationConfig]
    ) -> Uniforms:
        import torch

        out = cls(len(plan.prompt), [], [])
        for p, c, rows in plan.groups:
            seed = configs[c].seed
            if configs[c].greedy:
                continue
            for j, r in enumerate(rows):
                if seed is None:
                    out.global_rows.append(r)
                else:
                    g = torch.Generator()
                    g.manual_seed(_seed_for(seed, prompts[p], j))
                    out.seeded.append((r, g))
        return out

    def draw(self) -> torch.Tensor:
        """One uniform per sampled row (0 for greedy rows), shape (n_rows,).

        Drawn for every row at every step, finished or not, so the streams stay
        aligned when rows finish.
        """
        import torch

        uniforms = torch.zeros(self.n_rows)
        if self.global_rows:
            uniforms[self.global_rows] = torch.rand(len(self.global_rows))
        for r, g in self.seeded:
            uniforms[r] = torch.rand((), generator=g)
        return uniforms


@dataclass
class _Frontier:
    """The decoding state. One cache row ("node") per distinct history; the
    active rows point at their node.

    Attributes
    ----------
    cache : DynamicCache with one row per node
    logits : Tensor of shape (n_nodes, vocab)
        Next-token logits of each node.
    mask : Tensor of shape (n_nodes, width)
    next_pos : Tensor of shape (n_nodes,)
        Position id of each node's next token.
    active : Tensor of shape (n_active,), CPU
        Global ids of the rows still decoding.
    row_node : Tensor of shape (n_active,), CPU
        Node of each active row.
    device : torch.device
        The model's device.
    layers : tuple of int
        Hidden-state layers captured (empty: none).
    hidden : Tensor of shape (n_nodes, n_layers, hidden_size) or None
        The captured states at each node's last position (float32).
    """

    cache: Any
    logits: torch.Tensor
    mask: torch.Tensor
    next_pos: torch.Tensor
    active: torch.Tensor
    row_node: torch.Tensor
    device: torch.device
    layers: tuple[int, ...] = ()
    hidden: torch.Tensor | None = None


def last_hidden(out: Any, layers: Sequence[int], device: Any = None) -> torch.Tensor | None:
    """States of ``layers`` at the last position of a forward output, shape
    (batch, n_layers, hidden_size) float32 on ``device`` (default: the first
    layer's; a sharded model's layers sit on several); None when no layer is asked for."""
    import torch

    if not layers:
        return None
    where = device if device is not None else out.hidden_states[layers[0]].device
    return torch.stack([out.hidden_states[i][:, -1, :].to(where) for i in layers],
                       dim=1).float()


def _prefill(
    model: Any, prompts: Sequence[Sequence[int]], plan: RowPlan, pad_id: int,
    shared_prefill: bool, keeps_logits: bool, device: torch.device,
    layers: tuple[int, ...] = (),
) -> _Frontier:
    """Run the prompts (once each when shared, else once per row) and check the cache."""
    import torch
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    select = torch.tensor(plan.prompt, dtype=torch.long)
    n_rows = len(plan.prompt)
    if shared_prefill:
        first, mask = prompt_ids.to(device), prompt_mask.to(device)
        row_node = select.clone()  # the rows of a prompt share its node
    else:
        first, mask = prompt_ids[select].to(device), prompt_mask[select].to(device)
        row_node = torch.arange(n_rows)
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    extra: dict[str, Any] = {"logits_to_keep": 1} if keeps_logits else {}
    if layers:
        extra["output_hidden_states"] = True
    out = model(input_ids=first, attention_mask=mask, position_ids=position, use_cache=True,
                **extra)
    cache = cache_of(out)
    check_cache(cache)
    # A sharded model's last layer may sit elsewhere: logits are chosen on ``device``.
    return _Frontier(cache, out.logits[:, -1, :].to(device), mask, mask.sum(-1),
                     torch.arange(n_rows), row_node, device, layers,
                     last_hidden(out, layers, device))


def _choose(
    state: _Frontier, configs: Sequence[GenerationConfig], row_config: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Next token of each active row, shape (n_active,): the argmax for greedy rows,
    an inverse-CDF draw from the processed distribution for sampled rows."""
    import torch

    logits, device = state.logits, state.device
    node_of = state.row_node.to(device)
    chosen = torch.empty(len(state.active), dtype=torch.long, device=device)
    active_config = row_config[state.active]
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
            chosen[sel_dev] = sample_inverse_cdf(probs, index, uniforms[state.active[sel]])
    return chosen


@dataclass
class _Record:
    """What every row generated: tokens and their unprocessed statistics."""

    tokens: list[list[int]]
    logprobs: np.ndarray  # (n_rows, max_steps), float32
    entropies: np.ndarray  # (n_rows, max_steps), float32
    hidden: list[list[np.ndarray]] | None = None  # per row, per step: (n_layers, hidden)

    @classmethod
    def empty(cls, n_rows: int, max_steps: int, *, hidden: bool) -> _Record:
        return cls([[] for _ in range(n_rows)],
                   np.zeros((n_rows, max_steps), dtype=np.float32),
                   np.zeros((n_rows, max_steps), dtype=np.float32),
                   [[] for _ in range(n_rows)] if hidden else None)

    def add(self, state: _Frontier, chosen: torch.Tensor, step: int) -> None:
        """Store the chosen tokens of ``step`` with log p and entropy of their node."""
        import torch

        logp = torch.log_softmax(state.logits.float(), dim=-1)
        node_ent = torch.special.entr(logp.exp()).sum(-1)
        node_of = state.row_node.to(state.device)
        act = state.active.numpy()
        self.logprobs[act, step] = logp[node_of, chosen].cpu().numpy()
        self.entropies[act, step] = node_ent[node_of].cpu().numpy()
        for r, tok in zip(act.tolist(), chosen.cpu().tolist()):
            self.tokens[r].append(tok)
        if self.hidden is not None and state.hidden is not None:
            # The state that produced this step's logits predicted the chosen token.
            per_row = state.hidden[node_of].cpu().numpy()
            for i, r in enumerate(act.tolist()):
                self.hidden[r].append(per_row[i])

    def rows(self, plan: RowPlan, n_configs: int, n_prompts: int) -> list[list[list[DecodedRow]]]:
        """The decoded rows grouped by configuration, then prompt, in sample order."""
        results: list[list[list[DecodedRow]]] = [[[] for _ in range(n_prompts)]
                                                 for _ in range(n_configs)]
        for r, tokens in enumerate(self.tokens):
            results[plan.config[r]][plan.prompt[r]].append(DecodedRow(
                tokens, self.logprobs[r, :len(tokens)].copy(),
                self.entropies[r, :len(tokens)].copy(), self.hidden_of(r, len(tokens)),
            ))
        return results

    def hidden_of(self, row: int, n_tokens: int) -> np.ndarray | None:
        """Captured states of ``row``, shape (n_layers, n_tokens, hidden_size), or None."""
        if self.hidden is None:
            return None
        return np.stack(self.hidden[row][:n_tokens], axis=1)


def _finished(
    state: _Frontier, chosen: torch.Tensor, step: int, *, eos: torch.Tensor,
    limits: torch.Tensor, record: _Record, stops: Sequence[Sequence[str]], tokenizer: Any,
) -> torch.Tensor:
    """Bool of shape (n_active,): the row ended (EOS, length limit, stop string)."""
    import torch

    done = torch.isin(chosen, eos) | (step + 1 >= limits[state.active])
    for i, r in enumerate(state.active.tolist()):
        if stops[r] and not done[i]:
            text = tokenizer.decode(record.tokens[r], skip_special_tokens=True)
            if any(s in text for s in stops[r]):
                done[i] = True
    return done


def _advance(
    model: Any, state: _Frontier, keep: torch.Tensor, chosen: torch.Tensor, *,
    shared_prefill: bool, cache_arg: str,
) -> None:
    """Keep the rows ``keep`` (CPU indices into the active rows), merge rows whose
    histories are still identical into one node, and run one forward step."""
    import torch

    state.active = state.active[keep]
    parent, new_tok = state.row_node[keep], chosen[keep]
    if shared_prefill:
        # Rows with the same parent node and the same token still share one
        # history: they become one node.
        vocab = state.logits.shape[-1]
        keys, state.row_node = torch.unique(parent * vocab + new_tok, return_inverse=True)
        parent, new_tok = keys // vocab, keys % vocab
    else:
        state.row_node = torch.arange(len(state.active))
    device = state.device
    if len(parent) != state.logits.shape[0] or not torch.equal(
        parent, torch.arange(len(parent))
    ):
        parent_dev = parent.to(device)
        select_cache_rows(state.cache, parent, parent_dev)
        state.mask = state.mask[parent_dev]
        state.next_pos = state.next_pos[parent_dev]
        if state.hidden is not None:
            state.hidden = state.hidden[parent_dev]
    state.mask = torch.cat([state.mask, state.mask.new_ones((len(parent), 1))], dim=-1)
    extra: dict[str, Any] = {cache_arg: state.cache}
    if state.layers:
        extra["output_hidden_states"] = True
    out = model(input_ids=new_tok.to(device)[:, None], attention_mask=state.mask,
                position_ids=state.next_pos[:, None], use_cache=True, **extra)
    state.cache = cache_of(out)
    state.logits = out.logits[:, -1, :].to(device)
    state.hidden = last_hidden(out, state.layers, device)
    del out
    state.next_pos = state.next_pos + 1


def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    configs: Sequence[GenerationConfig],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    tokenizer: Any,
    shared_prefill: bool = True,
    device: torch.device | None = None,
    hidden_layers: Sequence[int] = (),
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
    device : torch.device or None
        Where inputs and the chosen tokens live: for a model sharded by
        ``device_map``, the first device of its map (its cache stays on each
        layer's device). None: the device of the model's first parameter.
    hidden_layers : sequence of int
        Hidden-state layers to capture for every row (``DecodedRow.hidden``), taken
        from the forward passes that decode anyway (``output_hidden_states``): the
        state at the position whose logits chose each token, i.e. what a
        teacher-forced pass over prompt + answer gives at positions
        ``len(prompt) - 1 ... len(prompt) + n_tokens - 2``. No extra pass.

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

    eos = torch.tensor(sorted(set(eos_ids)) or [-1], dtype=torch.long)
    plan = RowPlan.build(len(prompts), configs)
    n_rows = len(plan.prompt)
    max_steps = max(cfg.max_new_tokens for cfg in configs)
    limits = torch.tensor([configs[c].max_new_tokens for c in plan.config])
    uniforms = Uniforms.build(plan, prompts, configs)
    cache_arg, keeps_logits = forward_params(model)
    record = _Record.empty(n_rows, max_steps, hidden=bool(hidden_layers))
    stops = [configs[c].stop for c in plan.config]
    row_config = torch.tensor(plan.config, dtype=torch.long)
    with torch.inference_mode():
        where = device if device is not None else next(model.parameters()).device
        state = _prefill(model, prompts, plan, pad_id, shared_prefill, keeps_logits, where,
                         tuple(hidden_layers))
        for step in range(max_steps):
            chosen = _choose(state, configs, row_config, uniforms.draw())
            record.add(state, chosen, step)
            chosen_cpu = chosen.cpu()
            done = _finished(state, chosen_cpu, step, eos=eos, limits=limits, record=record,
                             stops=stops, tokenizer=tokenizer)
            keep = torch.nonzero(~done).flatten()
            if keep.numel() == 0:
                break
            _advance(model, state, keep, chosen_cpu, shared_prefill=shared_prefill,
                     cache_arg=cache_arg)

    return record.rows(plan, len(configs), len(prompts))
