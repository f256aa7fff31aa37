"""Retry policy of :class:`~confroute.models.openai.OpenAIModel`: which failures are
transient, how long to wait (``Retry-After`` or exponential backoff with full
jitter), and when to give up with a :class:`~confroute.errors.CloudError`."""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from confroute.errors import CloudError
from confroute.models.openai.wire import (
    Failure,
    Malformed,
    Parsed,
    Settings,
    error_detail,
    parse_body,
)

__all__ = ["RETRY_4XX", "RetryState", "interpret", "retry_after", "transport_failure"]

logger = logging.getLogger("confroute.models.openai")

# 408 (request timeout), 409 (conflict, e.g. a lock) and 429 (rate limit) are transient.
RETRY_4XX = frozenset({408, 409, 429})


def retry_after(headers: Mapping[str, str]) -> float | None:
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


def interpret(
    status: int, headers: Mapping[str, str], content: bytes, endpoint: str
) -> Parsed | Failure:
    """Turn one HTTP response into a parsed completion or a classified failure."""
    if 200 <= status < 300:
        try:
            return parse_body(content, endpoint)
        except Malformed as exc:
            return Failure("malformed_response", status, True, detail=str(exc))
    retryable = status >= 500 or status in RETRY_4XX
    return Failure(
        f"http_{status}",
        status,
        retryable,
        retry_after=retry_after(headers) if retryable else None,
        detail=error_detail(content),
    )


def transport_failure(exc: Exception, httpx: Any) -> Failure:
    if isinstance(exc, httpx.TimeoutException):
        return Failure("timeout", None, True, detail=type(exc).__name__)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return Failure("invalid_url", None, False, detail=str(exc))
    if isinstance(exc, httpx.TransportError):
        return Failure("connection", None, True, detail=f"{type(exc).__name__}: {exc}")
    # Content decoding errors and the like: the server answered with garbage.
    return Failure("malformed_response", None, True, detail=f"{type(exc).__name__}: {exc}")


class RetryState:
    """Bookkeeping of one logical request across its attempts (shared by sync and async).

    Parameters
    ----------
    settings : Settings
    jitter : callable
        ``jitter(cap)`` draws the full-jitter sleep in [0, cap].
    count : callable
        ``count(retries=1)`` / ``count(failures=1)`` updates the model's usage.
    redact : callable
        Removes secrets from a server's error detail before it is raised.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        jitter: Callable[[float], float],
        count: Callable[..., None],
        redact: Callable[[str], str],
    ) -> None:
        self.settings = settings
        self.jitter = jitter
        self.count = count
        self.redact = redact
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

    def on_failure(self, failure: Failure) -> float:
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
                delay = self.jitter(cap)
            if elapsed + delay >= s.max_retry_time:
                give_up = f"max_retry_time={s.max_retry_time:g}s exhausted"
        if give_up:
            self.count(failures=1)
            detail = self.redact(failure.detail)
            raise CloudError(
                f"{self.redact(s.url)} failed after {self.attempts} attempt(s) "
                f"({', '.join(self.history)}; {give_up})" + (f": {detail}" if detail else ""),
                reason=failure.reason,
                status=failure.status,
                attempts=self.attempts,
            )
        self.count(retries=1)
        logger.debug(
            "POST %s attempt %d failed (%s); retrying in %.3fs",
            self.redact(s.url), self.attempts, failure.reason, delay,
        )
        return delay
