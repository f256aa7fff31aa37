"""OpenAI wire format: request bodies, response and logprob parsing, and the top-k
entropy approximation. Pure functions; no I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from confroute.errors import InvalidParameterError
from confroute.types import GenerationConfig, Prompt

__all__ = [
    "LENGTH_REASONS",
    "Choice",
    "Failure",
    "Malformed",
    "Parsed",
    "Settings",
    "approximate_entropy",
    "error_detail",
    "parse_body",
    "request_body",
    "request_headers",
    "token_stats",
]

LENGTH_REASONS = frozenset({"length", "max_tokens", "model_length"})


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


class Malformed(Exception):
    """A 2xx response whose body is not a usable completion."""


@dataclass(frozen=True)
class Choice:
    """One parsed choice; ``logprobs``/``entropies`` of shape (n_tokens,) when served.

    ``raw`` keeps what the server sent that confroute does not interpret, as
    received: ``"message"`` (chat: the message object, with ``tool_calls``,
    ``refusal``, ...), ``"finish_reason"`` (the server's string) and
    ``"logprobs"`` (the logprobs object) and ``"usage"`` (the response's usage
    object, shared by its choices), each only when present.
    """

    text: str
    logprobs: np.ndarray | None
    entropies: np.ndarray | None
    finish_reason: Literal["stop", "length"]
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Parsed:
    """A usable completion: its choices (in index order) and its reported usage."""

    choices: list[Choice]
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class Failure:
    """A classified failed attempt (``reason`` as in :class:`~confroute.errors.CloudError`)."""

    reason: str
    status: int | None
    retryable: bool
    retry_after: float | None = None
    detail: str = ""


def finish_of(reason: Any) -> Literal["stop", "length"]:
    """``"length"`` for the servers' names of a length cut, else ``"stop"``."""
    return "length" if isinstance(reason, str) and reason in LENGTH_REASONS else "stop"


def token_stats(
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
        raise Malformed(f"expected a number for a logprob, got {type(value).__name__}")
    return float(value)


def chat_logprobs(lp: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not isinstance(lp, Mapping) or not isinstance(lp.get("content"), list):
        return None, None
    rows = []
    for item in lp["content"]:
        if not isinstance(item, Mapping):
            raise Malformed("logprobs.content entries must be objects")
        top_raw = item.get("top_logprobs") or []
        if not isinstance(top_raw, list):
            raise Malformed("top_logprobs must be a list")
        top = [
            (t.get("token"), _as_float(t.get("logprob")))
            for t in top_raw
            if isinstance(t, Mapping)
        ]
        rows.append((item.get("token"), _as_float(item.get("logprob")), top))
    return token_stats(rows)


def completion_logprobs(lp: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not isinstance(lp, Mapping) or not isinstance(lp.get("token_logprobs"), list):
        return None, None
    tokens = lp.get("tokens") or [None] * len(lp["token_logprobs"])
    tops = lp.get("top_logprobs") or [None] * len(lp["token_logprobs"])
    if not isinstance(tokens, list) or not isinstance(tops, list):
        raise Malformed("logprobs.tokens and logprobs.top_logprobs must be lists")
    rows = []
    for tok, value, top in zip(tokens, lp["token_logprobs"], tops):
        if value is None:  # the first token of an echoed prompt has no logprob
            continue
        cands = (
            [(str(t), _as_float(v)) for t, v in top.items()] if isinstance(top, Mapping) else []
        )
        rows.append((tok, _as_float(value), cands))
    return token_stats(rows)


def parse_body(content: bytes, endpoint: str) -> Parsed:
    """Parse an OpenAI-shaped completion body; raise :class:`Malformed` if unusable."""
    try:
        payload = json.loads(content)
    except ValueError as exc:
        raise Malformed(f"body is not valid JSON ({exc})") from None
    if not isinstance(payload, Mapping):
        raise Malformed("body is not a JSON object")
    raw = payload.get("choices")
    if not isinstance(raw, list) or not raw:
        raise Malformed("body has no 'choices' list")
    if any(not isinstance(c, Mapping) for c in raw):
        raise Malformed("'choices' entries must be objects")
    if all(isinstance(c.get("index"), int) for c in raw):
        raw = sorted(raw, key=lambda c: c["index"])
    usage = payload.get("usage")
    choices = []
    for c in raw:
        if endpoint == "chat":
            msg = c.get("message")
            if not isinstance(msg, Mapping):
                raise Malformed("chat choice has no 'message' object")
            text = msg.get("content")
            logprobs, entropies = chat_logprobs(c.get("logprobs"))
        else:
            text = c.get("text")
            logprobs, entropies = completion_logprobs(c.get("logprobs"))
        if text is not None and not isinstance(text, str):
            raise Malformed("choice text is not a string")
        raw = {k: v for k, v in (("message", c.get("message")),
                                 ("finish_reason", c.get("finish_reason")),
                                 ("logprobs", c.get("logprobs")), ("usage", usage))
               if v is not None}
        choices.append(Choice(text or "", logprobs, entropies, finish_of(c.get("finish_reason")),
                              raw))
    prompt_tokens = completion_tokens = None
    if isinstance(usage, Mapping):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt_tokens = pt if isinstance(pt, int) and not isinstance(pt, bool) else None
        completion_tokens = ct if isinstance(ct, int) and not isinstance(ct, bool) else None
    return Parsed(choices, prompt_tokens, completion_tokens)


def error_detail(content: bytes) -> str:
    """At most 200 characters of an error body: its ``error.message`` when it has one."""
    try:
        payload = json.loads(content)
        msg = payload["error"]["message"] if isinstance(payload.get("error"), Mapping) else payload
        text = str(msg)
    except (ValueError, TypeError, KeyError, AttributeError):
        text = content[:200].decode("utf-8", "replace")
    return text[:200]


@dataclass(frozen=True)
class Settings:
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
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    basic_auth: str | None = field(default=None, repr=False)
    #: Per-request body fields (:func:`~confroute.models.openai.request_fields`).
    request_fields: dict[str, Any] = field(default_factory=dict, repr=False)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` without its ``user:password@`` part, and that part as a Basic token.

    The credentials then travel in a header only, so the URL that is requested,
    logged (httpx logs each request's URL) and shown in errors holds no secret.

    Returns
    -------
    url : str
    basic : str or None
        ``base64("user:password")``, or None when the URL has no user information.
    """
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=host)), token


def request_headers(s: Settings) -> dict[str, str]:
    """JSON headers, the configured extra headers, and the credentials when there are some.

    Credentials from the URL win over the bearer key, as they would in httpx.
    """
    headers = {"Content-Type": "application/json", "Accept": "application/json", **s.headers}
    if s.api_key:
        headers["Authorization"] = f"Bearer {s.api_key}"
    if s.basic_auth:
        headers["Authorization"] = f"Basic {s.basic_auth}"
    return headers

def request_body(
    s: Settings, prompt: Prompt, config: GenerationConfig, n: int, round_: int
) -> dict[str, Any]:
    """JSON body asking for ``n`` choices of ``prompt``; ``round_`` offsets the seed
    of top-up requests (servers that ignore ``n``) so their draws differ."""
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
    # a client's own fields (tools, response_format, ...), then the operator's extra_body
    body.update((k, v) for k, v in s.request_fields.items()
                if s.endpoint == "chat" or k != "messages")
    body.update(s.extra_body)
    return body
