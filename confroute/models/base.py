"""The LanguageModel protocol and the shared-generation planner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np

from confroute.errors import InvalidParameterError
from confroute.types import GenerationConfig, Prompt, Sample, Samples

__all__ = [
    "LanguageModel",
    "MultiConfigLanguageModel",
    "SampleRequest",
    "ScoringLanguageModel",
    "collect_samples",
    "generate_configs",
    "merge_requests",
]


@runtime_checkable
class LanguageModel(Protocol):
    """Anything that can generate text for a batch of prompts.

    Implemented by :class:`~confroute.models.HFLanguageModel` (local transformers),
    :class:`~confroute.models.OpenAIModel` (any OpenAI-compatible server) and
    :class:`~confroute.evaluation.RecordedModel` (replays stored answers).

    ``generate`` returns, for each prompt, a list of ``config.n`` samples. Backends
    fill ``token_logprobs`` / ``token_entropies`` when they can and leave them None
    otherwise; estimators that need them say so with a clear error.
    """

    name: str

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[Sample]]:
        ...


@runtime_checkable
class ScoringLanguageModel(LanguageModel, Protocol):
    """A model that can also score given continuations (teacher forcing).

    ``score`` returns, for each (prompt, continuation) pair, the log-probability
    of each continuation token, shape (n_tokens,).
    """

    def score(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[np.ndarray]:
        ...


@runtime_checkable
class MultiConfigLanguageModel(LanguageModel, Protocol):
    """A model that generates for several configurations of the same prompts at once.

    ``generate_multi(prompts, configs)[c][i]`` holds what
    ``generate(prompts, configs[c])[i]`` would return; a backend implements it
    when one pass is cheaper than one call per configuration (for example
    :class:`~confroute.models.HFLanguageModel` decodes a greedy answer and its
    samples in one batch). :func:`collect_samples` uses it when present.
    """

    def generate_multi(
        self, prompts: Sequence[Prompt], configs: Sequence[GenerationConfig]
    ) -> list[list[list[Sample]]]:
        ...


def generate_configs(
    model: LanguageModel, prompts: Sequence[Prompt], configs: Sequence[GenerationConfig]
) -> list[list[list[Sample]]]:
    """``model.generate_multi`` when the model has it and there are several configs,
    else one ``generate`` call per configuration."""
    multi = getattr(model, "generate_multi", None)
    if len(configs) > 1 and callable(multi):
        out = list(multi(prompts, configs))
        if len(out) != len(configs):
            raise InvalidParameterError(
                f"{type(model).__name__}.generate_multi returned {len(out)} results for "
                f"{len(configs)} configurations."
            )
        return out
    return [model.generate(prompts, cfg) for cfg in configs]


@dataclass(frozen=True)
class SampleRequest:
    """What generations an estimator needs.

    Attributes
    ----------
    greedy : bool
        Needs the greedy answer.
    max_new_tokens : int
        Length bound for the greedy answer.
    sampling : GenerationConfig or None
        Needs ``sampling.n`` stochastic draws with these parameters.
    hidden_layers : tuple of int
        Hidden-state layers the greedy answer must carry
        (``Sample.hidden_states``), captured while it is decoded.
    """

    greedy: bool = True
    max_new_tokens: int = 64
    sampling: GenerationConfig | None = None
    hidden_layers: tuple[int, ...] = ()


def merge_requests(requests: Sequence[SampleRequest]) -> list[SampleRequest]:
    """The fewest requests that cover all of ``requests``.

    One greedy request at the largest requested greedy length (when any request
    needs the greedy answer), then one sampling request per distinct set of
    sampling parameters (:meth:`GenerationConfig.sampling_key`, first-seen order)
    with as many draws as the most demanding request asks for.

    Parameters
    ----------
    requests : sequence of SampleRequest

    Returns
    -------
    list of SampleRequest
        Each either greedy-only (``sampling=None``) or sampling-only (``greedy=False``).
    """
    merged: list[SampleRequest] = []
    if any(r.greedy for r in requests):
        length = max(r.max_new_tokens for r in requests if r.greedy)
        layers = sorted({i for r in requests if r.greedy for i in r.hidden_layers})
        merged.append(SampleRequest(greedy=True, max_new_tokens=length,
                                    hidden_layers=tuple(layers)))
    by_key: dict[tuple[object, ...], GenerationConfig] = {}
    for r in requests:
        if r.sampling is None:
            continue
        k = r.sampling.sampling_key()
        if k not in by_key or by_key[k].n < r.sampling.n:
            by_key[k] = r.sampling
    merged.extend(SampleRequest(greedy=False, sampling=cfg) for cfg in by_key.values())
    return merged


def collect_samples(
    model: LanguageModel | None,
    prompts: Sequence[Prompt],
    requests: Sequence[SampleRequest],
    *,
    existing: Sequence[Samples] | None = None,
) -> list[Samples]:
    """Generate, once, everything a set of estimators needs for a batch of prompts.

    Requests are merged by :func:`merge_requests`: one greedy generation at the
    largest requested length, and one batched sampling call per distinct set of
    sampling parameters, with as many draws as the most demanding estimator asks
    for. Configurations needed for the same prompts go to
    ``model.generate_multi`` together when the model has it
    (:class:`MultiConfigLanguageModel`), so a greedy answer and its samples can
    share one decoding pass. What ``existing`` already holds is reused and only
    the missing part is generated.

    Raises
    ------
    InvalidParameterError
        If something must be generated and ``model`` is None, or if ``existing``
        does not match ``prompts``.
    """
    n = len(prompts)
    if existing is not None and len(existing) != n:
        raise InvalidParameterError(
            f"The 'samples' parameter must hold one Samples per prompt: got {len(existing)} "
            f"for {n} prompts."
        )
    current: list[Samples] = (
        list(existing) if existing is not None else [Samples(prompt=p) for p in prompts]
    )
    jobs = _missing_jobs(current, merge_requests(requests))
    # Configurations missing for the same prompts are generated together (one
    # decoding pass where the model allows).
    together: dict[tuple[int, ...], list[int]] = {}
    for j, (_, missing, _) in enumerate(jobs):
        together.setdefault(tuple(missing), []).append(j)
    for missing_t, job_ids in together.items():
        _require_model(model)
        assert model is not None
        missing = list(missing_t)
        outs = generate_configs(model, [prompts[i] for i in missing],
                                [jobs[j][0] for j in job_ids])
        for j, per_config in zip(job_ids, outs):
            for i, out in zip(missing, per_config):
                current[i] = _with_generation(current[i], jobs[j][2], out)
    return current


_Job = tuple[GenerationConfig, list[int], tuple[object, ...] | None]


def _missing_jobs(current: list[Samples], merged: list[SampleRequest]) -> list[_Job]:
    """(config, prompts still missing it, draw key or None for greedy) per merged request."""
    jobs: list[_Job] = []
    for r in merged:
        if r.sampling is None:
            missing = [i for i, s in enumerate(current) if not _has_greedy(s, r.hidden_layers)]
            cfg = GenerationConfig(max_new_tokens=r.max_new_tokens, temperature=0.0, n=1,
                                   hidden_layers=r.hidden_layers)
            key = None
        else:
            cfg, key = r.sampling, r.sampling.sampling_key()
            missing = [i for i, s in enumerate(current) if len(s.draws.get(key, ())) < cfg.n]
        if missing:
            jobs.append((cfg, missing, key))
    return jobs


def _has_greedy(samples: Samples, layers: tuple[int, ...]) -> bool:
    """The greedy answer exists and carries the hidden states of ``layers``."""
    g = samples.greedy
    if g is None:
        return False
    return not layers or (g.hidden_states is not None and set(layers) <= set(g.hidden_layers))


def _with_generation(
    samples: Samples, draw_key: tuple[object, ...] | None, out: list[Sample]
) -> Samples:
    if draw_key is None:
        return replace(samples, greedy=out[0])
    draws = dict(samples.draws)
    draws[draw_key] = tuple(out)
    return replace(samples, draws=draws)


def _require_model(model: LanguageModel | None) -> None:
    if model is None:
        raise InvalidParameterError(
            "The 'model' parameter is None but the given samples do not contain the "
            "generations this estimator needs; pass the edge model or complete samples."
        )
