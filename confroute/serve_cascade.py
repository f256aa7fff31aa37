"""Serve a k-tier :class:`~confroute.cascade.Cascade` over the OpenAI chat API.

``confroute serve --config confroute.toml`` uses this app when the file has a
``[cascade]`` section (see :mod:`confroute.config`); from Python::

    cascade = load_config("confroute.toml").build_cascade()
    app = create_cascade_app(cascade)

Endpoints are those of :mod:`confroute.serve`: ``POST /v1/chat/completions``
(JSON or ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET
/metrics``. Every answer says which tier answered and what it cost, in the
``confroute`` field (:func:`cascade_record`) and in the ``X-Confroute-Tier``,
``X-Confroute-Tier-Name``, ``X-Confroute-Cost``, ``X-Confroute-P-Good`` and
``X-Confroute-Degraded`` headers; ``/health`` has each tier's share of the
requests served, the cost spent at each tier and, for a tier with a budget
(``max_share`` in the config), its ledger (:func:`confroute.serve.ledger_report`:
shared across replicas when the budget keeps it in Redis); ``/metrics`` has the
``confroute_cascade_requests{tier}`` and ``confroute_cascade_cost{tier}``
counters.

Concurrency: models are not safe to call from several threads, so requests
that arrive within ``batch_wait_ms`` of each other (up to ``max_batch``) are
answered together by one ``cascade.answer`` call (one batched call per tier) on
a single worker thread, one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confroute._validation import check_float, check_int, param_error
from confroute.serve import BadRequest, ServerLimits, ledger_report, prompt_hash, routed_prompt
from confroute.serve_guard import with_guard
from confroute.types import Prompt

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    from confroute.cascade import Cascade, CascadeResponse
    from confroute.serve_schema import ChatCompletionRequest

__all__ = ["CascadeStats", "cascade_headers", "cascade_record", "create_cascade_app"]


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def cascade_record(resp: CascadeResponse, model_names: list[str] | None = None
                   ) -> dict[str, Any]:
    """The ``confroute`` field of a cascade answer.

    Parameters
    ----------
    resp : CascadeResponse
    model_names : list of str, optional
        Each tier's model name, to fill ``answered_by``.

    Returns
    -------
    dict
        ``source`` (``"cascade"``), ``tier`` (index of the answering tier),
        ``tier_name``, ``answered_by`` (its model's name), ``cost`` (total: every
        tier reached was called), ``tier_costs`` (one per tier reached),
        ``p_good`` (one per tier reached; None where unscored), ``reason``,
        ``degraded``, ``error`` and ``prompt_hash`` (as
        :func:`confroute.serve.decision_record`).
    """
    names = model_names or []
    return {
        "source": "cascade",
        "tier": int(resp.tier),
        "tier_name": resp.tier_name,
        "answered_by": names[resp.tier] if resp.tier < len(names) else resp.tier_name,
        "cost": float(resp.cost),
        "tier_costs": [float(c) for c in resp.tier_costs],
        "p_good": [_finite(float(p)) for p in resp.p_good],
        "reason": resp.reason,
        "degraded": bool(resp.degraded),
        "error": resp.error,
        "prompt_hash": prompt_hash(resp.prompt),
    }


def cascade_headers(resp: CascadeResponse) -> dict[str, str]:
    """The ``X-Confroute-*`` headers of a cascade answer."""
    p = resp.p_good[resp.tier] if resp.tier < len(resp.p_good) else math.nan
    return {
        "X-Confroute-Source": "cascade",
        "X-Confroute-Tier": str(resp.tier),
        "X-Confroute-Tier-Name": resp.tier_name,
        "X-Confroute-Cost": repr(float(resp.cost)),
        "X-Confroute-P-Good": f"{p:.6f}" if math.isfinite(p) else "nan",
        "X-Confroute-Degraded": "true" if resp.degraded else "false",
    }


@dataclass
class CascadeStats:
    """Requests answered and cost spent, per tier, since the app started.

    Attributes
    ----------
    names : list of str
        Tier names, in order.
    answered : list of int, shape (k,)
        Requests answered by each tier.
    cost : list of float, shape (k,)
        Cost spent at each tier (a query pays every tier it reaches).
    degraded : int
        Answers served by an earlier tier after a later tier failed.
    """

    names: list[str]
    answered: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    degraded: int = 0

    def __post_init__(self) -> None:
        self.answered = [0] * len(self.names)
        self.cost = [0.0] * len(self.names)

    def add(self, resp: CascadeResponse) -> None:
        self.answered[resp.tier] += 1
        for j, c in enumerate(resp.tier_costs):
            self.cost[j] += float(c)
        self.degraded += int(resp.degraded)

    def report(self) -> dict[str, Any]:
        """JSON-able counts: ``served``, ``tier_shares`` and, per tier, ``answered``, ``share``
        and ``cost`` (list ``tiers``, in tier order)."""
        n = sum(self.answered)
        shares = [a / n if n else 0.0 for a in self.answered]
        return {
            "served": n,
            "degraded": self.degraded,
            "cost_total": float(sum(self.cost)),
            "mean_cost": float(sum(self.cost) / n) if n else 0.0,
            "tier_shares": dict(zip(self.names, shares)),
            "tiers": [{"name": name, "answered": a, "share": sh, "cost": c}
                      for name, a, sh, c in zip(self.names, self.answered, shares, self.cost)],
        }


# ----------------------------------------------------------------------- batching
@dataclass(eq=False)
class _Pending:
    prompt: Prompt
    future: asyncio.Future[CascadeResponse]


class _Batcher:
    """One ``cascade.answer`` call at a time on one thread, over micro-batches."""

    def __init__(self, cascade: Cascade, max_batch: int, max_wait: float) -> None:
        self.cascade, self.max_batch, self.max_wait = cascade, max_batch, max_wait
        self.batches = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="confroute-cascade")

    async def submit(self, prompt: Prompt) -> CascadeResponse:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        assert self._queue is not None
        fut: asyncio.Future[CascadeResponse] = loop.create_future()
        self._queue.put_nowait(_Pending(prompt, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        queue, loop = self._queue, asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            if self.max_wait > 0 and queue.qsize() < self.max_batch - 1:
                await asyncio.sleep(self.max_wait)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                out = await loop.run_in_executor(
                    self._pool, self.cascade.answer, [b.prompt for b in batch])
            except Exception as exc:  # the first tier failed: every request of the batch
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(exc)
                continue
            self.batches += 1
            for b, r in zip(batch, out):
                if not b.future.done():
                    b.future.set_result(r)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pool.shutdown(wait=False)


# ----------------------------------------------------------------------------- app
@dataclass(eq=False)
class _App:
    cascade: Cascade
    batcher: _Batcher
    stats: CascadeStats
    model_name: str
    max_prompt_chars: int
    max_messages: int
    registry: Any
    requests: Any
    cost: Any
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_names(self) -> list[str]:
        return [str(getattr(t.model, "name", t.name)) for t in self.cascade.tiers]


def create_cascade_app(
    cascade: Cascade, *, model_name: str = "confroute", max_prompt_chars: int = 32000,
    max_messages: int = 64, max_batch: int = 8, batch_wait_ms: float = 5.0,
    max_body_bytes: int = 1 << 20, max_json_depth: int = 64,
) -> FastAPI:
    """The OpenAI-compatible server of a cascade (see the module docstring).

    Parameters
    ----------
    cascade : Cascade
        Tiers ready to answer (thresholds set or fitted).
    model_name : str, default="confroute"
        The model id of ``/v1/models``.
    max_prompt_chars, max_messages : int, default=32000 and 64
        Largest conversation accepted (content characters, messages).
    max_batch : int, default=8
        Largest micro-batch answered by one ``cascade.answer`` call.
    batch_wait_ms : float, default=5.0
        How long to gather a micro-batch.
    max_body_bytes, max_json_depth : int
        Request-body bounds (see :mod:`confroute.serve_guard`).

    Returns
    -------
    fastapi.FastAPI
        ``app.state.cascade``, ``app.state.stats`` (:class:`CascadeStats`) and
        ``app.state.registry`` (Prometheus) hold the parts.

    Raises
    ------
    InvalidParameterError
        A bad parameter, named.
    """
    from confroute.cascade import Cascade

    owner = "create_cascade_app"
    if not isinstance(cascade, Cascade):
        raise param_error("cascade", owner, "a confroute Cascade", cascade, type_error=True)
    if not isinstance(model_name, str) or not model_name:
        raise param_error("model_name", owner, "a non-empty string", model_name,
                          type_error=not isinstance(model_name, str))
    chars = check_int(max_prompt_chars, "max_prompt_chars", owner, min_value=1)
    msgs = check_int(max_messages, "max_messages", owner, min_value=1)
    batch = check_int(max_batch, "max_batch", owner, min_value=1)
    wait = check_float(batch_wait_ms, "batch_wait_ms", owner, min_value=0.0)
    from prometheus_client import CollectorRegistry, Counter

    names = [t.name for t in cascade.tiers]
    registry = CollectorRegistry()
    requests = Counter("confroute_cascade_requests", "Requests answered, by tier", ["tier"],
                       registry=registry)
    cost = Counter("confroute_cascade_cost", "Cost spent at each tier (a query pays every "
                   "tier it reaches)", ["tier"], registry=registry)
    for name in names:
        requests.labels(name)
        cost.labels(name)
    state = _App(cascade, _Batcher(cascade, int(batch), float(wait) / 1000.0),
                 CascadeStats(names), model_name, int(chars), int(msgs), registry, requests,
                 cost)
    return with_guard(_build(state), max_body_bytes, max_json_depth, owner)


def _build(state: _App) -> FastAPI:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.responses import JSONResponse

    from confroute.serve_schema import ChatCompletionRequest, openai_error

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.batcher.aclose()

    app = FastAPI(title="confroute cascade server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.cascade, app.state.stats, app.state.registry = (state.cascade, state.stats,
                                                              state.registry)

    async def invalid_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        body = openai_error(errors[0]) if errors else _error_body(
            "The request body is invalid.", None, "invalid_body")
        return JSONResponse(body, status_code=400)

    app.add_exception_handler(RequestValidationError, invalid_body)

    async def chat(body: ChatCompletionRequest) -> Response:
        return await _chat(state, body)

    chat.__annotations__ = {"body": ChatCompletionRequest}
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"], response_model=None)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created,
             "owned_by": "confroute"}]})

    async def health(request: Request) -> Response:
        return JSONResponse(_health(state))

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response as PlainResponse

        return PlainResponse(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    return app


def _health(state: _App) -> dict[str, Any]:
    c = state.cascade
    report = state.stats.report()
    thresholds = [*c.thresholds, None]
    for entry, t, m, th in zip(report["tiers"], c.tiers, state.model_names, thresholds):
        entry.update(model=m, nominal_cost=t.nominal_cost,
                     threshold=None if th is None else _finite(th),
                     ledger=None if t.policy is None else ledger_report(t.policy))
    return {
        "status": "ok",
        "model": state.model_name,
        "router": "cascade",
        "agreement": c.agreement is not None and c.agreement is not False,
        "batches": state.batcher.batches,
        **report,
    }


def _error_body(message: str, param: str | None, code: str,
                type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _prompt(req: ChatCompletionRequest, state: _App) -> Prompt | dict[str, Any]:
    """The conversation the cascade answers, or an OpenAI error body.

    The routing server's own checks (:func:`~confroute.serve.routed_prompt`, ``n`` at
    most 1), and a cascade also needs a non-empty ``user`` message.
    """
    limits = ServerLimits(max_prompt_chars=state.max_prompt_chars,
                          max_messages=state.max_messages, max_n=1)
    try:
        out = routed_prompt(req, limits)
    except BadRequest as exc:
        return _error_body(exc.message, exc.param, exc.code)
    if not any(m.routed_role == "user" and m.text.strip() for m in req.messages):
        return _error_body("'messages' must contain a non-empty 'user' message.", "messages",
                           "invalid_value")
    return out


async def _chat(state: _App, req: ChatCompletionRequest) -> Response:
    from starlette.responses import JSONResponse

    prompt = _prompt(req, state)
    if isinstance(prompt, dict):
        return JSONResponse(prompt, status_code=400)
    try:
        resp = await state.batcher.submit(prompt)
    except Exception as exc:
        return JSONResponse(_error_body(f"The first tier failed: {type(exc).__name__}: {exc}",
                                        None, "tier_failed", "server_error"), status_code=500)
    state.stats.add(resp)
    state.requests.labels(resp.tier_name).inc()
    for t, c in zip(state.cascade.tiers, resp.tier_costs):
        state.cost.labels(t.name).inc(max(float(c), 0.0))
    record = cascade_record(resp, state.model_names)
    headers = cascade_headers(resp)
    if resp.text is None:
        return JSONResponse({**_error_body("No tier produced an answer.", None, "no_answer",
                                           "server_error"), "confroute": record},
                            status_code=502, headers=headers)
    if req.stream:
        return _stream(resp.text, record["answered_by"], record, headers)
    return JSONResponse({
        "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
        "created": int(time.time()), "model": record["answered_by"],
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": resp.text}}],
        "usage": None, "confroute": record}, headers=headers)


def _stream(text: str, model: str, record: dict[str, Any], headers: Mapping[str, str]
            ) -> Response:
    """The answer as three OpenAI chunks (role + record, content, stop) and ``[DONE]``."""
    from starlette.responses import StreamingResponse

    cid, now = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                            "logprobs": None}], **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None, confroute=record)
        yield chunk({"content": text}, None)
        yield chunk({}, "stop")
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})
