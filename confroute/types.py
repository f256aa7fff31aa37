"""Plain data types passed between the parts of confroute.

All are frozen dataclasses: a value produced by one part can be handed to
another without copying and without surprise mutation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from confroute._validation import Message, Prompt, check_float, check_int, param_error
from confroute.errors import CloudError

__all__ = [
    "Decision",
    "EntropyKind",
    "Estimate",
    "GenerationConfig",
    "Message",
    "Prompt",
    "RoutedResponse",
    "Sample",
    "Samples",
    "prompt_key",
    "prompt_text",
]


def prompt_text(prompt: Prompt) -> str:
    """A readable one-string view of a prompt (the last user turn for a conversation)."""
    if isinstance(prompt, str):
        return prompt
    for msg in reversed(list(prompt)):
        if msg.get("role") == "user":
            return str(msg.get("content", ""))
    return str(list(prompt)[-1].get("content", ""))


def prompt_key(prompt: Prompt) -> str:
    """Stable JSON identity of a prompt, used for caching and de-duplication."""
    if isinstance(prompt, str):
        return json.dumps(prompt, ensure_ascii=False)
    return json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in prompt], ensure_ascii=False
    )


#: Largest ``GenerationConfig.max_new_tokens`` (bounds the memory one config can request).
MAX_NEW_TOKENS = 131_072
#: Largest ``GenerationConfig.n`` (samples per prompt).
MAX_SAMPLES = 1_024


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate from a language model.

    Parameters
    ----------
    max_new_tokens : int in [1, MAX_NEW_TOKENS]
        Upper bound on generated tokens per sample (at most 131,072: the memory a
        config can make a model allocate is bounded).
    temperature : float
        0 means greedy decoding; > 0 samples from the tempered distribution.
    top_p : float
        Nucleus sampling mass in (0, 1]; 1 disables it.
    top_k : int
        Keep only the k most likely tokens; 0 disables it.
    n : int in [1, MAX_SAMPLES]
        Number of samples per prompt (must be 1 for greedy decoding; at most 1,024).
    seed : int or None
        Seed for reproducible sampling; None draws fresh randomness.
    stop : tuple of str
        Extra stop strings; generation ends at the first occurrence (not included).
    hidden_layers : tuple of int
        Hidden-state layers to capture for every generated token (indices into the
        model's ``hidden_states``: 0 = embeddings, ``i`` = after block ``i``),
        returned in ``Sample.hidden_states``.
        Empty (the default) captures nothing.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    hidden_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        owner = "GenerationConfig"
        check_int(self.max_new_tokens, "max_new_tokens", owner, min_value=1,
                  max_value=MAX_NEW_TOKENS)
        check_float(self.temperature, "temperature", owner, min_value=0.0)
        check_float(self.top_p, "top_p", owner, min_value=0.0, max_value=1.0, min_inclusive=False)
        check_int(self.top_k, "top_k", owner, min_value=0)
        check_int(self.n, "n", owner, min_value=1, max_value=MAX_SAMPLES)
        check_int(self.seed, "seed", owner, min_value=0, allow_none=True)
        if (
            isinstance(self.stop, (str, bytes, Mapping))
            or not isinstance(self.stop, (tuple, list))
            or not all(isinstance(s, str) and s for s in self.stop)
        ):
            raise param_error("stop", owner, "a tuple of non-empty strings", self.stop,
                              type_error=True)
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.hidden_layers, (tuple, list)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.hidden_layers
        ):
            raise param_error("hidden_layers", owner, "a tuple of non-negative ints",
                              self.hidden_layers, type_error=True)
        object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))
        if self.temperature == 0.0 and self.n != 1:
            raise param_error(
                "n", owner, "1 when temperature is 0 (greedy decoding is deterministic)", self.n
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key(self) -> str:
        """Stable identity of the parameters (for caches)."""
        fields: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "n": self.n,
            "seed": self.seed,
            "stop": list(self.stop),
        }
        if self.hidden_layers:  # absent otherwise: existing cache keys are unchanged
            fields["hidden_layers"] = list(self.hidden_layers)
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def sampling_key(self) -> tuple[float, float, int, int, int | None, tuple[str, ...]]:
        """The parameters that define a distribution of samples (everything but ``n``)."""
        return (self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.seed,
                self.stop)


FinishReason = Literal["stop", "length", "early_stop", "error"]
#: How ``Sample.token_entropies`` were obtained (see :class:`Sample`).
EntropyKind = Literal["exact", "top_k_bound", "none"]
_ENTROPY_KINDS = ("exact", "top_k_bound", "none")


@dataclass(frozen=True, eq=False)
class Sample:
    """One generated continuation with its per-token statistics.

    Attributes
    ----------
    text : str
        Decoded continuation (special tokens removed, stop string cut).
    token_ids : tuple of int
        Generated token ids up to and including end-of-sequence, if any.
    token_logprobs : ndarray of shape (n_tokens,) or None
        Log-probability of each chosen token under the model's *unprocessed*
        next-token distribution (before temperature, top-p or top-k).
        None when the backend does not report them.
    token_entropies : ndarray of shape (n_tokens,) or None
        Entropy (nats) of the unprocessed next-token distribution at each step.
        None when the backend does not report them (remote APIs usually do not).
    finish_reason : {"stop", "length", "early_stop", "error"}
        Why generation ended.
    prompt_tokens : int or None
        Number of prompt tokens the backend processed (for cost accounting);
        None when unknown.
    hidden_states : ndarray of shape (n_layers, n_tokens, hidden_size) or None
        float32 hidden states of the layers ``hidden_layers`` at the position that
        *predicted* each generated token (the prompt's last token for the first
        one, then each generated token but the last), captured in the decoding
        passes themselves; None unless the config asked for ``hidden_layers``.
    hidden_layers : tuple of int
        The layer indices of ``hidden_states``.
    entropy_kind : {"exact", "top_k_bound", "none"} or None
        Provenance of ``token_entropies``: ``"exact"`` (computed over the full
        vocabulary, e.g. by a local model), ``"top_k_bound"`` (a lower bound from
        the top-k log-probabilities a remote server reported, see
        :func:`~confroute.models.openai.approximate_entropy`) or ``"none"`` (no
        entropies). None (the default) resolves to ``"none"`` without entropies
        and to ``"exact"`` with them: a back-end that approximates must say so.
    extra : mapping
        Back-end details of the reply that confroute does not interpret, passed
        through as received. For an OpenAI-compatible server: ``"message"``
        (the raw chat message: ``tool_calls``, ``refusal``, ...),
        ``"finish_reason"`` (the server's own string, e.g. ``"tool_calls"`` or
        ``"content_filter"``), ``"logprobs"`` (the raw logprobs object) and
        ``"usage"`` (the response's usage object).
        Empty for local models. Not part of the repr.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    token_logprobs: np.ndarray | None = None
    token_entropies: np.ndarray | None = None
    finish_reason: FinishReason = "stop"
    prompt_tokens: int | None = None
    hidden_states: np.ndarray | None = field(default=None, repr=False)
    hidden_layers: tuple[int, ...] = ()
    entropy_kind: EntropyKind | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        kind = self.entropy_kind
        if kind is None:
            kind = "none" if self.token_entropies is None else "exact"
        elif kind not in _ENTROPY_KINDS or (kind == "none") != (self.token_entropies is None):
            raise param_error(
                "entropy_kind", "Sample", "'none' without token_entropies, 'exact' or "
                "'top_k_bound' with them", kind)
        object.__setattr__(self, "entropy_kind", kind)

    @property
    def n_tokens(self) -> int:
        if self.token_logprobs is not None:
            return len(self.token_logprobs)
        return len(self.token_ids)

    @property
    def sum_logprob(self) -> float:
        """Total log-likelihood of the sample (NaN when logprobs are unknown)."""
        if self.token_logprobs is None:
            return math.nan
        return float(np.sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        """Length-normalised log-likelihood (NaN when unknown or empty)."""
        if self.token_logprobs is None or len(self.token_logprobs) == 0:
            return math.nan
        return float(np.mean(self.token_logprobs))

    @property
    def mean_entropy(self) -> float:
        """Mean token entropy in nats (NaN when unknown or empty)."""
        if self.token_entropies is None or len(self.token_entropies) == 0:
            return math.nan
        return float(np.mean(self.token_entropies))


@dataclass(frozen=True, eq=False)
class Samples:
    """Everything generated for one prompt, shared by several estimators.

    Attributes
    ----------
    prompt : Prompt
        The prompt the generations answer.
    greedy : Sample or None
        The greedy (temperature 0) answer: the answer the router keeps on the edge.
    draws : mapping from sampling key to tuple of Sample
        Stochastic samples, grouped by the sampling parameters that produced them
        (see :meth:`GenerationConfig.sampling_key`).
    extra : mapping
        Estimator-specific generations (e.g. the verbalized-confidence reply).
    """

    prompt: Prompt
    greedy: Sample | None = None
    draws: Mapping[tuple[Any, ...], tuple[Sample, ...]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def sampled(self, config: GenerationConfig) -> tuple[Sample, ...]:
        """The first ``config.n`` draws made with ``config``'s sampling parameters."""
        draws = self.draws.get(config.sampling_key(), ())
        return tuple(draws[: config.n])

    def has(self, *, greedy: bool = False, config: GenerationConfig | None = None) -> bool:
        if greedy and self.greedy is None:
            return False
        return not (config is not None and len(self.sampled(config)) < config.n)

    def merged(self, other: Samples) -> Samples:
        """Union of two generations for the same prompt (``self`` wins on conflicts)."""
        draws = dict(other.draws)
        for k, v in self.draws.items():
            if len(v) >= len(draws.get(k, ())):
                draws[k] = v
        return Samples(
            prompt=self.prompt,
            greedy=self.greedy if self.greedy is not None else other.greedy,
            draws=draws,
            extra={**dict(other.extra), **dict(self.extra)},
        )


@dataclass(frozen=True, eq=False)
class Estimate:
    """What an :class:`~confroute.estimators.UncertaintyEstimator` returns.

    Attributes
    ----------
    scores : ndarray of shape (n_prompts,)
        Uncertainty per prompt, **higher = more uncertain**. NaN where the
        estimator could not score (counted in ``n_unscored``).
    samples : list of Samples
        The generations used, one per prompt, reusable by other estimators and
        by the router (the edge answer is ``samples[i].greedy``).
    name : str
        Name of the estimator that produced the scores.
    details : mapping of str to ndarray of shape (n_prompts,)
        Auxiliary per-prompt values (e.g. number of semantic clusters).
    """

    scores: np.ndarray
    samples: list[Samples]
    name: str
    details: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_unscored(self) -> int:
        """How many prompts got a NaN score."""
        return int(np.isnan(self.scores).sum())


Source = Literal["edge", "cloud"]


@dataclass(frozen=True)
class Decision:
    """The routing decision for one prompt (made before any cloud call).

    Attributes
    ----------
    prompt : Prompt
    source : {"edge", "cloud"}
        Where the answer should come from.
    p_good : float
        Calibrated probability that the edge answer is good (NaN if unscorable).
    scores : mapping of str to float
        Raw estimator score(s) that led to ``p_good``.
    edge_answer : str or None
        The edge model's answer, when one was generated.
    reason : str
        Short human-readable reason ("p_good 0.82 >= threshold 0.60", "budget exhausted").
    edge_sample : Sample or None
        The edge model's greedy answer behind ``edge_answer`` (its token
        statistics and ``finish_reason``), when one was generated. Not part of
        the repr or of equality.
    ticket : Ticket or None
        The online policy's ledger ticket (:meth:`~confroute.policies.OnlinePolicy.admit`)
        when the router's policy enforces a budget online, None otherwise.
        :meth:`~confroute.router.Router.answer` settles it once the cloud call is
        done. Not part of the repr or of equality.
    """

    prompt: Prompt
    source: Source
    p_good: float
    scores: Mapping[str, float]
    edge_answer: str | None
    reason: str = ""
    ticket: Any = field(default=None, repr=False, compare=False)
    edge_sample: Sample | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RoutedResponse:
    """The answer served for one prompt, with the decision that chose it.

    Attributes
    ----------
    text : str or None
        The answer served (None only when ``error`` is set).
    source : {"edge", "cloud"}
        Where ``text`` came from.
    decision : Decision
    degraded : bool
        True when the cloud was chosen but failed and the edge answer was served.
    error : str or None
        Why no answer or a degraded answer was served.
    cost : float
        Cost charged for this request (price table units; 0 for the edge).
    usage : mapping
        Token usage reported by the model that answered.
    cloud_error : CloudError or None
        The error a failed cloud call ended with (also summarised in ``error``);
        None when the cloud was not called or answered. Not part of the repr or
        of equality.
    answered_by : str or None
        Name of the model that produced ``text``: the cloud of the fallback chain
        that answered, or the edge model (for edge and degraded answers); None
        for error records and when the model is unknown.
    sample : Sample or None
        The sample whose text is served: the edge's greedy answer or the
        answering cloud's first sample (its ``finish_reason``, token
        statistics and back-end ``extra``, e.g. a cloud's tool calls); None
        when unknown. Not part of the repr or of equality.
    """

    text: str | None
    source: Source
    decision: Decision
    degraded: bool = False
    error: str | None = None
    cost: float = 0.0
    usage: Mapping[str, int] = field(default_factory=dict)
    cloud_error: CloudError | None = field(default=None, repr=False, compare=False)
    answered_by: str | None = None
    sample: Sample | None = field(default=None, repr=False, compare=False)
