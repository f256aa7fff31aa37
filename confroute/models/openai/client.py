"""HTTP transport of :class:`~confroute.models.openai.OpenAIModel`: the official
``openai`` SDK over lazily created ``httpx`` clients.

Each attempt is one low-level SDK call, ``client.post(path, body=body,
cast_to=httpx.Response)``: the body built by :mod:`~confroute.models.openai.wire`
is sent as is (``extra_body`` and unknown fields included) and the raw status,
headers and bytes come back. The SDK clients are created with ``max_retries=0``
and the per-attempt ``timeout``, over an ``httpx.Client`` / ``httpx.AsyncClient``
carrying the connection limits (``max_concurrency``).

What the SDK does not do, and confroute keeps doing on top of it:

- the retry loop and its **overall deadline** (``max_retry_time``, across
  attempts; the SDK's ``timeout`` bounds one attempt only), with the retry
  classification of :mod:`~confroute.models.openai.retry`;
- ``Retry-After`` / ``retry-after-ms`` honoured up to ``backoff_max``, which the
  user may set as high as they like, and never past the deadline (the SDK
  honours at most 120 s in the installed 3.x releases, 60 s in 1.x, and does not
  retry at all above that);
- logprob parsing and the top-k entropy bound (:mod:`~confroute.models.openai.wire`),
  the ``n`` top-up for servers that ignore ``n``, cost accounting, and the
  redaction of keys in errors and reprs (:mod:`confroute.models.openai`);
- keyless servers: no ``Authorization`` header when there is no key (the SDK
  requires one), credentials from the URL as Basic auth, and none of the SDK's
  ``OPENAI_ORG_ID`` / ``OPENAI_PROJECT_ID`` environment headers unless they are
  set in ``headers``.

``httpx`` and ``openai`` are imported only when a request is made (optional extra
``http``), and clients are created lazily, so constructing a model never opens a
connection. One sync client (with a thread semaphore) serves all threads; async
clients and their semaphores belong to one event loop, so a new loop gets new ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confroute.models.openai.retry import RetryState, interpret, transport_failure
from confroute.models.openai.wire import Failure, Parsed, Settings, request_headers

__all__ = ["HTTP_HINT", "ClientPool", "Connection", "import_httpx", "import_sdk"]

HTTP_HINT = (
    'OpenAIModel needs httpx and openai; install them with: pip install "confroute[http]"'
)

# The SDK refuses to build a client without a key; every request carries its own
# Authorization header (or removes it), so this placeholder never reaches a server.
_NO_KEY = "confroute-sends-its-own-authorization"
_ENV_HEADERS = ("OpenAI-Organization", "OpenAI-Project")
_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


def import_httpx() -> Any:
    """The ``httpx`` module, or :class:`~confroute.errors.MissingDependencyError`."""
    try:
        import httpx
    except ImportError as exc:
        from confroute.errors import MissingDependencyError

        raise MissingDependencyError(HTTP_HINT) from exc
    return httpx


def import_sdk() -> tuple[Any, Any]:
    """The ``httpx`` and ``openai`` modules, or
    :class:`~confroute.errors.MissingDependencyError` naming the ``http`` extra."""
    httpx = import_httpx()
    try:
        import openai
    except ImportError as exc:
        from confroute.errors import MissingDependencyError

        raise MissingDependencyError(HTTP_HINT) from exc
    return httpx, openai


@dataclass(frozen=True)
class Connection:
    """An SDK client and the httpx client it sends through.

    Attributes
    ----------
    sdk : openai.OpenAI or openai.AsyncOpenAI
    http : httpx.Client or httpx.AsyncClient
    base_url : str
        The API root the client was built for (the endpoint path is posted to it).
    """

    sdk: Any
    http: Any
    base_url: str

    @property
    def is_closed(self) -> bool:
        """Whether the underlying httpx client is closed."""
        return bool(self.http.is_closed)


def split_url(s: Settings) -> tuple[str, str]:
    """``s.url`` as (API root, endpoint path)."""
    path = _PATHS[s.endpoint]
    return s.url.removesuffix(path), path


def connect(s: Settings, asynchronous: bool) -> Connection:
    """A new SDK client for ``s`` (no connection is opened until the first request)."""
    httpx, openai = import_sdk()
    limits = httpx.Limits(
        max_connections=s.max_concurrency, max_keepalive_connections=s.max_concurrency
    )
    base_url, _ = split_url(s)
    if asynchronous:
        http: Any = httpx.AsyncClient(limits=limits, timeout=s.timeout)
        sdk: Any = openai.AsyncOpenAI(
            api_key=_NO_KEY, base_url=base_url, max_retries=0, timeout=s.timeout,
            http_client=http,
        )
    else:
        http = httpx.Client(limits=limits, timeout=s.timeout)
        sdk = openai.OpenAI(
            api_key=_NO_KEY, base_url=base_url, max_retries=0, timeout=s.timeout,
            http_client=http,
        )
    return Connection(sdk, http, base_url)


def sdk_headers(s: Settings, omit: Any) -> dict[str, Any]:
    """Per-request headers: :func:`request_headers`, with ``omit`` removing the SDK's
    placeholder ``Authorization`` when there is no credential and its environment
    organisation/project headers unless the user set them."""
    headers: dict[str, Any] = dict(request_headers(s))
    given = {k.lower() for k in headers}
    for name in ("Authorization", *_ENV_HEADERS):
        if name.lower() not in given:
            headers[name] = omit
    return headers


def sdk_outcome(
    exc: Exception, s: Settings, httpx: Any, openai: Any
) -> Parsed | Failure:
    """Classify a failed SDK call exactly as the direct httpx transport did.

    An HTTP error status goes through :func:`interpret` (status, headers, bytes);
    a timeout stays a timeout and a refused connection stays a connection failure,
    through the httpx exception the SDK wrapped.
    """
    if isinstance(exc, openai.APIStatusError):
        r = exc.response
        return interpret(r.status_code, r.headers, r.content, s.endpoint)
    if isinstance(exc, httpx.HTTPError):  # e.g. reading an error body failed
        return transport_failure(exc, httpx)
    cause = exc.__cause__
    if isinstance(cause, httpx.HTTPError):
        return transport_failure(cause, httpx)
    if isinstance(exc, openai.APITimeoutError):
        return Failure("timeout", None, True, detail=type(exc).__name__)
    detail = f"{type(cause or exc).__name__}: {cause or exc}"
    return Failure("connection", None, True, detail=detail)


class ClientPool:
    """Lazily created SDK clients bounded to ``max_concurrency`` requests in flight.

    A changed ``max_concurrency`` or API root gets a fresh client and semaphore.
    Safe under threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Connection | None = None
        self._thread_sem: threading.BoundedSemaphore | None = None
        self._key: tuple[int, str] = (0, "")
        self._async: tuple[asyncio.AbstractEventLoop, Connection, asyncio.Semaphore,
                           tuple[int, str]] | None = None

    @property
    def is_open(self) -> bool:
        """Whether a sync or async client currently exists."""
        with self._lock:
            return self._client is not None or self._async is not None

    def sync_client(self, s: Settings) -> tuple[Connection, threading.BoundedSemaphore]:
        """The sync client and its semaphore, created on first use."""
        key = (s.max_concurrency, split_url(s)[0])
        import_sdk()
        with self._lock:
            if self._client is None or self._thread_sem is None or self._key != key:
                self._key = key
                self._client = connect(s, asynchronous=False)
                self._thread_sem = threading.BoundedSemaphore(s.max_concurrency)
            return self._client, self._thread_sem

    def async_client(self, s: Settings) -> tuple[Connection, asyncio.Semaphore]:
        """The async client and semaphore of the running event loop."""
        key = (s.max_concurrency, split_url(s)[0])
        import_sdk()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._async is None or self._async[0] is not loop or self._async[3] != key:
                sem = asyncio.Semaphore(s.max_concurrency)
                self._async = (loop, connect(s, asynchronous=True), sem, key)
            return self._async[1], self._async[2]

    def close(self) -> None:
        """Close the sync client; forget the async one (bound to its loop: use
        :meth:`aclose` inside it to close it cleanly)."""
        with self._lock:
            client, self._client, self._thread_sem = self._client, None, None
            self._async = None
        if client is not None:
            client.sdk.close()

    async def aclose(self) -> None:
        """Close the sync client and the async client of the running loop."""
        with self._lock:
            state, self._async = self._async, None
        self.close()
        if state is not None and state[0] is asyncio.get_running_loop():
            await state[1].sdk.close()

    def post(
        self, s: Settings, body: dict[str, Any], state: RetryState, count: Callable[..., None]
    ) -> Parsed:
        """POST ``body`` with retries; ``count(requests=1)`` per attempt.

        Raises
        ------
        CloudError
            When ``state`` gives up.
        """
        httpx, openai = import_sdk()
        client, sem = self.sync_client(s)
        path = split_url(s)[1]
        headers = sdk_headers(s, openai.Omit())
        while True:
            options = {"headers": headers, "timeout": state.attempt_timeout()}
            with sem:
                state.attempts += 1
                count(requests=1)
                try:
                    r = client.sdk.post(path, body=body, cast_to=httpx.Response, options=options)
                    outcome = interpret(r.status_code, r.headers, r.content, s.endpoint)
                except (openai.APIStatusError, openai.APIConnectionError, httpx.HTTPError) as exc:
                    outcome = sdk_outcome(exc, s, httpx, openai)
            if isinstance(outcome, Parsed):
                return outcome
            time.sleep(state.on_failure(outcome))

    async def apost(
        self, s: Settings, body: dict[str, Any], state: RetryState, count: Callable[..., None]
    ) -> Parsed:
        """Asynchronous :meth:`post`."""
        httpx, openai = import_sdk()
        client, sem = self.async_client(s)
        path = split_url(s)[1]
        headers = sdk_headers(s, openai.Omit())
        while True:
            options = {"headers": headers, "timeout": state.attempt_timeout()}
            async with sem:
                state.attempts += 1
                count(requests=1)
                try:
                    r = await client.sdk.post(path, body=body, cast_to=httpx.Response,
                                              options=options)
                    outcome = interpret(r.status_code, r.headers, r.content, s.endpoint)
                except (openai.APIStatusError, openai.APIConnectionError, httpx.HTTPError) as exc:
                    outcome = sdk_outcome(exc, s, httpx, openai)
            if isinstance(outcome, Parsed):
                return outcome
            await asyncio.sleep(state.on_failure(outcome))
