"""A language model served behind an OpenAI-compatible HTTP API.

:class:`OpenAIModel` talks to ``/v1/chat/completions`` (default) or
``/v1/completions`` of OpenAI itself or of any compatible server (vLLM,
llama.cpp ``llama-server``, TGI, LiteLLM, ...). It is the usual *cloud* model
of a router, and can also be the *edge* model when the small model is served
over HTTP.

The package is split by job: :mod:`~confroute.models.openai.wire` (request
bodies, response and logprob parsing, top-k entropy),
:mod:`~confroute.models.openai.retry` (which failures are retried and how long to
wait), :mod:`~confroute.models.openai.client` (the ``openai`` SDK as transport) and
:mod:`~confroute.models.openai.cost` (price table, per-sample billing). This
module holds the model: its parameters, their validation, and the generation loop.

``httpx`` and ``openai`` are imported only when a request is made (extra ``http``).
Clients are created lazily, so constructing a model never opens a connection.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from confroute._params import ParamsMixin
from confroute._validation import (
    check_bool,
    check_choice,
    check_float,
    check_http_url,
    check_int,
    check_prompts,
    has_control_chars,
    param_error,
)
from confroute.errors import InvalidTypeError, redact, url_secrets
from confroute.models.openai.client import ClientPool
from confroute.models.openai.context import current_request_fields, request_fields
from confroute.models.openai.cost import (
    Billing,
    check_price_table,
    completion_split,
    flatten_samples,
)
from confroute.models.openai.retry import RetryState
from confroute.models.openai.wire import (
    Parsed,
    Settings,
    approximate_entropy,
    request_body,
    split_userinfo,
)
from confroute.types import GenerationConfig, Prompt, Sample

__all__ = ["OpenAIModel", "approximate_entropy", "current_request_fields", "request_fields"]

_OWNER = "OpenAIModel"
_USAGE_KEYS = ("requests", "prompt_tokens", "completion_tokens", "failures", "retries")


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
    headers : mapping or None, default=None
        Extra HTTP headers sent with every request (e.g. an ``OpenAI-Organization``
        or a gateway's routing header); ``Authorization`` comes from the key.
        Header values are kept out of error messages.
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

    Per-request body fields (a client's ``tools``, ``response_format``,
    ``user``, ...) are added inside a
    :func:`~confroute.models.openai.request_fields` block; the reply's
    uninterpreted parts (the chat ``message`` with its ``tool_calls``, the
    server's own ``finish_reason``, the raw ``logprobs``) are kept in
    ``Sample.extra``. Entropies approximated from ``top_logprobs`` are marked
    ``Sample.entropy_kind == "top_k_bound"``.

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
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._init_runtime()
        self.model = model
        if isinstance(base_url, str) and has_control_chars(base_url):
            # Refused now (the rest is checked at first use): a CR/LF must never be
            # stored where it could reach a request line or a log.
            check_http_url(base_url, "base_url", _OWNER)
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
        self.headers = headers

    # -- runtime state (never part of params, never pickled) -----------------

    def _init_runtime(self) -> None:
        self._api_key: str | None = None
        self._name: str | None = None
        self._lock = threading.Lock()
        self._clients = ClientPool()
        self._rng: random.Random | None = None
        self._usage = dict.fromkeys(_USAGE_KEYS, 0)
        # Per-sample billing (prompt-token share, completion tokens) for cost_of.
        self._billing = Billing()

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
                if key == "headers" and isinstance(value, dict):
                    value = {k: "***" for k in value}  # header values may be credentials
                shown.append(f"{key}={self._redact(repr(value))}")
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- validation ----------------------------------------------------------

    def _settings(self) -> Settings:
        o = _OWNER
        if not isinstance(self.model, str) or not self.model:
            raise param_error("model", o, "a non-empty str", self.model,
                              type_error=not isinstance(self.model, str))
        check_http_url(self.base_url, "base_url", o)
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
        hdrs = self.headers
        if hdrs is not None and (not isinstance(hdrs, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hdrs.items()
        )):
            raise param_error("headers", o, "a mapping of str to str or None",
                              "a value", type_error=True)
        if self._name is not None and not isinstance(self._name, str):
            raise param_error("name", o, "a str or None", self._name, type_error=True)
        check_price_table(self.price_table, o)
        check_int(self.seed, "seed", o, allow_none=True)
        key = self._api_key
        if key is None and self.api_key_env:
            key = os.environ.get(self.api_key_env) or None
        path = "/chat/completions" if endpoint == "chat" else "/completions"
        url, basic = split_userinfo(self.base_url)
        assert timeout is not None and max_retries is not None and backoff_base is not None
        assert backoff_max is not None and max_retry_time is not None and max_conc is not None
        assert top is not None
        return Settings(
            model=self.model,
            url=url.rstrip("/") + path,
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
            headers=dict(hdrs or {}),
            basic_auth=basic,
            request_fields=current_request_fields(),
        )

    # -- small shared helpers ------------------------------------------------

    def _redact(self, text: str) -> str:
        env = os.environ.get(self.api_key_env) if isinstance(self.api_key_env, str) else None
        return redact(text, [self._api_key, env, *url_secrets(self.base_url)])

    def _jitter(self, cap: float) -> float:
        with self._lock:
            if self._rng is None:
                self._rng = random.Random(self.seed)
            return self._rng.uniform(0.0, cap) if cap > 0 else 0.0

    def _add_usage(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._usage[key] += value

    def _retry_state(self, s: Settings) -> RetryState:
        return RetryState(s, jitter=self._jitter, count=self._add_usage, redact=self._redact)

    def _samples(self, parsed: Parsed, want: int) -> list[Sample]:
        """Samples from a parsed response, recording usage and per-sample billing."""
        choices = parsed.choices[:want]
        counted, total = completion_split(parsed, want)
        # The prompt is billed once per request: split it over the choices.
        prompt_share = (parsed.prompt_tokens or 0) / len(choices)
        self._add_usage(prompt_tokens=parsed.prompt_tokens or 0, completion_tokens=total)
        out = []
        for c, n_tok in zip(choices, counted):
            sample = Sample(
                text=c.text,
                token_logprobs=c.logprobs,
                token_entropies=c.entropies,
                finish_reason=c.finish_reason,
                prompt_tokens=parsed.prompt_tokens,
                # entropies from the reported top-k alternatives only: a lower bound
                entropy_kind=None if c.entropies is None else "top_k_bound",
                extra=dict(c.raw),
            )
            self._billing.record(sample, prompt_share, n_tok)
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

    def _generate_one(self, s: Settings, prompt: Prompt, config: GenerationConfig
                      ) -> list[Sample]:
        samples: list[Sample] = []
        round_ = 0
        while len(samples) < config.n:
            want = config.n - len(samples)
            body = request_body(s, prompt, config, want, round_)
            parsed = self._clients.post(s, body, self._retry_state(s), self._add_usage)
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

    async def _agenerate_one(self, s: Settings, prompt: Prompt, config: GenerationConfig
                             ) -> list[Sample]:
        samples: list[Sample] = []
        round_ = 0
        while len(samples) < config.n:
            want = config.n - len(samples)
            body = request_body(s, prompt, config, want, round_)
            parsed = await self._clients.apost(s, body, self._retry_state(s), self._add_usage)
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
        prices = check_price_table(self.price_table, _OWNER)
        flat = flatten_samples(samples, "OpenAIModel.cost_of")
        return 0.0 if prices is None else self._billing.cost(flat, prices)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP client(s); the model stays usable and reconnects on demand."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close the sync client and the async client of the running loop."""
        await self._clients.aclose()

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
