"""A local Hugging Face transformers causal language model as a confroute LanguageModel.

Generation is batched over prompts, and all ``n`` samples of a prompt come from a
single ``generate`` call (``num_return_sequences``). For every generated token the
model reports the log-probability of the chosen token and the entropy of the
*unprocessed* next-token distribution (raw logits, before temperature, top-p or
top-k), which is what logprob- and entropy-based uncertainty estimators need.

This module imports torch and transformers; import it only when a local model is
used (``confroute.HFLanguageModel`` does so lazily).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from confroute._validation import (
    check_bool,
    check_choice,
    check_int,
    check_path_within,
    check_prompts,
    check_same_length,
    param_error,
)
from confroute.errors import ModelLoadError
from confroute.models.device import resolve_device
from confroute.types import GenerationConfig, Prompt, Sample

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["EarlyStopRule", "HFLanguageModel", "resolve_device", "resolve_dtype"]

_OWNER = "HFLanguageModel"
# Upper bound on float32 elements materialised at once when turning logits into
# per-token statistics (64 Mi floats = 256 MiB), so memory stays bounded for long
# generations with large vocabularies.
_MAX_STAT_ELEMENTS = 1 << 26

EarlyStopRule = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
"""``rule(n_tokens, sum_nll, sum_entropy) -> stop``, called after every greedy step.

