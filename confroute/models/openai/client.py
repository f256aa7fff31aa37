"""HTTP client lifecycle of :class:`~confroute.models.openai.OpenAIModel`.

``httpx`` is imported only when a request is made (optional extra ``http``), and
clients are created lazily, so constructing a model never opens a connection.
One sync client (with a thread semaphore) serves all threads; async clients and
their semaphores belong to one event loop, so a new loop gets new ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from confroute.models.openai.retry import RetryState, interpret, transport_failure
from confroute.models.openai.wire import Parsed, Settings, request_headers

__all__ = ["HTTP_HINT", "ClientPool", "import_httpx"]

HTTP_HINT = 'OpenAIModel needs httpx; install it with: pip install "confroute[http]"'


def import_httpx() -> Any:
    """The ``httpx`` module, or :class:`~confroute.errors.MissingDependencyError`."""
    try:
        import httpx
    except ImportError as exc:  # pragma: no cover - httpx is installed in the test env
        from confroute.errors import MissingDependencyError

        raise MissingDependencyError(HTTP_HINT) from exc
    return httpx


class ClientPool:
    """Lazily created httpx clients bounded to ``max_concurrency`` requests in flight.

    A changed ``max_concurrency`` gets a fresh pool and semaphore. Safe under threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Any = None
        self._thread_sem: threading.BoundedSemaphore | None = None
        self._limit = 0
        self._async: tuple[asyncio.AbstractEventLoop, Any, asyncio.Semaphore, int] | None = None

    @property
    def is_open(self) -> bool:
        """Whether a sync or async client currently exists."""
        with self._lock:
            return self._client is not None or self._async is not None

    def sync_client(self, s: Settings) -> tuple[Any, threading.BoundedSemaphore]:
        """The sync client and its semaphore, created on first use."""
        httpx = import_httpx()
        with self._lock:
            if self._client is None or self._thread_sem is None or (
                self._limit != s.max_concurrency
            ):
                self._limit = s.max_concurrency
                limits = httpx.Limits(
                    max_connections=s.max_concurrency,
                    max_keepalive_connections=s.max_concurrency,
                )
                self._client = httpx.Client(limits=limits, timeout=s.timeout)
                self._thread_sem = threading.BoundedSemaphore(s.max_concurrency)
            return self._client, self._thread_sem

    def async_client(self, s: Settings) -> tuple[Any, asyncio.Semaphore]:
        """The async client and semaphore of the running event loop."""
        httpx = import_httpx()
        loop = asyncio.get_running_loop()
        with self._lock:
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

    def close(self) -> None:
        """Close the sync client; forget the async one (bound to its loop: use
        :meth:`aclose` inside it to close it cleanly)."""
        with self._lock:
            client, self._client, self._thread_sem = self._client, None, None
            self._async = None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the sync client and the async client of the running loop."""
        with self._lock:
            state, self._async = self._async, None
        self.close()
        if state is not None and state[0] is asyncio.get_running_loop():
            await state[1].aclose()

    def post(
        self, s: Settings, body: dict[str, Any], state: RetryState, count: Callable[..., None]
    ) -> Parsed:
        """POST ``body`` with retries; ``count(requests=1)`` per attempt.

        Raises
        ------
        CloudError
            When ``state`` gives up.
        """
        httpx = import_httpx()
        client, sem = self.sync_client(s)
        while True:
            timeout = state.attempt_timeout()
            with sem:
                state.attempts += 1
                count(requests=1)
                try:
                    r = client.post(s.url, json=body, headers=request_headers(s),
                                    timeout=timeout)
                    outcome = interpret(r.status_code, r.headers, r.content, s.endpoint)
                except httpx.HTTPError as exc:
                    outcome = transport_failure(exc, httpx)
            if isinstance(outcome, Parsed):
                return outcome
            time.sleep(state.on_failure(outcome))

    async def apost(
        self, s: Settings, body: dict[str, Any], state: RetryState, count: Callable[..., None]
    ) -> Parsed:
        """Asynchronous :meth:`post`."""
        httpx = import_httpx()
        client, sem = self.async_client(s)
        while True:
            timeout = state.attempt_timeout()
            async with sem:
                state.attempts += 1
                count(requests=1)
                try:
                    r = await client.post(s.url, json=body, headers=request_headers(s),
                                          timeout=timeout)
                    outcome = interpret(r.status_code, r.headers, r.content, s.endpoint)
                except httpx.HTTPError as exc:
                    outcome = transport_failure(exc, httpx)
            if isinstance(outcome, Parsed):
                return outcome
            await asyncio.sleep(state.on_failure(outcome))
