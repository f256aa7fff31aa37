"""The ``model.generate`` back-end of :class:`~confroute.models.hf.HFLanguageModel`.

All ``n`` samples of a prompt come from one ``generate`` call
(``num_return_sequences``), with the checkpoint's own generation defaults
neutralised so that the :class:`~confroute.types.GenerationConfig` fields are the
whole contract. For every generated token the chosen token's log-probability and
the entropy of the *unprocessed* next-token distribution are computed from the
raw logits (``output_logits``). Greedy calls with an early-stop rule always come
here (a logits processor and a stopping criterion carry the rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from confroute.models._decode import cache_of, left_pad
from confroute.models._hf_samples import make_sample
from confroute.types import GenerationConfig, Sample

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "MAX_STAT_ELEMENTS",
    "EarlyStopRule",
    "early_stop_hook",
    "generate_all",
    "generate_batch",
    "prefill_cache",
    "token_stats",
]

# Upper bound on float32 elements materialised at once when turning logits into
# per-token statistics (64 Mi floats = 256 MiB), so memory stays bounded for long
# generations with large vocabularies.
MAX_STAT_ELEMENTS = 1 << 26

EarlyStopRule = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
"""``rule(n_tokens, sum_nll, sum_entropy) -> stop``, called after every greedy step.