``n_tokens`` is the number of tokens generated so far (the same for every row);
``sum_nll`` and ``sum_entropy`` of shape (n_rows,) are the running sums of
:math:`-\\log p_t` and :math:`H_t` (float64, from the unprocessed logits, as in the
returned samples). Rows where the returned bool array is True stop generating and
their sample ends with ``finish_reason="early_stop"``. Rows are in batch order
(prompts may be regrouped by length), so a rule should act row by row on the values.
"""


def resolve_dtype(dtype: Any, owner: str = _OWNER) -> torch.dtype | None:
    """Turn None, a name such as ``"bfloat16"`` or a floating ``torch.dtype`` into a dtype."""
    import torch

    if dtype is None:
        return None
    expected = "None, a floating torch.dtype or its name ('float32', 'float16', 'bfloat16')"
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise param_error("dtype", owner, expected, dtype)
        return value
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise param_error("dtype", owner, expected, dtype, type_error=True)


class HFLanguageModel:
    """A local transformers causal LM that generates and scores text.

    Implements :class:`~confroute.models.base.LanguageModel` and
    :class:`~confroute.models.base.ScoringLanguageModel`.

    Parameters
    ----------
    model : transformers.PreTrainedModel or str or Path
        A causal-LM object, or a local directory (or locally cached hub id) to load
        it from. Nothing is downloaded (``local_files_only=True``).
    tokenizer : transformers tokenizer or str or Path or None
        The tokenizer, or where to load it from. None: the same location as
        ``model`` (required when ``model`` is an object not saved to disk).
    device : str or torch.device, default="auto"
        ``"auto"`` picks CUDA when available, else CPU (see
        :func:`~confroute.models.device.resolve_device`; MPS only when asked for by
        name); or ``"cpu"``, ``"cuda:0"``, ``"mps"``...
    dtype : str or torch.dtype or None
        Weight dtype. None: float32 on CPU, the checkpoint's dtype on CUDA.
    system_prompt : str or None
        System message added to string prompts and to conversations that have no
        system message of their own.
    use_chat_template : bool or None
        None: use the tokenizer's chat template when it has one. Without a template,
        string prompts are fed raw and conversations as ``role: content`` lines.
    batch_size : int, default=16
        Prompts per forward/generate call (a call holds ``batch_size * n`` rows).
    name : str or None
        Display and cache name. Default: the load path, or ``config._name_or_path``.
    gguf_file : str or None
        File name of a GGUF checkpoint inside ``model`` to load (dequantised).
    shared_prefill : {"auto", True, False}, default="auto"
        Compute what rows share once. With the own decoding loop: each prompt is
        encoded once for all its rows, and rows whose generated tokens are so far
        identical share one cache row until they diverge. With ``generate``: the
        prompt (all but its last token) is run once and its key/value cache copied
        to the ``n`` rows. ``"auto"`` and True: on; False: every row computed on
        its own. Samples are the same either way (same random draws; logits equal
        up to floating-point summation order).
    bucket_by_length : bool, default=True
        Sort prompts by token length before splitting them into batches (results
        keep the input order), so a batch holds prompts of similar length and
        little padding.
    decoding : {"auto", "confroute", "transformers"}, default="auto"
        Which loop decodes. ``"confroute"``: confroute's own loop
        (:mod:`confroute.models._decode`): greedy and sampled rows of several
        configurations in one batch (see :meth:`generate_multi`), finished rows
        leave the batch, top-p filtered over the top-k candidates only, and with a
        seed a prompt's samples do not depend on the rest of the batch.
        ``"transformers"``: ``model.generate`` for everything. ``"auto"``: the
        own loop whenever the model supports it (a forward taking a cache and
        position ids, a ``DynamicCache``), else ``model.generate``. Greedy calls
        with ``early_stop`` always use ``model.generate``.

    Attributes
    ----------
    model : transformers.PreTrainedModel
    tokenizer : transformers tokenizer
        Its pad token falls back to EOS and its padding side is set to left.
    device : torch.device
    name : str

    Notes
    -----
    For a generated token :math:`y_t` with raw next-token logits :math:`z_t`,

    .. math::

        \\log p_t = \\log \\operatorname{softmax}(z_t)_{y_t}, \\qquad
        H_t = -\\sum_v \\operatorname{softmax}(z_t)_v \\log \\operatorname{softmax}(z_t)_v,

    computed in float32 (entropy in nats, :math:`0 \\le H_t \\le \\log |V|`).
    Token arrays cover the generated tokens **up to and including** the
    end-of-sequence token when one was produced (its probability is part of the
    sequence likelihood); padding after it is excluded. When a stop string cuts the
    text, the arrays keep exactly the tokens that contribute characters to the
    kept text (the token in which the stop string starts is kept only if it also
    carries text before it).

    References
    ----------
    Malinin & Gales, "Uncertainty Estimation in Autoregressive Structured
    Prediction", ICLR 2021 (token-level entropy and log-likelihood).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: Any = "auto",
        dtype: Any = None,
        system_prompt: str | None = None,
        use_chat_template: bool | None = None,
        batch_size: int = 16,
        name: str | None = None,
        gguf_file: str | None = None,
        shared_prefill: bool | str = "auto",
        bucket_by_length: bool = True,
        decoding: str = "auto",
    ) -> None:
        self.shared_prefill = shared_prefill
        self.decoding = decoding
        self._own_unsupported: str | None = None
        self.bucket_by_length = bucket_by_length
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self.batch_size = batch_size
        self.gguf_file = gguf_file
        # MPS is not chosen by "auto": token statistics are validated on CUDA and CPU only.
        self.device = resolve_device(device, _OWNER, mps=False)
        self._dtype = resolve_dtype(dtype)
        self.model, source = self._load_model(model)
        self.tokenizer = self._load_tokenizer(tokenizer, source)
        if name is not None and not isinstance(name, str):
            raise param_error("name", _OWNER, "a string or None", name, type_error=True)
        self.name: str = name or self._default_name(source)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ModelLoadError(
                    "The tokenizer has neither a pad token nor an EOS token; set "
                    "tokenizer.pad_token before building the HFLanguageModel."
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

    # ------------------------------------------------------------------ loading
    def _load_model(self, model: Any) -> tuple[Any, str | None]:
        import torch

        if isinstance(model, (str, Path)):
            source = str(model)
            if self.gguf_file is not None:
                # resolved (links, "..") and refused when it leaves the model folder
                check_path_within(self.gguf_file, source, "gguf_file", _OWNER)
            from transformers import AutoModelForCausalLM

            if self._dtype is not None:
                dtype: Any = self._dtype
            else:
                dtype = torch.float32 if self.device.type == "cpu" else "auto"
            kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
            if self.gguf_file is not None:
                kwargs["gguf_file"] = self.gguf_file
            try:
                loaded: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(
                    f"Could not load a causal LM from {source!r} (local files only): {exc}"
                ) from exc
        elif isinstance(model, torch.nn.Module) and hasattr(model, "generate"):
            source = None
            loaded = model
            if self._dtype is not None:
                loaded = loaded.to(self._dtype)
            elif self.device.type == "cpu" and next(loaded.parameters()).dtype in (
                torch.float16, torch.bfloat16
            ):
                # Half precision on CPU is slow and inaccurate for log-probabilities.
                loaded = loaded.to(torch.float32)
        else:
            raise param_error(
                "model", _OWNER, "a transformers causal LM or a local path", model,
                type_error=True,
            )
        loaded = loaded.to(self.device)
        loaded.eval()
        return loaded, source

    def _load_tokenizer(self, tokenizer: Any, source: str | None) -> Any:
        if tokenizer is None:
            if source is None:
                cfg_path = getattr(getattr(self.model, "config", None), "_name_or_path", "")
                if cfg_path and Path(cfg_path).is_dir():
                    source = cfg_path
                else:
                    raise param_error(
                        "tokenizer", _OWNER,
                        "given when 'model' is an object not loaded from a local directory",
                        tokenizer,
                    )
            tokenizer = source
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            kwargs: dict[str, Any] = {"local_files_only": True}
            if self.gguf_file is not None and check_path_within(
                self.gguf_file, tokenizer, "gguf_file", _OWNER
            ).exists():
                kwargs["gguf_file"] = self.gguf_file
            try:
                return AutoTokenizer.from_pretrained(str(tokenizer), **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(
                    f"Could not load a tokenizer from {str(tokenizer)!r} (local files only): {exc}"
                ) from exc
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise param_error("tokenizer", _OWNER, "a transformers tokenizer, a path or None",
                              tokenizer, type_error=True)
        return tokenizer

    def _default_name(self, source: str | None) -> str:
        if source is not None:
            return source
        cfg_name = getattr(getattr(self.model, "config", None), "_name_or_path", "")
        return str(cfg_name) if cfg_name else type(self.model).__name__

    def __repr__(self) -> str:
        return f"HFLanguageModel(name={self.name!r}, device='{self.device}')"

    # ------------------------------------------------------------ prompt format
    def _check_runtime_params(self) -> None:
        check_int(self.batch_size, "batch_size", _OWNER, min_value=1)
        if not (self.shared_prefill == "auto" or isinstance(self.shared_prefill, bool)):
            raise param_error("shared_prefill", _OWNER, "'auto', True or False",
                              self.shared_prefill, type_error=not isinstance(
                                  self.shared_prefill, str))
        check_bool(self.bucket_by_length, "bucket_by_length", _OWNER)
        check_choice(self.decoding, "decoding", _OWNER, ("auto", "confroute", "transformers"))
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise param_error("system_prompt", _OWNER, "a string or None", self.system_prompt,
                              type_error=True)
        if self.use_chat_template is not None:
            check_bool(self.use_chat_template, "use_chat_template", _OWNER)
            if self.use_chat_template and not self._has_template():
                raise param_error(
                    "use_chat_template", _OWNER,
                    "False or None when the tokenizer has no chat template", True,
                )

    def _has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def templated(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        if self.use_chat_template is None:
            return self._has_template()
        return bool(self.use_chat_template)

    def _messages(self, prompt: Prompt) -> list[dict[str, str]]:
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
        else:
            msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if self.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def render_prompt(self, prompt: Prompt) -> str:
        """The exact text fed to the model for ``prompt``.

        With a chat template: the conversation (a string prompt becomes one user
        message, plus ``system_prompt``) templated with ``add_generation_prompt=True``.
        Without: the string itself (after ``system_prompt`` and a blank line), or a
        conversation as ``role: content`` lines ending with ``assistant:``.
        """
        if self.templated:
            text = self.tokenizer.apply_chat_template(
                self._messages(prompt), tokenize=False, add_generation_prompt=True
            )
            return str(text)
        if isinstance(prompt, str):
            return f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt
        lines = [f"{m['role']}: {m['content']}" for m in self._messages(prompt)]
        return "\n".join([*lines, "assistant:"])

    def _encode_prompts(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        texts = [self.render_prompt(p) for p in prompts]
        # A chat template already writes its own special tokens (BOS, role markers).
        enc = self.tokenizer(texts, add_special_tokens=not self.templated)
        return [list(ids) for ids in enc["input_ids"]]

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(i) for i in gen_eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    # --------------------------------------------------------------- generation
    def generate(
        self,
        prompts: Sequence[Prompt],
        config: GenerationConfig,
        *,
        early_stop: EarlyStopRule | None = None,
    ) -> list[list[Sample]]:
        """Generate ``config.n`` samples for every prompt.

        Parameters
        ----------
        prompts : sequence of Prompt of length n_prompts
            Strings or chat conversations.
        config : GenerationConfig
            Greedy when ``temperature == 0``; otherwise sampling with
            ``temperature``/``top_p``/``top_k``. ``seed`` makes the call reproducible
            without touching the global torch RNG state: with the own decoding loop
            a prompt's samples depend only on the prompt and the configuration;
            with ``model.generate`` also on the other prompts of its batch.
        early_stop : EarlyStopRule, optional
            Greedy decoding only, without stop strings: after each step,
            ``early_stop(n_tokens, sum_nll, sum_entropy)`` may stop rows whose running
            token statistics already settle a decision (see :mod:`confroute.early`).

        Returns
        -------
        list of length n_prompts of list of length config.n of Sample
            Each sample has ``token_ids``, ``token_logprobs`` and ``token_entropies``
            of equal length (see the class notes for where they end),
            ``finish_reason`` ("stop" for EOS or a stop string, "early_stop" when
            ``early_stop`` ended it, else "length") and ``prompt_tokens``.
        """
        owner = f"{_OWNER}.generate"
        checked = check_prompts(prompts, owner)
        if not isinstance(config, GenerationConfig):
            raise param_error("config", owner, "a GenerationConfig", config, type_error=True)
        self._check_runtime_params()
        if early_stop is not None and (not config.greedy or config.stop):
            raise param_error("early_stop", owner, "None unless decoding is greedy without "
                              "stop strings (a cut answer could score lower than its prefix)",
                              early_stop)

        if early_stop is None and self.decoding != "transformers":
            own = self._generate_own(checked, [config])
            if own is not None:
                return own[0]
        return self._generate_hf(checked, config, early_stop)

    def generate_multi(
        self, prompts: Sequence[Prompt], configs: Sequence[GenerationConfig]
    ) -> list[list[list[Sample]]]:
        """Generate for several configurations of the same prompts in one decoding pass.

        With the own decoding loop (see ``decoding``), the rows of all
        configurations -- typically one greedy answer and N samples -- share one
        prefill and one batch, instead of one ``generate`` call per configuration.
        Results equal those of separate :meth:`generate` calls (same samples for
        the same seeds; statistics equal up to floating-point summation order).

        Parameters
        ----------
        prompts : sequence of Prompt of length n_prompts
        configs : sequence of GenerationConfig of length n_configs

        Returns
        -------
        list of length n_configs of list of length n_prompts of list of Sample
        """
        owner = f"{_OWNER}.generate_multi"
        checked = check_prompts(prompts, owner)
        if isinstance(configs, GenerationConfig) or not isinstance(configs, Sequence):
            raise param_error("configs", owner, "a list of GenerationConfig", configs,
                              type_error=True)
        for i, cfg in enumerate(configs):
            if not isinstance(cfg, GenerationConfig):
                raise param_error(f"configs[{i}]", owner, "a GenerationConfig", cfg,
                                  type_error=True)
        self._check_runtime_params()
        cfgs = list(configs)
        if not cfgs:
            return []
        if self.decoding != "transformers":
            own = self._generate_own(checked, cfgs)
            if own is not None:
                return own
        return [self._generate_hf(checked, cfg, None) for cfg in cfgs]

    def _batches(self, encoded: list[list[int]]) -> Any:
        order = list(range(len(encoded)))
        if self.bucket_by_length:
            order.sort(key=lambda i: len(encoded[i]))
        batches = [
            order[i:i + self.batch_size] for i in range(0, len(encoded), self.batch_size)
        ]
        if len(batches) > 1:
            from tqdm.auto import tqdm

            return tqdm(batches, desc=f"generate ({self.name})", unit="batch")
        return batches

    def _generate_own(
        self, checked: Sequence[Prompt], configs: list[GenerationConfig]
    ) -> list[list[list[Sample]]] | None:
        """The own decoding loop; None when the model does not support it (``"auto"``)."""
        from confroute.models._decode import UnsupportedModel, decode

        if self._own_unsupported is not None:
            if self.decoding == "confroute":
                self._raise_unsupported(self._own_unsupported)
            return None
        encoded = self._encode_prompts(checked)
        eos_ids = self._eos_ids()
        eos_set = set(eos_ids)
        pad_id = int(self.tokenizer.pad_token_id)
        results: list[list[list[Sample]]] = [[[] for _ in encoded] for _ in configs]
        for idx in self._batches(encoded):
            batch = [encoded[i] for i in idx]
            try:
                rows = decode(
                    self.model, batch, configs, pad_id=pad_id, eos_ids=eos_ids,
                    tokenizer=self.tokenizer, shared_prefill=self.shared_prefill is not False,
                )
            except UnsupportedModel as exc:
                self._own_unsupported = str(exc)
                if self.decoding == "confroute":
                    self._raise_unsupported(str(exc))
                return None
            for c, cfg in enumerate(configs):
                for i, per_prompt in zip(idx, rows[c]):
                    results[c][i] = [
                        self._make_sample(
                            row.token_ids, row.logprobs, row.entropies, cfg, eos_set, pad_id,
                            len(encoded[i]), padded=False,
                        )
                        for row in per_prompt
                    ]
        return results

    def _raise_unsupported(self, why: str) -> None:
        raise param_error(
            "decoding", _OWNER, "'auto' or 'transformers' for a model the own decoding loop "
            f"cannot decode ({why})", self.decoding,
        )

    def _generate_hf(
        self, checked: Sequence[Prompt], config: GenerationConfig,
        early_stop: EarlyStopRule | None,
    ) -> list[list[Sample]]:
        import torch

        encoded = self._encode_prompts(checked)
        fork_devices: list[int] = []
        if self.device.type == "cuda":
            index = self.device.index
            fork_devices = [torch.cuda.current_device() if index is None else index]
        results: list[list[Sample]] = [[] for _ in encoded]
        with torch.random.fork_rng(devices=fork_devices, enabled=config.seed is not None):
            if config.seed is not None:
                torch.manual_seed(config.seed)
            for idx in self._batches(encoded):
                got = self._generate_batch([encoded[i] for i in idx], config, early_stop)
                for i, samples in zip(idx, got):
                    results[i] = samples
        return results

    def _pad_left(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from confroute.models._decode import left_pad

        input_ids, mask = left_pad(batch, int(self.tokenizer.pad_token_id))
        return input_ids.to(self.device), mask.to(self.device)

    def _generate_batch(
        self,
        batch: list[list[int]],
        config: GenerationConfig,
        early_stop: EarlyStopRule | None = None,
    ) -> list[list[Sample]]:
        import torch

        input_ids, mask = self._pad_left(batch)
        prompt_len = input_ids.shape[1]
        eos_ids = self._eos_ids()
        kwargs: dict[str, Any] = {
            "max_new_tokens": config.max_new_tokens,
            "num_return_sequences": config.n,
            "return_dict_in_generate": True,
            "output_logits": True,
            "pad_token_id": int(self.tokenizer.pad_token_id),
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
            kwargs["tokenizer"] = self.tokenizer
        hook = None
        if early_stop is not None:
            hook = _early_stop_hook(early_stop, eos_ids)
            kwargs["logits_processor"] = [hook[0]]
            kwargs["stopping_criteria"] = [hook[1]]
        with torch.inference_mode():
            if config.n > 1 and prompt_len > 1 and self.shared_prefill in ("auto", True):
                # generate() expands the inputs to the n rows but not a given cache.
                cache = self._prefill_cache(input_ids[:, :-1], mask[:, :-1])
                cache.batch_repeat_interleave(config.n)
                kwargs["cache"] = cache
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        generated = out.sequences[:, prompt_len:]
        logprobs, entropies = _token_stats(out.logits, generated)
        del out
        gen_np = generated.cpu().numpy()
        n_prompt_tokens = [len(ids) for ids in batch]
        eos_set = set(eos_ids)
        pad_id = int(self.tokenizer.pad_token_id)
        stopped = hook[1].stopped_at if hook is not None else {}
        samples: list[list[Sample]] = []
        for r in range(gen_np.shape[0]):
            if r % config.n == 0:
                samples.append([])
            row = gen_np[r].tolist()
            samples[-1].append(
                self._make_sample(
                    row, logprobs[r], entropies[r], config, eos_set, pad_id,
                    n_prompt_tokens[r // config.n], stopped.get(r),
                )
            )
        return samples

    def _prefill_cache(self, prefix: torch.Tensor, mask: torch.Tensor) -> Any:
        """Key/value cache of the left-padded ``prefix`` (positions as ``generate`` sets them)."""
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        from confroute.models._decode import cache_of

        out = self.model(input_ids=prefix, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1)
        return cache_of(out)

    def _make_sample(
        self,
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
    ) -> Sample:
        length = len(row)
        finish = "length"
        # After an early stop the row holds padding, which may be the EOS id.
        limit = length if stopped_at is None else stopped_at
        for t, tok in enumerate(row[:limit]):
            if tok in eos_set:
                length, finish = t + 1, "stop"
                break
        else:
            if stopped_at is not None and stopped_at < config.max_new_tokens:
                length, finish = stopped_at, "early_stop"
            if config.stop and stopped_at is None and padded:
                # A row stopped by a stop string is padded while others continue.
                while length > 0 and row[length - 1] == pad_id:
                    length -= 1
        ids = row[:length]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, config.stop)
        if cut is not None:
            keep = self._tokens_covering(ids, text[:cut])
            ids, text, finish = ids[:keep], text[:cut], "stop"
            length = keep
        return Sample(
            text=text,
            token_ids=tuple(int(i) for i in ids),
            token_logprobs=logprobs[:length].copy(),
            token_entropies=entropies[:length].copy(),
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
        )

    def _tokens_covering(self, ids: list[int], text: str) -> int:
        """Smallest k such that the first k tokens decode to a text starting with ``text``.

        A byte-level token can end inside a multi-byte character, which decodes as a
        replacement character until the next token completes it; such a k is not
        enough even though its text is long enough.
        """
        def decoded(k: int) -> str:
            return str(self.tokenizer.decode(ids[:k], skip_special_tokens=True))

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

    # ------------------------------------------------------------------ scoring
    def score(
        self, prompts: Sequence[Prompt], continuations: Sequence[str | Sequence[int]]
    ) -> list[np.ndarray]:
        """Teacher-forced log-probability of each continuation token given its prompt.

        Parameters
        ----------
        prompts : sequence of Prompt of length n_pairs
            Rendered exactly as in :meth:`generate` (chat template, system prompt).
        continuations : sequence of length n_pairs of str or sequence of int
            Text (tokenised without special tokens) or token ids to score.

        Returns
        -------
        list of length n_pairs of ndarray of shape (n_tokens_i,)
            float32 :math:`\\log p(c_t \\mid \\text{prompt}, c_{<t})` under the
            unprocessed distribution; empty for an empty continuation.
        """
        owner = f"{_OWNER}.score"
        checked = check_prompts(prompts, owner)
        if isinstance(continuations, (str, bytes)) or not isinstance(continuations, Sequence):
            raise param_error("continuations", owner, "a list of strings or token-id lists",
                              continuations, type_error=True)
        check_same_length(owner, prompts=checked, continuations=continuations)
        self._check_runtime_params()
        cont_ids = [self._continuation_ids(c, i, owner) for i, c in enumerate(continuations)]
        prompt_ids = self._encode_prompts(checked)
        out: list[np.ndarray] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            stop = start + self.batch_size
            out.extend(self._score_batch(prompt_ids[start:stop], cont_ids[start:stop]))
        return out

    def _continuation_ids(self, cont: Any, i: int, owner: str) -> list[int]:
        if isinstance(cont, str):
            return list(self.tokenizer(cont, add_special_tokens=False)["input_ids"])
        if (
            isinstance(cont, (Sequence, np.ndarray))
            and not isinstance(cont, (bytes, Mapping))
            and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in cont)
        ):
            vocab = len(self.tokenizer)
            ids = [int(t) for t in cont]
            if any(t < 0 or t >= max(vocab, self._vocab_size()) for t in ids):
                raise param_error(f"continuations[{i}]", owner, "token ids inside the vocabulary",
                                  cont)
            return ids
        raise param_error(f"continuations[{i}]", owner, "a string or a list of token ids", cont,
                          type_error=True)

    def _vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _score_batch(self, prompts: list[list[int]], conts: list[list[int]]) -> list[np.ndarray]:
        import torch

        seqs = [p + c for p, c in zip(prompts, conts)]
        width = max(len(s) for s in seqs)
        pad = int(self.tokenizer.pad_token_id)
        # Right padding keeps the default position ids of real tokens correct.
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits
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


def _early_stop_hook(rule: EarlyStopRule, eos_ids: Sequence[int]) -> tuple[Any, Any]:
    """A logits processor that keeps the step's raw log-softmax, and a stopping
    criterion that adds the chosen token's statistics and asks ``rule``.

    The processor is the only one in greedy decoding with the neutral settings of
    :meth:`HFLanguageModel._generate_batch`, so it sees the unprocessed logits.
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


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(positions) if positions else None


def _token_stats(
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
    chunk = max(1, _MAX_STAT_ELEMENTS // max(1, n_rows * vocab))
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
