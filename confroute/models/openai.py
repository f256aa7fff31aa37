"""A language model served behind an OpenAI-compatible HTTP API.

:class:`OpenAIModel` talks to ``/v1/chat/completions`` (default) or
``/v1/completions`` of OpenAI itself or of any compatible server (vLLM,
llama.cpp ``llama-server``, TGI, LiteLLM, ...). It is the usual *cloud* model
of a router, and can also be the *edge* model when the small model is served
over HTTP.

``httpx`` is imported only when a request is made (optional extra ``http``).
Clients are created lazily, so constructing a model never opens a connection.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import numpy as np

from confroute._params import ParamsMixin
from confroute._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_prompts,
    param_error,
)
from confroute.errors import CloudError, InvalidParameterError, InvalidTypeError
from confroute.types import GenerationConfig, Prompt, Sample

__all__ = ["OpenAIModel", "approximate_entropy"]

logger = logging.getLogger(__name__)

_OWNER = "OpenAIModel"
_HTTP_HINT = 'OpenAIModel needs httpx; install it with: pip install "confroute[http]"'
# 408 (request timeout), 409 (conflict, e.g. a lock) and 429 (rate limit) are transient.
_RETRY_4XX = frozenset({408, 409, 429})
_LENGTH_REASONS = frozenset({"length", "max_tokens", "model_length"})
_USAGE_KEYS = ("requests", "prompt_tokens", "completion_tokens", "failures", "retries")


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:  # pragma: no cover - httpx is installed in the test env
        from confroute.errors import MissingDependencyError

        raise MissingDependencyError(_HTTP_HINT) from exc
    return httpx


# --------------------------------------------------------------------------- entropy


def approximate_entropy(top_logprobs: Sequence[float]) -> float:
    r"""Entropy (nats) of a next-token distribution known only through its top-k.

    The k reported probabilities :math:`p_1, \dots, p_k` are kept and the
    unreported tail mass :math:`r = 1 - \sum_i p_i` is treated as one extra
    outcome:

    .. math::

        \hat H = -\sum_{i=1}^{k} p_i \log p_i - r \log r .

    Merging the tail into one outcome can only remove uncertainty, so
    :math:`\hat H` is a **lower bound** on the true entropy; it is exact when the
    tail is empty and tight when the tail is small. If rounding makes the
    reported mass exceed 1 it is renormalised and the tail is empty.

    Parameters
    ----------
    top_logprobs : sequence of float
        Log-probabilities of the reported candidate tokens (the chosen token
        should be among them). ``-inf`` entries count as probability 0.

    Returns
    -------
    float
        The approximate entropy, >= 0.
    """
    lp = np.asarray(list(top_logprobs), dtype=np.float64)
    p = np.exp(np.minimum(lp[~np.isnan(lp)], 0.0))
    p = p[p > 0.0]
    mass = float(p.sum())
    if mass > 1.0:
        p = p / mass
        tail = 0.0
    else:
        tail = 1.0 - mass
    h = float(-(p * np.log(p)).sum())
    if tail > 0.0:
        h -= tail * math.log(tail)
    return max(h, 0.0)


# --------------------------------------------------------------------------- parsing


class _Malformed(Exception):
    """A 2xx response whose body is not a usable completion."""


@dataclass(frozen=True)
class _Choice:
    text: str
    logprobs: np.ndarray | None
    entropies: np.ndarray | None
    finish_reason: Literal["stop", "length"]


@dataclass(frozen=True)
class _Parsed:
    choices: list[_Choice]
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class _Failure:
    reason: str
    status: int | None
    retryable: bool
    retry_after: float | None = None
    detail: str = ""


def _finish(reason: Any) -> Literal["stop", "length"]:
    return "length" if isinstance(reason, str) and reason in _LENGTH_REASONS else "stop"


def _token_stats(
    tokens: Sequence[tuple[str | None, float, Sequence[tuple[str | None, float]] | None]],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Chosen-token logprobs and approximate entropies from (token, logprob, top) rows."""
    logprobs = np.array([lp for _, lp, _ in tokens], dtype=np.float64)
    if not any(top for _, _, top in tokens):
        return logprobs, None
    entropies = np.empty(len(tokens), dtype=np.float64)
    for i, (tok, lp, top) in enumerate(tokens):
        cands = list(top or ())
        # The sampled token may lie outside the top-k; it is still a known bucket.
        if tok is None or all(t != tok for t, _ in cands):
            cands.append((tok, lp))
        entropies[i] = approximate_entropy([c_lp for _, c_lp in cands])
    return logprobs, entropies


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed(f"expected a number for a logprob, got {type(value).__name__}")
    return float(value)


