"""A local Hugging Face transformers causal language model as a confroute LanguageModel.

This module loads the model and tokenizer, renders and tokenises prompts (chat
template, system prompt) and dispatches generation, batched over prompts, to one
of two back-ends: confroute's own decoding loop (:mod:`confroute.models._decode`,
turned into samples by :mod:`confroute.models._hf_samples`) or ``model.generate``
(:mod:`confroute.models._hf_generate`). Teacher-forced scoring lives in
:mod:`confroute.models._hf_score`. For every generated token the model reports the
log-probability of the chosen token and the entropy of the *unprocessed*
next-token distribution (raw logits, before temperature, top-p or top-k), which is
what logprob- and entropy-based uncertainty estimators need.

This module imports torch and transformers; import it only when a local model is
used (``confroute.HFLanguageModel`` does so lazily).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from confroute._validation import (
    check_bool,
    check_choice,
    check_int,
    check_prompts,
    check_same_length,
    param_error,
)
from confroute.errors import ModelLoadError
from confroute.models._hf_generate import EarlyStopRule
from confroute.models._hf_load import check_from_pretrained_kwargs, load_model, load_tokenizer
from confroute.models.device import input_device, resolve_device
from confroute.types import GenerationConfig, Prompt, Sample

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["EarlyStopRule", "HFLanguageModel", "resolve_device", "resolve_dtype"]

_OWNER = "HFLanguageModel"
logger = logging.getLogger(__name__)


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


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids of the generation config and of the tokenizer, sorted."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    """``cuda`` (no index) is the current CUDA device."""
    import torch

    if asked.type != actual.type:
        return False
    if asked.index is None or actual.index is None:
        current = torch.cuda.current_device() if asked.type == "cuda" else 0
        return (asked.index if asked.index is not None else current) == (
            actual.index if actual.index is not None else current)
    return asked.index == actual.index


def _default_name(model: Any, source: str | None) -> str:
    if source is not None:
        return source
    cfg_name = getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(cfg_name) if cfg_name else type(model).__name__


class HFLanguageModel:
    """A local transformers causal LM that generates and scores text.

    Implements :class:`~confroute.models.base.LanguageModel` and
    :class:`~confroute.models.base.ScoringLanguageModel`.

    Parameters
    ----------
    model : transformers.PreTrainedModel or str or Path
        A causal-LM object, used as it is (never moved to another device, never
        cast: place, shard or quantise it before passing it), or a local directory
        or Hugging Face Hub id to load it from with ``from_pretrained_kwargs``.
        Nothing is downloaded unless ``local_files_only=False`` is passed; a hub id
        that is not in the local cache raises a ModelLoadError that says how to
        fetch it.
    tokenizer : transformers tokenizer or str or Path or None
        The tokenizer, or where to load it from. None: the same location as
        ``model`` (required when ``model`` is an object not saved to disk).
    device : str or torch.device, default="auto"
        Where a loaded path goes: ``"auto"`` picks CUDA when available, else CPU
        (see :func:`~confroute.models.device.resolve_device`; MPS only when asked
        for by name); or ``"cpu"``, ``"cuda:0"``, ``"mps"``... A device this
        machine does not have raises an InvalidParameterError naming ``device``.
        With a model object, ``"auto"`` means where the object already is; another
        device must be that one. Must stay ``"auto"`` when ``device_map`` is given.
    dtype : str or torch.dtype or None
        Weight dtype of a loaded path. None: float32 on CPU, bfloat16 on CUDA
        (float16 on a GPU without bfloat16), the checkpoint's dtype elsewhere. With a
        model object: None or the object's own dtype.
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
        with ``early_stop`` always use ``model.generate``. When the own loop cannot
        decode a model, ``"auto"`` logs why (logger ``confroute.models.hf``, once)
        and uses ``model.generate``. Sharded models (``device_map``) are supported:
        inputs go to the first device of the map, the cache stays on each layer's.
    **from_pretrained_kwargs
        Passed to ``AutoModelForCausalLM.from_pretrained`` when ``model`` is a path
        or hub id (not allowed with a model object): ``device_map`` (``"auto"``, a
        device or a module-to-device dict; the model is not moved afterwards),
        ``quantization_config`` (e.g. ``BitsAndBytesConfig(load_in_4bit=True)``,
        needs ``confroute[quantization]``), ``attn_implementation`` (``"sdpa"``,
        ``"flash_attention_2"``...), ``revision``, ``trust_remote_code`` (False
        unless set), ``local_files_only`` (True unless set), ``cache_dir``,
        ``max_memory``, ``offload_folder``... ``revision``, ``trust_remote_code``,
        ``cache_dir``, ``token`` and ``local_files_only`` also apply to the tokenizer
        loaded from the same place.

    Attributes
    ----------
    model : transformers.PreTrainedModel
    tokenizer : transformers tokenizer
        Its pad token falls back to EOS and its padding side is set to left.
    device : torch.device
        Where inputs go: the model's device, or the first device of its map.
    name : str
    from_pretrained_kwargs : dict
        The ``from_pretrained`` arguments as given.

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
        **from_pretrained_kwargs: Any,
    ) -> None:
        self.shared_prefill = shared_prefill
        self.decoding = decoding
        self._own_unsupported: str | None = None
        self.bucket_by_length = bucket_by_length
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self.batch_size = batch_size
        self.gguf_file = gguf_file
        self.from_pretrained_kwargs = from_pretrained_kwargs
        self.model, source = self._load(model, device, dtype)
        self.tokenizer = load_tokenizer(tokenizer, source, self.model, gguf_file,
                                        self._load_kwargs)
        if name is not None and not isinstance(name, str):
            raise param_error("name", _OWNER, "a string or None", name, type_error=True)
        self.name: str = name or _default_name(self.model, source)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ModelLoadError(
                    "The tokenizer has neither a pad token nor an EOS token; set "
                    "tokenizer.pad_token before building the HFLanguageModel."
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

    def _load(self, model: Any, device: Any, dtype: Any) -> tuple[Any, str | None]:
        """Check every loading argument, then load (a path) or adopt (an object)."""
        import torch

        is_object = not isinstance(model, (str, os.PathLike))
        self._load_kwargs = check_from_pretrained_kwargs(
            self.from_pretrained_kwargs, is_object=is_object,
            device_is_auto=isinstance(device, str) and device == "auto",
        )
        # MPS is not chosen by "auto": token statistics are validated on CUDA and CPU only.
        resolved = resolve_device(device, _OWNER, mps=False)
        loaded, source = load_model(model, resolved, resolve_dtype(dtype), self.gguf_file,
                                    self._load_kwargs)
        self.device = input_device(loaded)
        if is_object and device != "auto" and not _same_device(resolved, self.device):
            raise param_error("device", _OWNER, f"'auto' or the device the given model is on "
                              f"({self.device}): a loaded model object is never moved; "
                              f"move it first (model.to({str(resolved)!r}))", str(resolved))
        if self.device.type == "cpu" and getattr(loaded, "dtype", None) in (
            torch.float16, torch.bfloat16
        ):
            logger.warning("%s runs in %s on CPU: slow, and log-probabilities are less "
                           "accurate than in float32.", type(loaded).__name__, loaded.dtype)
        return loaded, source

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
        self._check_layers(config.hidden_layers, "config.hidden_layers", owner)
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
        for i, cfg in enumerate(configs):
            self._check_layers(cfg.hidden_layers, f"configs[{i}].hidden_layers", owner)
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
        """The own decoding loop (:mod:`confroute.models._decode`); None when the model
        does not support it and ``decoding="auto"``."""
        from confroute.models._decode import UnsupportedModel
        from confroute.models._hf_samples import decode_samples

        if self._own_unsupported is None:
            encoded = self._encode_prompts(checked)
            try:
                return decode_samples(
                    self.model, self.tokenizer, encoded, self._batches(encoded), configs,
                    eos_ids=_eos_ids(self.model, self.tokenizer),
                    shared_prefill=self.shared_prefill is not False, device=self.device,
                )
            except UnsupportedModel as exc:
                self._own_unsupported = str(exc)
                if self.decoding == "auto":
                    logger.warning("%s: confroute's decoding loop cannot decode this model "
                                   "(%s); using model.generate instead.", self.name, exc)
        if self.decoding == "confroute":
            self._raise_unsupported(self._own_unsupported)
        return None

    def _raise_unsupported(self, why: str | None) -> None:
        raise param_error(
            "decoding", _OWNER, "'auto' or 'transformers' for a model the own decoding loop "
            f"cannot decode ({why})", self.decoding,
        )

    def _generate_hf(
        self, checked: Sequence[Prompt], config: GenerationConfig,
        early_stop: EarlyStopRule | None,
    ) -> list[list[Sample]]:
        """The ``model.generate`` back-end (:mod:`confroute.models._hf_generate`)."""
        from confroute.models._hf_generate import generate_all

        encoded = self._encode_prompts(checked)
        return generate_all(
            self.model, self.tokenizer, encoded, self._batches(encoded), config,
            device=self.device, eos_ids=_eos_ids(self.model, self.tokenizer),
            shared_prefill=self.shared_prefill is not False, early_stop=early_stop,
        )

    # ------------------------------------------------------------ hidden states
    def architecture(self) -> dict[str, Any]:
        """``{"architecture", "hidden_size", "num_layers"}`` of the loaded model (what
        a probe records at fit and checks before it is applied)."""
        from confroute.models._hf_hidden import model_signature

        return model_signature(self.model)

    def _check_layers(self, layers: Sequence[int], name: str, owner: str) -> None:
        top = self.architecture()["num_layers"]
        if any(i > top for i in layers):
            raise param_error(name, owner, f"layer indices in [0, {top}] (0 = embeddings, "
                              f"{top} = last block)", tuple(layers))

    def prompt_hidden_states(self, prompts: Sequence[Prompt], layers: Sequence[int]) -> np.ndarray:
        """Hidden states at each prompt's last token, from one prefill (nothing generated).

        Parameters
        ----------
        prompts : sequence of Prompt of length n_prompts
            Rendered as in :meth:`generate`.
        layers : sequence of int
            Indices into the model's hidden states (0 = embeddings, ``i`` = after block i).

        Returns
        -------
        ndarray of shape (n_prompts, n_layers, hidden_size), float32
        """
        owner = f"{_OWNER}.prompt_hidden_states"
        checked = check_prompts(prompts, owner)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ) or not layers:
            raise param_error("layers", owner, "a non-empty list of non-negative ints", layers,
                              type_error=not isinstance(layers, Sequence))
        self._check_runtime_params()
        self._check_layers(layers, "layers", owner)
        from confroute.models._hf_hidden import prompt_hidden

        return prompt_hidden(self.model, self._encode_prompts(checked), list(layers),
                             pad_id=int(self.tokenizer.pad_token_id), batch_size=self.batch_size)

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

        Notes
        -----
        Continuations of the same prompt (the options of a multiple-choice
        question) share one prefill: the prompt runs once and its key/value cache
        is repeated for them, so k options cost about one prompt pass instead of k.
        """
        owner = f"{_OWNER}.score"
        checked = check_prompts(prompts, owner)
        if isinstance(continuations, (str, bytes)) or not isinstance(continuations, Sequence):
            raise param_error("continuations", owner, "a list of strings or token-id lists",
                              continuations, type_error=True)
        check_same_length(owner, prompts=checked, continuations=continuations)
        self._check_runtime_params()
        from confroute.models._hf_score import continuation_ids, score_pairs

        cont_ids = [continuation_ids(self.tokenizer, self.model, c, f"continuations[{i}]", owner)
                    for i, c in enumerate(continuations)]
        return score_pairs(self.model, self._encode_prompts(checked), cont_ids,
                           pad_id=int(self.tokenizer.pad_token_id), device=self.device,
                           batch_size=self.batch_size)
