"""OpenAI-compatible routing server (``confroute serve``; needs ``confroute[serve]``).

Endpoints
---------
``POST /v1/chat/completions``
    An OpenAI chat completion, non-streaming or ``"stream": true`` (server-sent
    events in the OpenAI chunk format, ending with ``data: [DONE]``). The whole
    ``messages`` list is the prompt the router scores and, when escalated, the
    conversation the cloud model answers. The response carries the routing
    decision in an extra ``confroute`` field and in the ``X-Confroute-Source`` /
    ``X-Confroute-P-Good`` headers.
``GET /v1/models``
    The single model name the server answers as.
``GET /health``
    Liveness plus the router's parts, the budget ledger and batcher counters.

Concurrency model
-----------------
The edge model is not safe to call from several threads at once, so every piece
of edge work goes through one :class:`EdgeBatcher`: requests that arrive within
``batch_wait_ms`` of each other (up to ``max_batch``) are routed together by one
``Router._route`` call on a single dedicated worker thread, in arrival order (so
an online budget ledger sees the arrival order). Cloud calls then run
concurrently on the event loop (the cloud's ``agenerate``, or ``generate`` in a
worker thread).

This module imports neither fastapi nor uvicorn at import time, so
``confroute --help`` stays fast. The ``confroute serve`` command (loading the
router and models named on the command line) is :mod:`confroute.cli.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from confroute._validation import check_float, check_int, param_error
from confroute.errors import MissingDependencyError
from confroute.types import Decision, GenerationConfig, Prompt, RoutedResponse, prompt_key

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    from confroute.router import Router

__all__ = [
    "EdgeBatcher",
    "RunningServer",
    "create_app",
    "decision_record",
    "prompt_hash",
    "serve_in_thread",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'pip install "confroute[serve]"'
ROLES = ("system", "user", "assistant")


def _require_fastapi() -> None:
    try:
        import fastapi  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"The confroute routing server needs fastapi and uvicorn: {_INSTALL_HINT}"
        ) from exc


def _require_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(
            f"The confroute routing server needs fastapi and uvicorn: {_INSTALL_HINT}"
        ) from exc
    return uvicorn


# ------------------------------------------------------------------------ batcher
@dataclass(eq=False)
class _Pending:
    prompt: Prompt
    future: asyncio.Future[tuple[Decision, Any]]


class EdgeBatcher:
    """Serialise edge work: micro-batch requests into one routing call at a time.

    Requests submitted within ``max_wait`` seconds of the first one waiting (up to
    ``max_batch`` of them) are routed together by one ``Router._route`` call
    (edge generation, scoring, calibration, and the policy's ``admit`` in
    arrival order) on a single dedicated thread. Only one batch runs at a time,
    so the edge model is never called concurrently. A batch whose edge work
    raises is retried prompt by prompt, so one bad prompt fails only itself.

    Parameters
    ----------
    router : Router
        A calibrated router.
    max_batch : int, default=8
        Largest number of prompts routed in one call.
    max_wait : float, default=0.005
        Seconds to wait for more requests after the first one arrives (skipped
        when a full batch is already queued).

    Attributes
    ----------
    batches : int
        Routing calls made so far.
    routed : int
        Prompts routed so far.
    largest_batch : int
        Size of the largest batch so far.
    """

    def __init__(self, router: Router, *, max_batch: int = 8, max_wait: float = 0.005) -> None:
        owner = "EdgeBatcher"
        self.router = router
        self.max_batch = int(check_int(max_batch, "max_batch", owner, min_value=1) or 1)
        self.max_wait = float(check_float(max_wait, "max_wait", owner, min_value=0.0) or 0.0)
        self.batches = 0
        self.routed = 0
        self.largest_batch = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="confroute-edge")

    async def submit(self, prompt: Prompt) -> tuple[Decision, Any]:
        """Route one (validated) prompt; returns its decision and budget ticket (or None)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._queue = asyncio.Queue()
            self._loop = loop
            self._task = loop.create_task(self._run(), name="confroute-edge-batcher")
        assert self._queue is not None
        fut: asyncio.Future[tuple[Decision, Any]] = loop.create_future()
        self._queue.put_nowait(_Pending(prompt, fut))
        return await fut

    async def aclose(self) -> None:
        """Stop the batching task and the edge thread (pending requests get an error)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the server is shutting down"))
        self._pool.shutdown(wait=False)

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            if self.max_wait > 0 and queue.qsize() < self.max_batch - 1:
                await asyncio.sleep(self.max_wait)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [item for item in batch if not item.future.done()]
            if live:
                await self._process(live)

    async def _process(self, items: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        router = self.router
        try:
            decisions, tickets = await loop.run_in_executor(
                self._pool, router._route, [it.prompt for it in items], None
            )
        except asyncio.CancelledError:
            for it in items:
                if not it.future.done():
                    it.future.set_exception(RuntimeError("the server is shutting down"))
            raise
        except Exception as exc:
            if len(items) > 1:
                logger.warning("edge batch of %d failed (%s); routing one by one", len(items), exc)
                for it in items:
                    await self._process([it])
                return
            if not items[0].future.done():
                items[0].future.set_exception(exc)
            return
        self.batches += 1
        self.routed += len(items)
        self.largest_batch = max(self.largest_batch, len(items))
        settle = getattr(router.policy, "settle", None)
        for it, d, t in zip(items, decisions, tickets):
            if it.future.done():  # the client went away: give its escalation back
                if settle is not None and t is not None:
                    settle(t, spent=False)
                continue
            it.future.set_result((d, t))


# ------------------------------------------------------------------- validation
class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass(frozen=True)
class _Limits:
    max_prompt_chars: int
    max_messages: int
    max_n: int


@dataclass(frozen=True)
class _ChatRequest:
    messages: tuple[Mapping[str, str], ...]
    stream: bool
    cloud_overrides: dict[str, Any] = field(default_factory=dict)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value
    )


def _parse_chat(body: Any, limits: _Limits) -> _ChatRequest:
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.", None, "invalid_body")
    messages = body.get("messages")
    if messages is None:
        raise _BadRequest("Missing required parameter: 'messages'.", "messages",
                          "missing_required_parameter")
    if not isinstance(messages, list):
        raise _BadRequest("'messages' must be a list of message objects.", "messages",
                          "invalid_type")
    if not messages:
        raise _BadRequest("'messages' must contain at least one message.", "messages",
                          "empty_array")
    if len(messages) > limits.max_messages:
        raise _BadRequest(
            f"'messages' has {len(messages)} messages; this server accepts at most "
            f"{limits.max_messages}.", "messages", "too_many_messages",
        )
    out: list[dict[str, str]] = []
    total = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _BadRequest(f"'{where}' must be an object with 'role' and 'content'.", where,
                              "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _BadRequest(
                f"'{where}.role' must be one of {', '.join(repr(r) for r in ROLES)}. "
                f"Got {role!r}.", f"{where}.role", "invalid_value",
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise _BadRequest(
                f"'{where}.content' must be a string (content-part arrays and null content "
                f"are not supported). Got {type(content).__name__}.", f"{where}.content",
                "invalid_type",
            )
        total += len(content)
        out.append({"role": role, "content": content})
    if total > limits.max_prompt_chars:
        raise _BadRequest(
            f"The conversation has {total} characters of content; this server accepts at most "
            f"{limits.max_prompt_chars}.", "messages", "prompt_too_long",
        )
    if not any(m["role"] == "user" for m in out):
        raise _BadRequest("'messages' must contain at least one 'user' message.", "messages",
                          "invalid_value")
    if not any(m["content"].strip() for m in out):
        raise _BadRequest("'messages' must contain some non-empty content.", "messages",
                          "invalid_value")

    n = body.get("n")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _BadRequest(f"'n' must be an integer >= 1. Got {n!r}.", "n", "invalid_value")
        if n > limits.max_n:
            raise _BadRequest(
                f"'n' must be at most {limits.max_n} on this server (a routed request has one "
                f"answer). Got {n}.", "n", "invalid_value",
            )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _BadRequest(f"'stream' must be a boolean. Got {stream!r}.", "stream",
                          "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _BadRequest(f"'model' must be a string. Got {model!r}.", "model", "invalid_type")

    over: dict[str, Any] = {}
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0.0 <= float(temperature) <= 2.0:
            raise _BadRequest(
                f"'temperature' must be a number in [0, 2]. Got {temperature!r}.",
                "temperature", "invalid_value",
            )
        over["temperature"] = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0.0 < float(top_p) <= 1.0:
            raise _BadRequest(f"'top_p' must be a number in (0, 1]. Got {top_p!r}.", "top_p",
                              "invalid_value")
        over["top_p"] = float(top_p)
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _BadRequest(f"'{key}' must be an integer >= 1. Got {value!r}.", key,
                              "invalid_value")
        over.setdefault("max_new_tokens", value)
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise _BadRequest(f"'seed' must be an integer >= 0. Got {seed!r}.", "seed",
                              "invalid_value")
        over["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or len(stops) > 4
                or not all(isinstance(s, str) and s for s in stops)):
            raise _BadRequest("'stop' must be a non-empty string or a list of at most 4 of "
                              f"them. Got {stop!r}.", "stop", "invalid_value")
        over["stop"] = tuple(stops)
    return _ChatRequest(messages=tuple(out), stream=stream, cloud_overrides=over)


def _cloud_config(base: GenerationConfig, over: Mapping[str, Any]) -> GenerationConfig | None:
    """The router's cloud config with the request's sampling fields (never a longer answer)."""
    if not over:
        return None
    changes = dict(over)
    if "max_new_tokens" in changes:
        changes["max_new_tokens"] = min(int(changes["max_new_tokens"]), base.max_new_tokens)
    return dataclasses.replace(base, n=1, **changes)


# ------------------------------------------------------------------- responses
def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def decision_record(resp: RoutedResponse, ticket: Any = None) -> dict[str, Any]:
    """The ``confroute`` field of a response: how the answer was chosen.

    Parameters
    ----------
    resp : RoutedResponse
    ticket : Ticket or None
        The online-ledger ticket of the request, if the policy issued one.

    Returns
    -------
    dict
        ``source`` ("edge"/"cloud": who wrote the answer), ``routed_to`` (the
        decision before any cloud call), ``p_good`` (null when unscorable),
        ``scores``, ``reason``, ``degraded``, ``error``, ``cost``,
        ``ledger_seq`` (arrival index in the budget ledger, or null) and
        ``prompt_hash`` (first 16 hex digits of the SHA-256 of the UTF-8 of
        ``json.dumps([{"role": r, "content": c}, ...], ensure_ascii=False)`` over
        the routed conversation, so a client can check the decision is for the
        conversation it sent).
    """
    d = resp.decision
    seq = getattr(ticket, "seq", None)
    return {
        "source": resp.source,
        "routed_to": d.source,
        "p_good": _finite(d.p_good),
        "scores": {k: _finite(float(v)) for k, v in d.scores.items()},
        "reason": d.reason,
        "degraded": resp.degraded,
        "error": resp.error,
        "cost": resp.cost,
        "ledger_seq": int(seq) if isinstance(seq, int) else None,
        "prompt_hash": prompt_hash(d.prompt),
    }


def prompt_hash(prompt: Prompt) -> str:
    """Short stable digest of a prompt (see :func:`decision_record`)."""
    return hashlib.sha256(prompt_key(prompt).encode("utf-8")).hexdigest()[:16]


def _headers(resp: RoutedResponse) -> dict[str, str]:
    p = resp.decision.p_good
    return {
        "X-Confroute-Source": resp.source,
        "X-Confroute-P-Good": f"{p:.6f}" if math.isfinite(p) else "nan",
        "X-Confroute-Degraded": "true" if resp.degraded else "false",
    }


def _error_body(message: str, *, type_: str, param: str | None, code: str | None
                ) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _pieces(text: str) -> list[str]:
    """Word-sized stream deltas that join back to ``text`` exactly."""
    return re.findall(r"\s*\S+|\s+", text)


# ------------------------------------------------------------------------- app
def create_app(
    router: Router,
    *,
    model_name: str = "confroute",
    max_prompt_chars: int = 32000,
    max_messages: int = 64,
    max_n: int = 1,
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
) -> FastAPI:
    """Build the OpenAI-compatible routing server around a calibrated router.

    Parameters
    ----------
    router : Router
        A calibrated :class:`~confroute.router.Router` with an ``edge`` model
        (and a ``cloud`` model; without one every escalation fails and follows
        ``router.on_cloud_error``).
    model_name : str, default="confroute"
        The model id reported by ``/v1/models`` and in responses. Requests may
        name any model; the router decides who answers.
    max_prompt_chars : int, default=32000
        Largest total number of content characters in a conversation.
    max_messages : int, default=64
        Largest number of messages in a conversation.
    max_n : int, default=1
        Largest ``n`` accepted. Only 1 is supported: a routed request has
        exactly one answer (the kept edge answer or the cloud answer).
    max_batch : int, default=8
        Largest micro-batch of edge work (see :class:`EdgeBatcher`).
    batch_wait_ms : float, default=5.0
        How long the batcher waits for more requests after the first one.

    Returns
    -------
    fastapi.FastAPI
        The app; ``app.state.router`` and ``app.state.batcher`` hold the parts.

    Raises
    ------
    MissingDependencyError
        When fastapi is not installed.
    NotFittedError
        When the router is not calibrated.
    """
    _require_fastapi()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, StreamingResponse

    from confroute.router import Router

    owner = "create_app"
    if not isinstance(router, Router):
        raise param_error("router", owner, "a confroute Router", router, type_error=True)
    router._check_fitted()
    if not isinstance(model_name, str) or not model_name:
        raise param_error("model_name", owner, "a non-empty string", model_name,
                          type_error=not isinstance(model_name, str))
    limits = _Limits(
        max_prompt_chars=int(check_int(max_prompt_chars, "max_prompt_chars", owner,
                                       min_value=1) or 1),
        max_messages=int(check_int(max_messages, "max_messages", owner, min_value=1) or 1),
        max_n=int(check_int(max_n, "max_n", owner, min_value=1, max_value=1) or 1),
    )
    wait = check_float(batch_wait_ms, "batch_wait_ms", owner, min_value=0.0)
    batcher = EdgeBatcher(router, max_batch=max_batch, max_wait=float(wait or 0.0) / 1000.0)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.aclose()

    app = FastAPI(title="confroute routing server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.router = router
    app.state.batcher = batcher
    app.state.model_name = model_name

    def error(status: int, message: str, *, type_: str = "invalid_request_error",
              param: str | None = None, code: str | None = None,
              extra: Mapping[str, Any] | None = None,
              headers: Mapping[str, str] | None = None) -> Response:
        body = _error_body(message, type_=type_, param=param, code=code)
        if extra:
            body.update(extra)
        return JSONResponse(body, status_code=status, headers=dict(headers or {}))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                     code=code)

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return error(400, "The request body is not valid JSON.", code="invalid_json")
        try:
            parsed = _parse_chat(body, limits)
        except _BadRequest as bad:
            return error(bad.status, bad.message, param=bad.param, code=bad.code)
        try:
            cloud_config = _cloud_config(router.cloud_config, parsed.cloud_overrides)
        except ValueError as exc:
            return error(400, str(exc), code="invalid_value")
        try:
            decision, ticket = await batcher.submit(parsed.messages)
        except Exception as exc:
            logger.exception("edge routing failed")
            return error(500, f"Routing failed on the edge model: {type(exc).__name__}: {exc}",
                         type_="server_error", code="edge_failed")
        resp, cloud_err = await router._aanswer(decision, ticket, cloud_config)
        record = decision_record(resp, ticket)
        headers = _headers(resp)
        if resp.text is None:
            return error(502, resp.error or "the cloud call failed", type_="cloud_error",
                         code=getattr(cloud_err, "reason", None) or "cloud_failed",
                         extra={"confroute": record}, headers=headers)
        cid = "chatcmpl-" + uuid.uuid4().hex
        now = int(time.time())
        if not parsed.stream:
            usage = None
            if resp.source == "cloud" and resp.usage:
                pt = int(resp.usage.get("prompt_tokens", 0))
                ct = int(resp.usage.get("completion_tokens", 0))
                usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
            payload = {
                "id": cid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": resp.text}}],
                "usage": usage,
                "confroute": record,
            }
            return JSONResponse(payload, headers=headers)

        text = resp.text

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": now,
                   "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                "logprobs": None}], **extra}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None, confroute=record)
            for piece in _pieces(text):
                yield chunk({"content": piece}, None)
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "confroute"}
        ]})

    async def health(request: Request) -> Response:
        ledger = getattr(router.policy, "ledger", None)
        led = ledger()._asdict() if ledger is not None else None
        return JSONResponse({
            "status": "ok",
            "model": model_name,
            "edge": getattr(router.edge, "name", None),
            "cloud": getattr(router.cloud, "name", None),
            "policy": type(router.policy).__name__,
            "on_cloud_error": router.on_cloud_error,
            "ledger": led,
            "batches": batcher.batches,
            "routed": batcher.routed,
            "largest_batch": batcher.largest_batch,
        })

    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    return app


# ---------------------------------------------------------------- background run
class RunningServer:
    """A uvicorn server running in a background thread (see :func:`serve_in_thread`).

    Attributes
    ----------
    url : str
        Root URL, e.g. ``http://127.0.0.1:54321``; the OpenAI base URL is
        ``url + "/v1"``.
    """

    def __init__(self, server: Any, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self.url = url

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (``url + "/v1"``)."""
        return self.url + "/v1"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0,
                    timeout: float = 30.0) -> RunningServer:
    """Run ``app`` with uvicorn in a daemon thread and wait until it accepts connections.

    Parameters
    ----------
    app : ASGI app
    host : str, default="127.0.0.1"
    port : int, default=0
        0 picks a free port.
    timeout : float, default=30.0
        Seconds to wait for startup.

    Returns
    -------
    RunningServer
    """
    uvicorn = _require_uvicorn()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="confroute-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the routing server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://{host}:{bound}")