``n_tokens`` is the number of tokens generated so far (the same for every row);
``sum_nll`` and ``sum_entropy`` of shape (n_rows,) are the running sums of
:math:`-\\log p_t` and :math:`H_t` (float64, from the unprocessed logits, as in the
returned samples). Rows where the returned bool array is True stop generating and
their sample ends with ``finish_reason="early_stop"``. Rows are in batch order
(prompts may be regrouped by length), so a rule should act row by row on the values.
"""


def generate_all(
    model: Any,
    tokenizer: Any,
    encoded: list[list[int]],
    batches: Iterable[list[int]],
    config: GenerationConfig,
    *,
    device: torch.device,
    eos_ids: list[int],
    shared_prefill: bool,
    early_stop: EarlyStopRule | None,
) -> list[list[Sample]]:
    """:func:`generate_batch` over ``batches`` of indices into ``encoded``.

    With ``config.seed`` the global torch RNG is seeded inside a forked state, so
    the call is reproducible and leaves the caller's RNG untouched.

    Returns
    -------
    list of length len(encoded) of list of length config.n of Sample
    """
    import torch

    fork_devices: list[int] = []
    if device.type == "cuda":
        fork_devices = [torch.cuda.current_device() if device.index is None else device.index]
    results: list[list[Sample]] = [[] for _ in encoded]
    with torch.random.fork_rng(devices=fork_devices, enabled=config.seed is not None):
        if config.seed is not None:
            torch.manual_seed(config.seed)
        for idx in batches:
            got = generate_batch(model, tokenizer, [encoded[i] for i in idx], config,
                                 device=device, eos_ids=eos_ids, shared_prefill=shared_prefill,
                                 early_stop=early_stop)
            for i, samples in zip(idx, got):
                results[i] = samples
    return results


def _generate_kwargs(
    tokenizer: Any, config: GenerationConfig, eos_ids: list[int]
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "num_return_sequences": config.n,
        "return_dict_in_generate": True,
        "output_logits": True,
        "pad_token_id": int(tokenizer.pad_token_id),
        "eos_token_id": eos_ids or None,
        # Neutralise checkpoint defaults that would change the distribution we
        # claim to sample from (the GenerationConfig fields are the contract).
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_length": 0,
    }
    if config.greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(
            do_sample=True, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, typical_p=1.0,
        )
    if config.stop:
        kwargs["stop_strings"] = list(config.stop)
        kwargs["tokenizer"] = tokenizer
    if config.hidden_layers:
        kwargs["output_hidden_states"] = True
    return kwargs


def step_hidden(out: Any, layers: Sequence[int]) -> np.ndarray | None:
    """Hidden states of ``layers`` at the position that chose each generated token,
    shape (n_rows, n_layers, n_steps, hidden_size) float32; None without layers."""
    import torch

    if not layers:
        return None
    per_step = [torch.stack([step[i][:, -1, :] for i in layers], dim=1)
                for step in out.hidden_states]
    return torch.stack(per_step, dim=2).float().cpu().numpy()


def generate_batch(
    model: Any,
    tokenizer: Any,
    batch: list[list[int]],
    config: GenerationConfig,
    *,
    device: torch.device,
    eos_ids: list[int],
    shared_prefill: bool,
    early_stop: EarlyStopRule | None = None,
) -> list[list[Sample]]:
    """One ``model.generate`` call for a batch of encoded prompts.

    Parameters
    ----------
    model, tokenizer : transformers causal LM and its tokenizer (left padding)
    device : torch.device
        Where the model's inputs go.
    batch : list of token-id lists, length n_batch
    config : GenerationConfig
    eos_ids : list of int
    shared_prefill : bool
        Run the prompt (all but its last token) once and copy its cache to the
        ``n`` rows.
    early_stop : EarlyStopRule or None
        Greedy only (checked by the caller).

    Returns
    -------
    list of length n_batch of list of length config.n of Sample
    """
    import torch

    pad_id = int(tokenizer.pad_token_id)
    input_ids, mask = (t.to(device) for t in left_pad(batch, pad_id))
    prompt_len = input_ids.shape[1]
    kwargs = _generate_kwargs(tokenizer, config, eos_ids)
    hook = None
    if early_stop is not None:
        hook = early_stop_hook(early_stop, eos_ids)
        kwargs["logits_processor"] = [hook[0]]
        kwargs["stopping_criteria"] = [hook[1]]
    with torch.inference_mode():
        if config.n > 1 and prompt_len > 1 and shared_prefill:
            # generate() expands the inputs to the n rows but not a given cache.
            cache = prefill_cache(model, input_ids[:, :-1], mask[:, :-1])
            cache.batch_repeat_interleave(config.n)
            kwargs["cache"] = cache
        out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    generated = out.sequences[:, prompt_len:]
    logprobs, entropies = token_stats(out.logits, generated)
    hidden = step_hidden(out, config.hidden_layers)
    del out
    gen_np = generated.cpu().numpy()
    eos_set = set(eos_ids)
    stopped = hook[1].stopped_at if hook is not None else {}
    samples: list[list[Sample]] = []
    for r in range(gen_np.shape[0]):
        if r % config.n == 0:
            samples.append([])
        samples[-1].append(make_sample(
            tokenizer, gen_np[r].tolist(), logprobs[r], entropies[r], config, eos_set, pad_id,
            len(batch[r // config.n]), stopped.get(r),
            hidden=None if hidden is None else hidden[r], hidden_layers=config.hidden_layers,
        ))
    return samples


def prefill_cache(model: Any, prefix: torch.Tensor, mask: torch.Tensor) -> Any:
    """Key/value cache of the left-padded ``prefix`` (positions as ``generate`` sets them)."""
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=prefix, attention_mask=mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    return cache_of(out)


def early_stop_hook(rule: EarlyStopRule, eos_ids: Sequence[int]) -> tuple[Any, Any]:
    """A logits processor that keeps the step's raw log-softmax, and a stopping
    criterion that adds the chosen token's statistics and asks ``rule``.

    The processor is the only one in greedy decoding with the neutral settings of
    :func:`generate_batch`, so it sees the unprocessed logits.
    """
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    eos = torch.tensor(sorted(set(eos_ids)) or [-1], dtype=torch.long)

    class _Keep(LogitsProcessor):
        def __init__(self) -> None:
            self.logp: torch.Tensor | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.logp = torch.log_softmax(scores.float(), dim=-1)
            return scores

    class _Stop(StoppingCriteria):
        def __init__(self, keep: _Keep) -> None:
            self.keep = keep
            self.stopped_at: dict[int, int] = {}
            self.sum_nll: np.ndarray | None = None
            self.sum_ent: np.ndarray | None = None
            self.done: torch.Tensor | None = None
            self.n_tokens = 0

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            logp = self.keep.logp
            assert logp is not None
            tok = input_ids[:, -1]
            nll = -logp.gather(-1, tok[:, None].to(logp.device)).squeeze(-1)
            ent = torch.special.entr(logp.exp()).sum(dim=-1)
            n_rows = input_ids.shape[0]
            if self.sum_nll is None or self.sum_ent is None or self.done is None:
                self.sum_nll = np.zeros(n_rows, dtype=np.float64)
                self.sum_ent = np.zeros(n_rows, dtype=np.float64)
                self.done = torch.zeros(n_rows, dtype=torch.bool)
            self.n_tokens += 1
            # float32 per token, summed in float64: the samples' own arithmetic.
            self.sum_nll += nll.cpu().numpy().astype(np.float32).astype(np.float64)
            self.sum_ent += ent.cpu().numpy().astype(np.float32).astype(np.float64)
            ended = torch.isin(tok.cpu(), eos)
            stop = torch.as_tensor(
                np.asarray(rule(self.n_tokens, self.sum_nll.copy(), self.sum_ent.copy()),
                           dtype=bool).reshape(n_rows)
            )
            new = stop & ~ended & ~self.done
            for r in torch.nonzero(new).flatten().tolist():
                self.stopped_at[int(r)] = self.n_tokens
            self.done |= ended | stop
            # generate() keeps a row finished once it is, so ``stop`` alone suffices.
            return stop.to(input_ids.device)

    keep = _Keep()
    return keep, _Stop(keep)


def token_stats(
    step_logits: Sequence[torch.Tensor], tokens: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Chosen-token log-probabilities and entropies from raw per-step logits.

    Parameters
    ----------
    step_logits : sequence of length n_steps of Tensor of shape (n_rows, vocab)
        Unprocessed logits of each generation step.
    tokens : Tensor of shape (n_rows, n_steps)
        The token chosen at each step.

    Returns
    -------
    logprobs, entropies : ndarray of shape (n_rows, n_steps), float32
    """
    import torch

    n_steps = len(step_logits)
    if n_steps == 0:
        empty = np.zeros((tokens.shape[0], 0), dtype=np.float32)
        return empty, empty.copy()
    n_rows, vocab = step_logits[0].shape
    chunk = max(1, MAX_STAT_ELEMENTS // max(1, n_rows * vocab))
    logprobs = np.empty((n_rows, n_steps), dtype=np.float32)
    entropies = np.empty((n_rows, n_steps), dtype=np.float32)
    for s0 in range(0, n_steps, chunk):
        s1 = min(s0 + chunk, n_steps)
        block = torch.stack([step_logits[s].float() for s in range(s0, s1)], dim=1)
        logp = torch.log_softmax(block, dim=-1)
        del block
        chosen = logp.gather(-1, tokens[:, s0:s1, None].to(logp.device)).squeeze(-1)
        # entr(p) = -p log p, with entr(0) = 0 so masked (-inf) logits add nothing.
        ent = torch.special.entr(logp.exp_()).sum(dim=-1)
        logprobs[:, s0:s1] = chosen.cpu().numpy()
        entropies[:, s0:s1] = ent.cpu().numpy()
    return logprobs, entropies