def _chat_logprobs(lp: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not isinstance(lp, Mapping) or not isinstance(lp.get("content"), list):
        return None, None
    rows = []
    for item in lp["content"]:
        if not isinstance(item, Mapping):
            raise _Malformed("logprobs.content entries must be objects")
        top_raw = item.get("top_logprobs") or []
        if not isinstance(top_raw, list):
            raise _Malformed("top_logprobs must be a list")
        top = [
            (t.get("token"), _as_float(t.get("logprob")))
            for t in top_raw
            if isinstance(t, Mapping)
        ]
        rows.append((item.get("token"), _as_float(item.get("logprob")), top))
    return _token_stats(rows)


def _completion_logprobs(lp: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not isinstance(lp, Mapping) or not isinstance(lp.get("token_logprobs"), list):
        return None, None
    tokens = lp.get("tokens") or [None] * len(lp["token_logprobs"])
    tops = lp.get("top_logprobs") or [None] * len(lp["token_logprobs"])
    if not isinstance(tokens, list) or not isinstance(tops, list):
        raise _Malformed("logprobs.tokens and logprobs.top_logprobs must be lists")
    rows = []
    for tok, value, top in zip(tokens, lp["token_logprobs"], tops):
        if value is None:  # the first token of an echoed prompt has no logprob
            continue
        cands = (
            [(str(t), _as_float(v)) for t, v in top.items()] if isinstance(top, Mapping) else []
        )
        rows.append((tok, _as_float(value), cands))
    return _token_stats(rows)


def _parse_body(content: bytes, endpoint: str) -> _Parsed:
    """Parse an OpenAI-shaped completion body; raise :class:`_Malformed` if unusable."""
    try:
        payload = json.loads(content)
    except ValueError as exc:
        raise _Malformed(f"body is not valid JSON ({exc})") from None
    if not isinstance(payload, Mapping):
        raise _Malformed("body is not a JSON object")
    raw = payload.get("choices")
    if not isinstance(raw, list) or not raw:
        raise _Malformed("body has no 'choices' list")
    if any(not isinstance(c, Mapping) for c in raw):
        raise _Malformed("'choices' entries must be objects")
    if all(isinstance(c.get("index"), int) for c in raw):
        raw = sorted(raw, key=lambda c: c["index"])
    choices = []
    for c in raw:
        if endpoint == "chat":
            msg = c.get("message")
            if not isinstance(msg, Mapping):
                raise _Malformed("chat choice has no 'message' object")
            text = msg.get("content")
            logprobs, entropies = _chat_logprobs(c.get("logprobs"))
        else:
            text = c.get("text")
            logprobs, entropies = _completion_logprobs(c.get("logprobs"))
        if text is not None and not isinstance(text, str):
            raise _Malformed("choice text is not a string")
        choices.append(_Choice(text or "", logprobs, entropies, _finish(c.get("finish_reason"))))
    usage = payload.get("usage")
    prompt_tokens = completion_tokens = None
    if isinstance(usage, Mapping):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt_tokens = pt if isinstance(pt, int) and not isinstance(pt, bool) else None
        completion_tokens = ct if isinstance(ct, int) and not isinstance(ct, bool) else None
    return _Parsed(choices, prompt_tokens, completion_tokens)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(value, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return max(value, 0.0) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _error_detail(content: bytes) -> str:
    try:
        payload = json.loads(content)
        msg = payload["error"]["message"] if isinstance(payload.get("error"), Mapping) else payload
        text = str(msg)
    except (ValueError, TypeError, KeyError, AttributeError):
        text = content[:200].decode("utf-8", "replace")
    return text[:200]


def _interpret(
    status: int, headers: Mapping[str, str], content: bytes, endpoint: str
) -> _Parsed | _Failure:
    """Turn one HTTP response into a parsed completion or a classified failure."""
    if 200 <= status < 300:
        try:
            return _parse_body(content, endpoint)
        except _Malformed as exc:
            return _Failure("malformed_response", status, True, detail=str(exc))
    retryable = status >= 500 or status in _RETRY_4XX
    return _Failure(
        f"http_{status}",
        status,
        retryable,
        retry_after=_retry_after(headers) if retryable else None,
        detail=_error_detail(content),
    )


def _transport_failure(exc: Exception, httpx: Any) -> _Failure:
    if isinstance(exc, httpx.TimeoutException):
        return _Failure("timeout", None, True, detail=type(exc).__name__)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return _Failure("invalid_url", None, False, detail=str(exc))
    if isinstance(exc, httpx.TransportError):
        return _Failure("connection", None, True, detail=f"{type(exc).__name__}: {exc}")
    # Content decoding errors and the like: the server answered with garbage.
    return _Failure("malformed_response", None, True, detail=f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class _Settings:
    """Validated parameters of one call (the key is resolved and never printed)."""

    model: str
    url: str
    endpoint: str
    timeout: float
    max_retries: int
    backoff_base: float
    backoff_max: float
    max_retry_time: float
    max_concurrency: int
    logprobs: bool
    top_logprobs: int
    system_prompt: str | None
    extra_body: dict[str, Any]
    api_key: str | None = field(repr=False)


class _RetryState:
    """Bookkeeping of one logical request across its attempts (shared by sync and async)."""

    def __init__(self, settings: _Settings, model: OpenAIModel) -> None:
        self.settings = settings
        self.model = model
        self.start = time.monotonic()
        self.attempts = 0
        self.history: list[str] = []

    def attempt_timeout(self) -> float:
        """Timeout of the next attempt: retries never run past ``max_retry_time``."""
        s = self.settings
        if self.attempts == 0:
            return s.timeout
        remaining = s.max_retry_time - (time.monotonic() - self.start)
        return max(min(s.timeout, remaining), 1e-3)

    def on_failure(self, failure: _Failure) -> float:
        """Seconds to sleep before the next attempt, or raise :class:`CloudError`."""
        s = self.settings
        self.history.append(failure.reason)
        elapsed = time.monotonic() - self.start
        give_up = ""
        delay = 0.0
        if not failure.retryable:
            give_up = "not retryable"
        elif self.attempts > s.max_retries:
            give_up = f"max_retries={s.max_retries} exhausted"
        else:
            if failure.retry_after is not None:
                delay = min(failure.retry_after, s.backoff_max)
            else:
                cap = min(s.backoff_max, s.backoff_base * 2.0 ** (self.attempts - 1))
                delay = self.model._jitter(cap)
            if elapsed + delay >= s.max_retry_time:
                give_up = f"max_retry_time={s.max_retry_time:g}s exhausted"
        if give_up:
            self.model._add_usage(failures=1)
            detail = self.model._redact(failure.detail)
            raise CloudError(
                f"{s.url} failed after {self.attempts} attempt(s) "
                f"({', '.join(self.history)}; {give_up})" + (f": {detail}" if detail else ""),
                reason=failure.reason,
                status=failure.status,
                attempts=self.attempts,
            )
        self.model._add_usage(retries=1)
        logger.debug(
            "POST %s attempt %d failed (%s); retrying in %.3fs",
            s.url, self.attempts, failure.reason, delay,
        )
        return delay


# --------------------------------------------------------------------------- the model


class OpenAIModel(ParamsMixin):
    """A model behind an OpenAI-compatible ``/v1/chat/completions`` or ``/v1/completions``.

    Implements the :class:`~confroute.models.LanguageModel` protocol. The prompts
    of a batch are sent concurrently (at most ``max_concurrency`` requests in
    flight per model, across threads); each prompt is one request asking for
    ``config.n`` choices. Servers that ignore ``n`` (some llama.cpp builds return
    one choice) are topped up with further requests for the missing choices;
    when a sampling seed is given, top-up request ``j`` uses ``seed + j`` so the
    extra draws are not copies of the first.

    Parameters
    ----------
    model : str
        Model name sent in the ``model`` field of each request.
    base_url : str, default="https://api.openai.com/v1"
        Root of the API, ending in ``/v1`` for most servers
        (e.g. ``"http://127.0.0.1:8000/v1"`` for vLLM).
    api_key : str or None, default=None
        Bearer token. When None it is read from the environment variable
        ``api_key_env`` at each call; when that is unset too no
        ``Authorization`` header is sent (local servers usually need none). The
        key is kept out of ``repr``, :meth:`get_params`, logs, error messages
        and pickled state: ``get_params()["api_key"]`` is always None.
    api_key_env : str or None, default="OPENAI_API_KEY"
        Environment variable holding the key when ``api_key`` is None.
    endpoint : {"chat", "completions"}, default="chat"
        ``"chat"`` posts ``messages`` to ``/chat/completions``; ``"completions"``
        posts a raw ``prompt`` string to ``/completions`` (conversation prompts
        are refused there; ``system_prompt`` is prepended followed by a blank line).
    timeout : float, default=30.0
        Seconds allowed for each attempt (connect, write, read and pool wait).
    max_retries : int, default=4
        Retries after the first attempt, so at most ``max_retries + 1`` attempts.
    backoff_base, backoff_max : float, default=0.5, 8.0
        Exponential backoff with full jitter: before retry ``j`` (1-based) sleep
        ``uniform(0, min(backoff_max, backoff_base * 2**(j - 1)))`` seconds. A
        ``Retry-After`` (or ``retry-after-ms``) header replaces the draw, capped
        at ``backoff_max``.
    max_retry_time : float, default=60.0
        Bound in seconds on the time one request may spend retrying, measured
        from its first attempt: a retry whose sleep would end past it is not
        made, and retry attempts get a timeout cut to the time left.
    max_concurrency : int, default=8
        Maximum number of requests in flight at once for this model.
    logprobs : bool, default=True
        Ask for token log-probabilities (``logprobs``/``top_logprobs``) and fill
        ``Sample.token_logprobs`` and ``Sample.token_entropies`` when served.
    top_logprobs : int, default=5
        Alternatives requested per token (0-20). Entropies are approximated from
        them (see :func:`approximate_entropy`); with 0, entropies stay None.
    system_prompt : str or None, default=None
        System message prepended to string prompts (not to conversations).
    extra_body : mapping or None, default=None
        Extra JSON fields merged into every request body, overriding the ones
        built here (e.g. ``{"top_k": 20}`` for vLLM, ``{"max_completion_tokens": 64}``).
    name : str or None, default=None
        Name used in reports; defaults to ``model``.
    price_table : mapping or None, default=None
        ``{"prompt": p, "completion": c}``: prices **per one million tokens**
        (any currency) used by :meth:`cost_of`. None means cost 0.
    seed : int or None, default=None
        Seed of the retry-jitter random generator (not the sampling seed, which
        is ``GenerationConfig.seed``).

    Notes
    -----
    Retried: connection errors, timeouts, HTTP 408, 409, 429 and 5xx, and 2xx
    bodies that are not a valid completion (truncated or malformed JSON). Other
    4xx are raised at once. When retries are exhausted a
    :class:`~confroute.errors.CloudError` is raised with ``reason`` (``"timeout"``,
    ``"connection"``, ``"http_429"``, ``"http_500"``, ``"malformed_response"``,
    ``"http_400"``, ...), the last HTTP ``status`` and the number of ``attempts``.

    ``GenerationConfig.top_k`` is not part of the OpenAI API and is not sent;
    pass it through ``extra_body`` to servers that accept it.

    Examples
    --------
    >>> from confroute.models import OpenAIModel
    >>> cloud = OpenAIModel("meta-llama/Llama-3.1-70B-Instruct",
    ...                     base_url="http://gpu-box:8000/v1", max_concurrency=16)
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        endpoint: str = "chat",
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_retry_time: float = 60.0,
        max_concurrency: int = 8,
        logprobs: bool = True,
        top_logprobs: int = 5,
        system_prompt: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        name: str | None = None,
        price_table: Mapping[str, float] | None = None,
        seed: int | None = None,
    ) -> None:
        self._init_runtime()
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.endpoint = endpoint
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_time = max_retry_time
        self.max_concurrency = max_concurrency
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.system_prompt = system_prompt
        self.extra_body = extra_body
        self.name = name
        self.price_table = price_table
        self.seed = seed

    # -- runtime state (never part of params, never pickled) -----------------

    def _init_runtime(self) -> None:
        self._api_key: str | None = None
        self._name: str | None = None
        self._lock = threading.Lock()
        self._client: Any = None
        self._thread_sem: threading.BoundedSemaphore | None = None
        self._client_limit = 0
        self._async: tuple[asyncio.AbstractEventLoop, Any, asyncio.Semaphore, int] | None = None
        self._rng: random.Random | None = None
        self._usage = dict.fromkeys(_USAGE_KEYS, 0)
        # Per-sample billing (prompt-token share, completion tokens) for cost_of.
        self._billing: weakref.WeakKeyDictionary[Sample, tuple[float, int]] = (
            weakref.WeakKeyDictionary()
        )

    def __getstate__(self) -> dict[str, Any]:
        # Only the public parameters travel: no key, no clients, no locks.
        return {"params": self.get_params(deep=False)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._init_runtime()
        for key, value in state["params"].items():
            setattr(self, key, value)

    def __sklearn_clone__(self) -> OpenAIModel:
        # An in-memory clone keeps working with an explicit key without exposing it.
        twin = type(self)(**self.get_params(deep=False))
        twin._api_key = self._api_key
        return twin

    @property
    def api_key(self) -> None:
        """Always None: the key is write-only so it never leaks into params or files."""
        return None

    @api_key.setter
    def api_key(self, value: str | None) -> None:
        self._api_key = value

    @property
    def name(self) -> str:
        """Name of the model in reports (``model`` unless given)."""
        return self._name if self._name is not None else str(self.model)

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = value

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        params = super().get_params(deep=deep)
        params["name"] = self._name
        params["api_key"] = None
        return params

    def __repr__(self) -> str:
        import inspect

        sig = inspect.signature(type(self).__init__)
        shown = [f"{self.model!r}"]
        for key, value in self.get_params(deep=False).items():
            if key == "model" or key == "api_key":
                continue
            if value is not sig.parameters[key].default and value != sig.parameters[key].default:
                shown.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- validation ----------------------------------------------------------

    def _settings(self) -> _Settings:
        o = _OWNER
        if not isinstance(self.model, str) or not self.model:
            raise param_error("model", o, "a non-empty str", self.model,
                              type_error=not isinstance(self.model, str))
        if not isinstance(self.base_url, str) or not self.base_url.startswith(
            ("http://", "https://")
        ):
            raise param_error("base_url", o, "an http:// or https:// URL", self.base_url,
                              type_error=not isinstance(self.base_url, str))
        if self._api_key is not None and not isinstance(self._api_key, str):
            # Never echo the value: it may be a secret of the wrong type.
            raise InvalidTypeError(
                f"The 'api_key' parameter of {o} must be a str or None. "
                f"Got a value of type {type(self._api_key).__name__}."
            )
        if self.api_key_env is not None and not isinstance(self.api_key_env, str):
            raise param_error("api_key_env", o, "a str or None", self.api_key_env,
                              type_error=True)
        endpoint = check_choice(self.endpoint, "endpoint", o, ("chat", "completions"))
        timeout = check_float(self.timeout, "timeout", o, min_value=0.0, min_inclusive=False)
        max_retries = check_int(self.max_retries, "max_retries", o, min_value=0)
        backoff_base = check_float(self.backoff_base, "backoff_base", o, min_value=0.0)
        backoff_max = check_float(self.backoff_max, "backoff_max", o, min_value=0.0)
        max_retry_time = check_float(self.max_retry_time, "max_retry_time", o, min_value=0.0)
        max_conc = check_int(self.max_concurrency, "max_concurrency", o, min_value=1)
        logprobs = check_bool(self.logprobs, "logprobs", o)
        top = check_int(self.top_logprobs, "top_logprobs", o, min_value=0, max_value=20)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise param_error("system_prompt", o, "a str or None", self.system_prompt,
                              type_error=True)
        extra = self.extra_body
        if extra is not None and (
            not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra)
        ):
            raise param_error("extra_body", o, "a mapping with str keys or None", extra,
                              type_error=True)
        if self._name is not None and not isinstance(self._name, str):
            raise param_error("name", o, "a str or None", self._name, type_error=True)
        self._check_price_table()
        check_int(self.seed, "seed", o, allow_none=True)
        key = self._api_key
        if key is None and self.api_key_env:
            key = os.environ.get(self.api_key_env) or None
        path = "/chat/completions" if endpoint == "chat" else "/completions"
        assert timeout is not None and max_retries is not None and backoff_base is not None
        assert backoff_max is not None and max_retry_time is not None and max_conc is not None
        assert top is not None
        return _Settings(
            model=self.model,
            url=self.base_url.rstrip("/") + path,
            endpoint=endpoint,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            max_retry_time=max_retry_time,
            max_concurrency=max_conc,
            logprobs=logprobs,
            top_logprobs=top,
            system_prompt=self.system_prompt,
            extra_body=dict(extra or {}),
            api_key=key,
        )

    def _check_price_table(self) -> tuple[float, float] | None:
        table = self.price_table
        if table is None:
            return None
        expected = "a mapping {'prompt': float >= 0, 'completion': float >= 0} or None"
        if not isinstance(table, Mapping):
            raise param_error("price_table", _OWNER, expected, table, type_error=True)
        if set(table) != {"prompt", "completion"}:
            raise param_error("price_table", _OWNER, expected, table)
        prices = []
        for key in ("prompt", "completion"):
            value = table[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise param_error("price_table", _OWNER, expected, table)
            prices.append(float(value))
        return prices[0], prices[1]

    # -- small shared helpers ------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in (self._api_key, os.environ.get(self.api_key_env or "") or None):
            if isinstance(secret, str) and secret:
                text = text.replace(secret, "***")
        return text

    def _jitter(self, cap: float) -> float:
        with self._lock:
            if self._rng is None:
                self._rng = random.Random(self.seed)
            return self._rng.uniform(0.0, cap) if cap > 0 else 0.0

    def _add_usage(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._usage[key] += value

    @staticmethod
    def _headers(s: _Settings) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if s.api_key:
            headers["Authorization"] = f"Bearer {s.api_key}"
        return headers

    def _body(self, s: _Settings, prompt: Prompt, config: GenerationConfig, n: int,
              round_: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": s.model}
        if s.endpoint == "chat":
            if isinstance(prompt, str):
                messages = [{"role": "user", "content": prompt}]
                if s.system_prompt is not None:
                    messages.insert(0, {"role": "system", "content": s.system_prompt})
            else:
                messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
            body["messages"] = messages
        else:
            if not isinstance(prompt, str):
                raise InvalidParameterError(
                    "The 'prompts' parameter of OpenAIModel.generate must hold plain strings "
                    "when endpoint='completions' (a raw completion has no chat template); "
                    "use endpoint='chat' for conversations."
                )
            body["prompt"] = (
                prompt if s.system_prompt is None else f"{s.system_prompt}\n\n{prompt}"
            )
        body.update(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            n=n,
        )
        if config.seed is not None:
            body["seed"] = config.seed + round_
        if config.stop:
            body["stop"] = list(config.stop)
        if s.logprobs:
            if s.endpoint == "chat":
                body["logprobs"] = True
                body["top_logprobs"] = s.top_logprobs
            else:
                body["logprobs"] = s.top_logprobs
        body.update(s.extra_body)
        return body

    def _samples(self, parsed: _Parsed, want: int) -> list[Sample]:
        """Samples from a parsed response, recording usage and per-sample billing."""
        choices = parsed.choices[:want]
        counted = [len(c.logprobs) if c.logprobs is not None else None for c in choices]
        if parsed.completion_tokens is not None:
            total = parsed.completion_tokens
        else:
            total = sum(c for c in counted if c is not None)
        # Choices without logprobs get an even split of what usage does not account for.
        unknown = [i for i, c in enumerate(counted) if c is None]
        if unknown:
            rest = max(total - sum(c for c in counted if c is not None), 0)
            share, extra = divmod(rest, len(unknown))
            for j, i in enumerate(unknown):
                counted[i] = share + (1 if j < extra else 0)
        prompt_share = (parsed.prompt_tokens or 0) / len(choices)
        out = []
        with self._lock:
            self._usage["prompt_tokens"] += parsed.prompt_tokens or 0
            self._usage["completion_tokens"] += total
            for c, n_tok in zip(choices, counted):
                sample = Sample(
                    text=c.text,
                    token_logprobs=c.logprobs,
                    token_entropies=c.entropies,
                    finish_reason=c.finish_reason,
                    prompt_tokens=parsed.prompt_tokens,
                )
                self._billing[sample] = (prompt_share, int(n_tok or 0))
                out.append(sample)
        return out

    def _check_inputs(self, prompts: Any, config: Any, where: str) -> list[Prompt]:
        if not isinstance(config, GenerationConfig):
            raise param_error("config", where, "a GenerationConfig", config, type_error=True)
        checked = check_prompts(prompts, where)
        if config.top_k and "top_k" not in (self.extra_body or {}):
            warnings.warn(
                "GenerationConfig.top_k is not part of the OpenAI API and is not sent; pass "
                "extra_body={'top_k': k} to servers that accept it.",
                UserWarning,
                stacklevel=3,
            )
        return checked

    # -- sync path -----------------------------------------------------------

    def _sync_client(self, s: _Settings) -> tuple[Any, threading.BoundedSemaphore]:
        httpx = _import_httpx()
        with self._lock:
            # A changed max_concurrency (set_params) gets a fresh pool and semaphore.
            if self._client is None or self._thread_sem is None or (
                self._client_limit != s.max_concurrency
            ):
                self._client_limit = s.max_concurrency
                limits = httpx.Limits(
                    max_connections=s.max_concurrency,
                    max_keepalive_connections=s.max_concurrency,
                )
                self._client = httpx.Client(limits=limits, timeout=s.timeout)
                self._thread_sem = threading.BoundedSemaphore(s.max_concurrency)
            return self._client, self._thread_sem

    def _post(self, s: _Settings, body: dict[str, Any]) -> _Parsed:
        httpx = _import_httpx()
        client, sem = self._sync_client(s)
        state = _RetryState(s, self)
        while True:
            timeout = state.attempt_timeout()
            with sem:
                state.attempts += 1
                self._add_usage(requests=1)
                try:
                    r = client.post(s.url, json=body, headers=self._headers(s), timeout=timeout)
                    outcome = _interpret(r.status_code, r.headers, r.content, s.endpoint)
                except httpx.HTTPError as exc:
                    outcome = _transport_failure(exc, httpx)
            if isinstance(outcome, _Parsed):
                return outcome
            time.sleep(state.on_failure(outcome))

    def _generate_one(self, s: _Settings, prompt: Prompt, config: GenerationConfig
                      ) -> list[Sample]:
        samples: list[Sample] = []
        round_ = 0
        while len(samples) < config.n:
            want = config.n - len(samples)
            parsed = self._post(s, self._body(s, prompt, config, want, round_))
            samples.extend(self._samples(parsed, want))
            round_ += 1
        return samples

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[Sample]]:
        """Generate ``config.n`` samples for each prompt.

        Parameters
        ----------
        prompts : sequence of Prompt, length n_prompts
            Strings (sent as one user message, after ``system_prompt`` if any)
            or conversations (lists of ``{"role", "content"}``, sent as is).
        config : GenerationConfig
            ``n``, ``temperature``, ``top_p``, ``max_new_tokens`` (as
            ``max_tokens``), ``seed`` and ``stop`` are sent.

        Returns
        -------
        list of list of Sample
            ``config.n`` samples per prompt, in prompt order.

        Raises
        ------
        CloudError
            When a request still fails after its retries (see the class notes).
        """
        s = self._settings()
        checked = self._check_inputs(prompts, config, "OpenAIModel.generate")
        if len(checked) == 1:
            return [self._generate_one(s, checked[0], config)]
        workers = min(s.max_concurrency, len(checked))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="confroute-http") as pool:
            futures: list[Future[list[Sample]]] = [
                pool.submit(self._generate_one, s, p, config) for p in checked
            ]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    # -- async path ----------------------------------------------------------

    def _async_client(self, s: _Settings) -> tuple[Any, asyncio.Semaphore]:
        httpx = _import_httpx()
        loop = asyncio.get_running_loop()
        with self._lock:
            # Async clients and semaphores belong to one event loop; a new loop gets new ones.
            if (
                self._async is None
                or self._async[0] is not loop
                or self._async[3] != s.max_concurrency
            ):
                limits = httpx.Limits(
                    max_connections=s.max_concurrency,
                    max_keepalive_connections=s.max_concurrency,
                )
                client = httpx.AsyncClient(limits=limits, timeout=s.timeout)
                sem = asyncio.Semaphore(s.max_concurrency)
                self._async = (loop, client, sem, s.max_concurrency)
            return self._async[1], self._async[2]

    async def _apost(self, s: _Settings, body: dict[str, Any]) -> _Parsed:
        httpx = _import_httpx()
        client, sem = self._async_client(s)
        state = _RetryState(s, self)
        while True:
            timeout = state.attempt_timeout()
            async with sem:
                state.attempts += 1
                self._add_usage(requests=1)
                try:
                    r = await client.post(
                        s.url, json=body, headers=self._headers(s), timeout=timeout
                    )
                    outcome = _interpret(r.status_code, r.headers, r.content, s.endpoint)
                except httpx.HTTPError as exc:
                    outcome = _transport_failure(exc, httpx)
            if isinstance(outcome, _Parsed):
                return outcome
            await asyncio.sleep(state.on_failure(outcome))

    async def _agenerate_one(self, s: _Settings, prompt: Prompt, config: GenerationConfig
                             ) -> list[Sample]:
        samples: list[Sample] = []
        round_ = 0
        while len(samples) < config.n:
            want = config.n - len(samples)
            parsed = await self._apost(s, self._body(s, prompt, config, want, round_))
            samples.extend(self._samples(parsed, want))
            round_ += 1
        return samples

    async def agenerate(
        self, prompts: Sequence[Prompt], config: GenerationConfig
    ) -> list[list[Sample]]:
        """Asynchronous :meth:`generate` (``httpx.AsyncClient``, same retries and limits).

        At most ``max_concurrency`` requests are in flight at once within one
        event loop.
        """
        s = self._settings()
        checked = self._check_inputs(prompts, config, "OpenAIModel.agenerate")
        tasks = [asyncio.ensure_future(self._agenerate_one(s, p, config)) for p in checked]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    # -- usage and cost ------------------------------------------------------

    @property
    def usage(self) -> dict[str, int]:
        """Totals since creation (or :meth:`reset_usage`), safe under threads.

        ``requests``: HTTP requests sent (retries included); ``prompt_tokens`` and
        ``completion_tokens``: as reported by the server's ``usage`` (completion
        tokens counted from logprobs when ``usage`` is absent); ``retries``:
        attempts that failed and were retried; ``failures``: requests that
        raised :class:`~confroute.errors.CloudError`.
        """
        with self._lock:
            return dict(self._usage)

    def reset_usage(self) -> None:
        """Set every usage counter back to 0."""
        with self._lock:
            self._usage = dict.fromkeys(_USAGE_KEYS, 0)

    def cost_of(self, samples: Sample | Sequence[Sample] | Sequence[Sequence[Sample]]) -> float:
        r"""Cost of generating ``samples`` under ``price_table`` (0 when it is None).

        .. math::

            \text{cost} = \sum_s \frac{\text{prompt}_s \, P_\text{prompt}
                + \text{completion}_s \, P_\text{completion}}{10^6}

        with prices per one million tokens. For samples generated by this model,
        each request's prompt tokens are split evenly over the choices it
        returned (the prompt is billed once per request, not once per choice),
        and completion tokens are the sample's logprob count, or its share of the
        response's ``usage.completion_tokens`` when logprobs were not served.
        Other samples are charged ``sample.prompt_tokens`` and
        ``sample.n_tokens``.

        Parameters
        ----------
        samples : Sample, sequence of Sample, or sequence of sequences of Sample
            For example the output of :meth:`generate`.

        Returns
        -------
        float
        """
        prices = self._check_price_table()
        flat: list[Sample] = []
        stack: list[Any] = [samples]
        while stack:
            item = stack.pop()
            if isinstance(item, Sample):
                flat.append(item)
            elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
                stack.extend(item)
            else:
                raise param_error("samples", "OpenAIModel.cost_of",
                                  "Samples or (nested) sequences of Samples", item,
                                  type_error=True)
        if prices is None:
            return 0.0
        total = 0.0
        with self._lock:
            for sample in flat:
                record = self._billing.get(sample)
                if record is None:
                    record = (float(sample.prompt_tokens or 0), sample.n_tokens)
                total += record[0] * prices[0] + record[1] * prices[1]
        return total / 1e6

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP client(s); the model stays usable and reconnects on demand."""
        with self._lock:
            client, self._client, self._thread_sem = self._client, None, None
            self._async = None  # bound to its loop; use ``aclose`` inside it to close cleanly
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the sync client and the async client of the running loop."""
        with self._lock:
            state, self._async = self._async, None
        self.close()
        if state is not None and state[0] is asyncio.get_running_loop():
            await state[1].aclose()

    def __enter__(self) -> OpenAIModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> OpenAIModel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
