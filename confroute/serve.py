"""OpenAI-compatible routing server (``confroute serve``; needs ``confroute[serve]``).

Endpoints
---------
``POST /v1/chat/completions``
    An OpenAI chat completion, non-streaming or ``"stream": true`` (server-sent
    events in the OpenAI chunk format, ending with ``data: [DONE]``). The body is
    validated against :class:`confroute.serve_schema.ChatCompletionRequest`;
    every invalid request gets an OpenAI-shaped 400. The whole ``messages`` list
    is the prompt the router scores and, when escalated, the conversation the
    cloud model answers. The response carries the routing decision in an extra
    ``confroute`` field and in the ``X-Confroute-Source`` / ``X-Confroute-P-Good``
    headers.
``GET /v1/models``, ``GET /v1/models/{id}``
    The single model name the server answers as.
``GET /health``
    Liveness, the router's parts, the policy's budget ledger and batcher counters.
``GET /metrics``
    Prometheus text format (a per-app registry): requests by source, latency,
    and the ledger gauges.
``GET /openapi.json``
    The OpenAPI schema, with the request model.

Budgets
-------
``create_app(router, max_cloud_fraction=F)`` (``confroute serve
--max-cloud-fraction F``) serves with an *enforced* budget: the realised cloud
share never exceeds ``F`` at any prefix of the arrival order, whatever the
traffic (see :func:`apply_budget`).

Concurrency model
-----------------
The edge model is not safe to call from several threads at once, so every piece
of edge work goes through one :class:`EdgeBatcher`: requests that arrive within
``batch_wait_ms`` of each other (up to ``max_batch``) are routed together by one
``router.decide`` call on a single dedicated worker thread, in arrival order (so
an online budget ledger sees the arrival order). Cloud calls then run
concurrently on the event loop (``router.aanswer``).

This module imports neither fastapi, pydantic nor uvicorn at import time, so
``confroute --help`` stays fast. The ``confroute serve`` command (loading the
router and models named on the command line) is :mod:`confroute.cli.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
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
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType
from typing import TYPE_CHECKING, Any

from confroute._validation import check_float, check_int, param_error
from confroute.errors import InvalidParameterError, MissingDependencyError
from confroute.serve_guard import with_guard
from confroute.serve_surface import check_json, forced_decisions
from confroute.types import Decision, GenerationConfig, Prompt, RoutedResponse, Sample, prompt_key

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    from confroute.policies import LedgerSnapshot, Policy
    from confroute.router import Router
    from confroute.serve_schema import ChatCompletionRequest
    from confroute.shadow import TrafficTap

__all__ = [
    "BadRequest",
    "EdgeBatcher",
    "RunningServer",
    "ServerLimits",
    "apply_budget",
    "create_app",
    "decision_record",
    "ledger_report",
    "parse_period",
    "prompt_hash",
    "routed_prompt",
    "serve_in_thread",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'pip install "confroute[serve]"'


def _require_fastapi() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"The confroute routing server needs fastapi, uvicorn and prometheus-client: "
            f"{_INSTALL_HINT}"
        ) from exc


def _require_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(
            f"The confroute routing server needs fastapi and uvicorn: {_INSTALL_HINT}"
        ) from exc
    return uvicorn


# ----------------------------------------------------------------- ledger view
def _snapshot(policy: Any) -> LedgerSnapshot | None:
    """The policy's ledger snapshot, or None for a policy that keeps no ledger."""
    from confroute.policies import OnlinePolicy

    return policy.snapshot() if isinstance(policy, OnlinePolicy) else None


def _enforced(policy: Any) -> bool:
    from confroute.policies import OnlinePolicy

    return isinstance(policy, OnlinePolicy) and policy.enforced


def _budget_of(policy: Any) -> tuple[str | None, float | None]:
    """("cloud_fraction" or "spend", the budget) of an online policy, else (None, None)."""
    from confroute.policies import BudgetPolicy, CostAwarePolicy

    if isinstance(policy, BudgetPolicy):
        return "cloud_fraction", float(policy.max_cloud_fraction)
    if isinstance(policy, CostAwarePolicy) and policy.spend_budget is not None:
        return "spend", float(policy.spend_budget)
    return None, None


# ------------------------------------------------------------------- budgets
_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_period(value: str | float | int) -> float:
    """Seconds of a budget period: a number of seconds or ``"30s"``, ``"30m"``, ``"1h"``, ``"1d"``.

    Raises
    ------
    InvalidParameterError
        For anything else, or a period that is not > 0.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _PERIOD.match(value) if isinstance(value, str) else None
        if match is None:
            raise param_error("period", "parse_period", "seconds as a number or a string like "
                              "'3600', '30m', '1h' or '1d'", value)
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise param_error("period", "parse_period", "a duration > 0", value)
    return seconds


def _escalation_threshold(policy: Any) -> float:
    """The p_good below which ``policy`` escalates (its own rule, without any budget)."""
    t = getattr(policy, "threshold_", None)
    if t is None:
        t = getattr(policy, "min_p_good", None)
    if t is None and hasattr(policy, "quality_value"):
        v = float(policy.quality_value)
        gap = float(policy.cloud_cost) - float(policy.edge_cost)
        t = float(policy.p_cloud_good) - gap / v if v > 0 else 0.0
    if t is None:
        raise InvalidParameterError(
            f"apply_budget cannot read an escalation threshold from the router's policy "
            f"{type(policy).__name__}; use a threshold, budget, risk-control or cost-aware "
            f"policy."
        )
    return min(1.0, max(0.0, float(t)))


def _share_policy(policy: Any, fraction: float, period: float | None, n_cal: int,
                  adapt_window: int = 0) -> Policy:
    """An enforced BudgetPolicy with ``policy``'s escalation threshold."""
    from confroute.policies import BudgetPolicy

    params: dict[str, Any] = {"max_cloud_fraction": fraction, "enforce": "total",
                              "nan_policy": getattr(policy, "nan_policy", "escalate")}
    if adapt_window:
        params["adapt_window"] = adapt_window
    if period is not None:
        params.update(enforce="period", period=period)
    try:
        new = BudgetPolicy(**params)
    except TypeError:  # policies without the period ledger
        raise InvalidParameterError(
            "The 'period' parameter of apply_budget needs a BudgetPolicy with "
            "enforce='period'; this confroute has none.") from None
    if isinstance(policy, BudgetPolicy):
        state = policy.get_state()
    else:
        # the held-out share at this threshold is unknown here: the budget stands in
        # for it, with the uninformative interval [0, 1]
        state = {"threshold_": _escalation_threshold(policy),
                 "calibration_cloud_fraction_": fraction,
                 "cloud_fraction_interval_": [0.0, 1.0], "n_calibration_": n_cal}
    return new.set_state(state)


def _cost_per_escalation(router: Router, prices: Mapping[str, float] | None,
                         prompt_tokens: int) -> float:
    """Cloud cost reserved per escalation: ``prompt_tokens`` in, the cloud's max_new_tokens out."""
    out_tokens = router.cloud_config.max_new_tokens
    if prices is not None:
        return (prompt_tokens * prices["input"] + out_tokens * prices["output"]) / 1e6
    cost_of = getattr(router.cloud, "cost_of", None)
    probe = Sample(text="", token_ids=(0,) * out_tokens, prompt_tokens=prompt_tokens)
    return float(cost_of(probe)) if cost_of is not None else 0.0


def _cost_policy(router: Router, cap: float, period: float | None, cost: float) -> Policy:
    """A CostAwarePolicy with a spend cap that keeps the router's own escalation rule."""
    from confroute.policies import CostAwarePolicy

    policy = router.policy
    extra: dict[str, Any] = {"period": period} if period is not None else {}
    if isinstance(policy, CostAwarePolicy):
        params = {**policy.get_params(), "cloud_cost": cost, "spend_budget": cap, **extra}
    else:  # (t - p) * 1 > cost - cost: escalate exactly when p < t, charging `cost`
        params = {"edge_cost": cost, "cloud_cost": cost, "quality_value": 1.0,
                  "p_cloud_good": _escalation_threshold(policy), "spend_budget": cap,
                  "nan_policy": getattr(policy, "nan_policy", "escalate"), **extra}
    try:
        return CostAwarePolicy(**params)
    except TypeError:
        raise InvalidParameterError(
            "The 'period' parameter of apply_budget needs a CostAwarePolicy with a period; "
            "this confroute has none.") from None


def apply_budget(
    router: Router,
    *,
    max_cloud_fraction: float | None = None,
    max_cloud_cost: float | None = None,
    period: str | float | None = None,
    prices: Mapping[str, float] | None = None,
    prompt_tokens: int = 1000,
    adapt_window: int = 0,
) -> Router:
    """A copy of ``router`` whose policy enforces a cloud budget online, exactly.

    The escalation rule stays the router's own (the threshold its calibrated
    policy learned: ``threshold_`` or ``min_p_good``, or the cost-aware rule;
    when that policy is not a BudgetPolicy, the new one's
    ``calibration_cloud_fraction_`` is the budget and its
    ``cloud_fraction_interval_`` is [0, 1], as the held-out share is unknown);
    the budget caps it through the policy's thread-safe ledger, so a traffic
    shift (more low-``p_good`` requests than at calibration) cannot push the
    cloud share or spend over the budget.

    Parameters
    ----------
    router : Router
        A calibrated router; it is not modified (the copy shares its models,
        estimators and calibrator).
    max_cloud_fraction : float in [0, 1], optional
        Replace the policy by an enforced ``BudgetPolicy``: after every request,
        cloud answers <= floor(F * requests) (within each ``period`` when given).
    max_cloud_cost : float >= 0, optional
        Replace the policy by a ``CostAwarePolicy`` with this spend cap (per
        ``period`` when given), in the currency of the prices.
    period : float or str, optional
        Budget period in seconds, or ``"30m"``, ``"1h"``, ``"1d"`` (see
        :func:`parse_period`). Default: the budget covers the server's lifetime.
    prices : mapping, optional
        ``{"input": USD_per_Mtok, "output": USD_per_Mtok}``. Default: the cloud
        model's price table through its ``cost_of``.
    prompt_tokens : int, default=1000
        Prompt tokens assumed per escalation when reserving its cost. Each
        escalation reserves ``(prompt_tokens * input + max_new_tokens * output)
        / 1e6`` (``max_new_tokens`` of the router's ``cloud_config``), an upper
        bound for prompts up to that length.
    adapt_window : int >= 0, default=0
        With ``max_cloud_fraction``, W > 0 lets the threshold follow the last W
        requests (``BudgetPolicy(adapt_window=W)``); 0 keeps the router's own.

    Returns
    -------
    Router

    Raises
    ------
    InvalidParameterError
        Both or neither budget given, a value out of range, or ``max_cloud_cost``
        without any price (the reserved cost would be 0).
    """
    from confroute.router import Router

    owner = "apply_budget"
    if not isinstance(router, Router):
        raise param_error("router", owner, "a confroute Router", router, type_error=True)
    router.check_calibrated()
    if (max_cloud_fraction is None) == (max_cloud_cost is None):
        raise InvalidParameterError("apply_budget needs exactly one of 'max_cloud_fraction' "
                                    "(share of requests) or 'max_cloud_cost' (spend cap).")
    seconds = None if period is None else parse_period(period)
    if max_cloud_fraction is not None:
        frac = check_float(max_cloud_fraction, "max_cloud_fraction", owner, min_value=0.0,
                           max_value=1.0)
        adapt = check_int(adapt_window, "adapt_window", owner, min_value=0, max_value=1_000_000)
        policy = _share_policy(router.policy, frac, seconds,
                               int((router.calibration_ or {}).get("n", 0)), adapt)
    else:
        policy = _spend_policy(router, max_cloud_cost, seconds, prices, prompt_tokens)
    new = copy.copy(router)
    new.policy = policy
    return new


def _spend_policy(router: Router, max_cloud_cost: Any, seconds: float | None, prices: Any,
                  prompt_tokens: Any) -> Policy:
    """apply_budget's spend-cap branch: a CostAwarePolicy reserving each escalation's cost."""
    owner = "apply_budget"
    cap = check_float(max_cloud_cost, "max_cloud_cost", owner, min_value=0.0)
    check_int(prompt_tokens, "prompt_tokens", owner, min_value=0)
    cost = _cost_per_escalation(router, _check_prices(prices, owner), prompt_tokens)
    if cost <= 0:
        raise InvalidParameterError(
            "The 'prices' parameter of apply_budget must be given with max_cloud_cost when "
            "the cloud model has no price table. Got None.")
    return _cost_policy(router, cap, seconds, cost)


def _check_prices(prices: Any, owner: str) -> dict[str, float] | None:
    if prices is None:
        return None
    expected = "a mapping {'input': USD_per_Mtok, 'output': USD_per_Mtok} of numbers >= 0"
    if not isinstance(prices, Mapping) or set(prices) != {"input", "output"}:
        raise param_error("prices", owner, expected, prices, type_error=not isinstance(
            prices, Mapping))
    return {k: check_float(prices[k], f"prices[{k!r}]", owner, min_value=0.0) for k in prices}


def ledger_report(policy: Any) -> dict[str, Any] | None:
    """The ledger of an online policy as a JSON-able dict (None if it keeps none).

    Returns
    -------
    dict or None
        ``requests``, ``cloud`` (escalations counted), ``window_cloud``,
        ``cloud_share`` (cloud / requests, 0 before any request), ``spent``,
        ``budget_kind`` ("cloud_fraction" or "spend"), ``budget`` and, for a
        cloud-fraction budget, ``allowance`` = floor(budget * requests), the
        escalations allowed so far; ``backend`` ("memory" or "redis"),
        ``store_up`` (False while a shared ledger's Redis is unreachable and its
        failure mode holds) and ``emergency_used`` (fail_open escalations).
    """
    snap = _snapshot(policy)
    if snap is None:
        return None
    kind, budget = _budget_of(policy)
    allowance = None
    if kind == "cloud_fraction" and budget is not None:
        allowance = math.floor(Fraction(repr(budget)) * snap.requests)
    return {
        "requests": int(snap.requests),
        "cloud": int(snap.cloud),
        "window_cloud": int(snap.window_cloud),
        "cloud_share": snap.cloud / snap.requests if snap.requests else 0.0,
        "spent": float(snap.spent),
        "budget_kind": kind,
        "budget": budget,
        "allowance": allowance,
        "backend": getattr(snap, "backend", "memory"),
        "store_up": bool(getattr(snap, "store_up", True)),
        "emergency_used": int(getattr(snap, "emergency_used", 0)),
    }


# ------------------------------------------------------------------------ batcher
@dataclass(eq=False)
class _Pending:
    prompt: Prompt
    future: asyncio.Future[Decision]
    forced: str | None = None


def _runs(items: list[_Pending]) -> list[list[_Pending]]:
    """Consecutive runs of normal and of forced requests (arrival order kept)."""
    runs: list[list[_Pending]] = []
    for it in items:
        if runs and (runs[-1][0].forced is None) == (it.forced is None):
            runs[-1].append(it)
        else:
            runs.append([it])
    return runs


class EdgeBatcher:
    """Serialise edge work: micro-batch requests into one routing call at a time.

    Requests submitted within ``max_wait`` seconds of the first one waiting (up to
    ``max_batch`` of them) are routed together by one ``router.decide`` call
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

    async def submit(self, prompt: Prompt, *, forced: str | None = None) -> Decision:
        """Route one (validated) prompt; its ledger ticket (if any) is ``decision.ticket``.

        ``forced`` (``"media"``, ``"tools"`` or ``"json"``) marks a request the
        edge cannot honour: it is decided by
        :func:`confroute.serve_surface.forced_decisions` instead of
        ``router.decide`` (admitted by the same ledger, in the same arrival order).
        """
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._queue = asyncio.Queue()
            self._loop = loop
            self._task = loop.create_task(self._run(), name="confroute-edge-batcher")
        assert self._queue is not None
        fut: asyncio.Future[Decision] = loop.create_future()
        self._queue.put_nowait(_Pending(prompt, fut, forced))
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
            for run in _runs(live):
                await self._process(run)

    async def _process(self, items: list[_Pending]) -> None:
        from confroute.policies import OnlinePolicy

        loop = asyncio.get_running_loop()
        router = self.router
        prompts = [it.prompt for it in items]
        work: Any = functools.partial(router.decide, prompts)
        if items[0].forced is not None:
            work = functools.partial(forced_decisions, router, prompts,
                                     [str(it.forced) for it in items])
        try:
            decided = await loop.run_in_executor(self._pool, work)
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
        policy = router.policy
        for it, d in zip(items, decided):
            if it.future.done():  # the client went away: give its escalation back
                if d.ticket is not None and isinstance(policy, OnlinePolicy):
                    policy.settle(d.ticket, spent=False)
                continue
            it.future.set_result(d)


# ------------------------------------------------------------------- requests
class BadRequest(Exception):
    """A request the server refuses (an OpenAI error body: message, param, code, status)."""

    def __init__(self, message: str, param: str | None, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass(frozen=True)
class ServerLimits:
    """The conversation limits a routing server checks before any model work."""

    max_prompt_chars: int
    max_messages: int
    max_n: int


def routed_prompt(req: ChatCompletionRequest, limits: ServerLimits) -> Prompt:
    """The conversation the router sees, after the server's limits are checked."""
    msgs = req.messages
    if len(msgs) > limits.max_messages:
        raise BadRequest(f"'messages' has {len(msgs)} messages; this server accepts at most "
                          f"{limits.max_messages}.", "messages", "too_many_messages")
    out = tuple({"role": m.routed_role, "content": m.text} for m in msgs)
    total = sum(len(m["content"]) for m in out)
    if total > limits.max_prompt_chars:
        raise BadRequest(f"'messages' has {total} characters of content; this server "
                          f"accepts at most {limits.max_prompt_chars}.", "messages",
                          "prompt_too_long")
    if not any(m["role"] == "user" for m in out):
        raise BadRequest("'messages' must contain at least one 'user' message.", "messages",
                          "invalid_value")
    if not any(m["content"].strip() for m in out) and req.forced != "media":
        raise BadRequest("'messages' must contain some non-empty content.", "messages",
                          "invalid_value")
    if req.n is not None and req.n > limits.max_n:
        raise BadRequest(f"'n' must be at most {limits.max_n} on this server (a routed request "
                          f"has one answer). Got {req.n}.", "n", "invalid_value")
    return out


def _cloud_config(base: GenerationConfig, req: ChatCompletionRequest) -> GenerationConfig | None:
    """The router's cloud config with the request's sampling fields (never a longer answer)."""
    changes: dict[str, Any] = {}
    if req.temperature is not None:
        changes["temperature"] = float(req.temperature)
    if req.top_p is not None:
        changes["top_p"] = float(req.top_p)
    if req.max_new_tokens is not None:
        changes["max_new_tokens"] = min(int(req.max_new_tokens), base.max_new_tokens)
    if req.seed is not None:
        changes["seed"] = req.seed
    if req.stop is not None:
        changes["stop"] = req.stops
    if not changes:
        return None
    return dataclasses.replace(base, n=1, **changes)


# ------------------------------------------------------------------- responses
def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def decision_record(resp: RoutedResponse, ticket: Any = None) -> dict[str, Any]:
    """The ``confroute`` field of a response: how the answer was chosen.

    Parameters
    ----------
    resp : RoutedResponse
    ticket : Ticket, optional
        The request's ledger ticket (default: ``resp.decision.ticket``).

    Returns
    -------
    dict
        ``source`` (who answered), ``answered_by`` (the name of the model that
        answered: the cloud of the fallback chain, or the edge), ``routed_to`` (the
        decision), ``p_good`` (None
        if unscorable), ``scores``, ``reason``, ``degraded``, ``error``, ``cost``,
        ``ledger_seq`` (the request's arrival index in the budget ledger, or None)
        and ``prompt_hash`` (the first 16 hex digits of the SHA-256 of the UTF-8 of
        ``json.dumps([{"role": r, "content": c}, ...], ensure_ascii=False)`` over
        the routed conversation, so a client can check the decision is for the
        conversation it sent).
    """
    d = resp.decision
    seq = getattr(d.ticket if ticket is None else ticket, "seq", None)
    return {
        "source": resp.source,
        "answered_by": resp.answered_by,
        "routed_to": d.source,
        "p_good": _finite(d.p_good),
        "scores": {k: _finite(float(v)) for k, v in d.scores.items()},
        "reason": d.reason,
        "degraded": resp.degraded,
        "error": client_error(resp),
        "cost": resp.cost,
        "ledger_seq": int(seq) if isinstance(seq, int) else None,
        "prompt_hash": prompt_hash(d.prompt),
    }


def client_error(resp: RoutedResponse) -> str | None:
    """What a client is told about a failed cloud call: its reason, never its details.

    The details (the cloud's URL, its reply) stay in the server's log: they can
    name internal hosts. Other errors are returned as they are.
    """
    err = resp.cloud_error
    if err is None:
        return resp.error
    return f"the cloud call failed ({getattr(err, 'reason', 'error')})"


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


def _usage(resp: RoutedResponse) -> dict[str, Any] | None:
    """OpenAI ``usage`` of a cloud answer: the cloud's own object when it sent one, else
    the router's token counts (None for edge answers: not metered)."""
    raw = None if resp.sample is None else resp.sample.extra.get("usage")
    if resp.source == "cloud" and isinstance(raw, Mapping):
        return dict(raw)
    if resp.source != "cloud" or not resp.usage:
        return None
    pt = int(resp.usage.get("prompt_tokens", 0))
    ct = int(resp.usage.get("completion_tokens", 0))
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}


def _outcome(resp: RoutedResponse) -> str:
    """The metrics label of a served request: edge, cloud, degraded or error."""
    if resp.text is None:
        return "error"
    return "degraded" if resp.degraded else resp.source


# ---------------------------------------------------------------------- metrics
SOURCES = ("edge", "cloud", "degraded", "error")


class _Metrics:
    """Prometheus metrics of one app, in their own ``CollectorRegistry``."""

    def __init__(self, router: Router) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "confroute_requests", "Chat completions served, by who answered (degraded: the "
            "edge answer after a failed cloud call; error: no answer)", ["source"],
            registry=self.registry)
        for source in SOURCES:
            self.requests.labels(source)
        self.invalid = Counter("confroute_invalid_requests",
                               "Chat completion requests refused with a 400",
                               registry=self.registry)
        self.latency = Histogram("confroute_request_latency_seconds",
                                 "Time from a valid request to its response, by source",
                                 ["source"], registry=self.registry)
        fields = {"requests": "Requests admitted by the policy's ledger",
                  "cloud": "Escalations counted by the ledger (failed calls given back)",
                  "spent": "Cloud spend counted by the ledger (CostAwarePolicy)",
                  "budget": "The budget: cloud fraction or spend cap (NaN without one)",
                  "allowance": "Escalations allowed so far, floor(budget * requests)",
                  "store_up": "1 while the ledger's store answers, 0 while a shared (Redis) "
                  "ledger is unreachable and its failure mode holds",
                  "emergency_used": "Escalations let through while the shared ledger was "
                  "unreachable (fail_open)"}
        for key, doc in fields.items():
            gauge = Gauge(f"confroute_ledger_{key}", doc, registry=self.registry)
            gauge.set_function(functools.partial(_ledger_value, router, key))

    def observe(self, source: str, seconds: float) -> None:
        self.requests.labels(source).inc()
        self.latency.labels(source).observe(seconds)


def _ledger_value(router: Router, key: str) -> float:
    report = ledger_report(router.policy)
    value = None if report is None else report.get(key)
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------------- app
@dataclass(eq=False)
class _Server:
    router: Router
    batcher: EdgeBatcher
    limits: ServerLimits
    model_name: str
    created: int
    metrics: _Metrics
    traffic: TrafficTap | None = None


def create_app(
    router: Router,
    *,
    model_name: str = "confroute",
    max_prompt_chars: int = 32000,
    max_messages: int = 64,
    max_n: int = 1,
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
    max_cloud_fraction: float | None = None,
    max_cloud_cost: float | None = None,
    period: str | float | None = None,
    prices: Mapping[str, float] | None = None,
    traffic: TrafficTap | None = None, max_body_bytes: int = 1 << 20, max_json_depth: int = 64,
    adapt_window: int = 0) -> FastAPI:
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
    max_cloud_fraction, max_cloud_cost, period, prices, adapt_window : optional
        Serve with an enforced budget: the router is replaced by
        ``apply_budget(router, ...)`` (see :func:`apply_budget`).
    traffic : TrafficTap, optional
        Decision log, shadow labels and drift gauges (:mod:`confroute.shadow`).
    max_body_bytes, max_json_depth : int, default=1048576 (1 MiB) and 64
        Larger bodies get a 413, deeper JSON nesting a 400 (see :mod:`confroute.serve_guard`).

    Returns
    -------
    fastapi.FastAPI
        The app; ``app.state.router`` (the router serving, budgeted when asked)
        and ``app.state.batcher`` hold the parts, ``app.state.registry`` the
        Prometheus registry.

    Raises
    ------
    MissingDependencyError
        When fastapi or prometheus-client is not installed.
    NotFittedError
        When the router is not calibrated.
    """
    _require_fastapi()
    from confroute.router import Router

    owner = "create_app"
    if not isinstance(router, Router):
        raise param_error("router", owner, "a confroute Router", router, type_error=True)
    router.check_calibrated()
    if not isinstance(model_name, str) or not model_name:
        raise param_error("model_name", owner, "a non-empty string", model_name,
                          type_error=not isinstance(model_name, str))
    limits = ServerLimits(
        max_prompt_chars=check_int(max_prompt_chars, "max_prompt_chars", owner, min_value=1),
        max_messages=check_int(max_messages, "max_messages", owner, min_value=1),
        max_n=check_int(max_n, "max_n", owner, min_value=1, max_value=1),
    )
    wait = check_float(batch_wait_ms, "batch_wait_ms", owner, min_value=0.0)
    router = _budgeted(router, max_cloud_fraction, max_cloud_cost, period, prices, adapt_window)
    batcher = EdgeBatcher(router, max_batch=max_batch, max_wait=wait / 1000.0)
    server = _Server(router, batcher, limits, model_name, int(time.time()), _Metrics(router),
                     traffic)
    return with_guard(_build_app(server), max_body_bytes, max_json_depth, owner)


def _budgeted(router: Router, max_cloud_fraction: float | None, max_cloud_cost: float | None,
              period: str | float | None, prices: Mapping[str, float] | None,
              adapt_window: int = 0) -> Router:
    """The router to serve: ``apply_budget(router, ...)`` when a budget is given."""
    if max_cloud_fraction is not None or max_cloud_cost is not None:
        return apply_budget(router, max_cloud_fraction=max_cloud_fraction,
                            max_cloud_cost=max_cloud_cost, period=period, prices=prices,
                            adapt_window=adapt_window)
    if period is not None or prices is not None:
        raise InvalidParameterError("The 'period' and 'prices' parameters of create_app need "
                                    "max_cloud_fraction or max_cloud_cost.")
    if adapt_window:
        raise InvalidParameterError("The 'adapt_window' parameter of create_app needs "
                                    f"max_cloud_fraction. Got {adapt_window!r} without it.")
    return router


def _build_app(server: _Server) -> FastAPI:
    """The FastAPI app of ``server``: lifespan, error handlers and routes."""
    from fastapi import FastAPI

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await server.batcher.aclose()
        if server.traffic is not None:
            await server.traffic.aclose()

    app = FastAPI(title="confroute routing server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.router = server.router
    app.state.batcher = server.batcher
    app.state.model_name = server.model_name
    app.state.registry = server.metrics.registry
    app.state.traffic = server.traffic
    if server.traffic is not None:
        server.traffic.register_metrics(server.metrics.registry)
    _add_error_handlers(app, server)
    _add_routes(app, server)
    return app


def _error(status: int, message: str, *, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           extra: Mapping[str, Any] | None = None,
           headers: Mapping[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    body = _error_body(message, type_=type_, param=param, code=code)
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _add_error_handlers(app: FastAPI, server: _Server) -> None:
    """OpenAI-shaped errors: 400 for every invalid body (never 422), 404/405 for routes."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse

    from confroute.serve_schema import openai_error

    async def invalid_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        server.metrics.invalid.inc()
        errors = list(exc.errors())
        body = openai_error(errors[0]) if errors else _error_body(
            "The request body is invalid.", type_="invalid_request_error", param=None,
            code="invalid_body")
        return JSONResponse(body, status_code=400)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                      code=code)

    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _add_routes(app: FastAPI, server: _Server) -> None:
    from starlette.responses import JSONResponse

    from confroute.serve_schema import ChatCompletionRequest

    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await _chat(server, body)

    # FastAPI reads the body model from the real annotation (this module's annotations
    # are strings and the schema module is imported lazily).
    chat_completions.__annotations__ = {"body": ChatCompletionRequest}
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      response_model=None, summary="Create a routed chat completion")

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(server)]})

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != server.model_name:
            return _error(404, f"The model '{model_id}' does not exist; this server answers "
                          f"as '{server.model_name}'.", param="model", code="model_not_found")
        return JSONResponse(_model_card(server))

    async def health(request: Request) -> Response:
        return JSONResponse(_health(server))

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response as PlainResponse

        return PlainResponse(generate_latest(server.metrics.registry),
                             media_type=CONTENT_TYPE_LATEST)

    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])


async def _log_request(traffic: TrafficTap, resp: RoutedResponse) -> None:
    """Log an answered request; a failing log write is logged, never the user's error."""
    try:
        await traffic.record(resp)
    except Exception:
        logger.exception("could not record the request in the decision log")


def _model_card(server: _Server) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "confroute"}


def _health(server: _Server) -> dict[str, Any]:
    router, batcher = server.router, server.batcher
    return {
        "status": "ok",
        "model": server.model_name,
        "edge": getattr(router.edge, "name", None),
        "cloud": getattr(router.cloud, "name", None),
        "policy": type(router.policy).__name__,
        "enforced": _enforced(router.policy),
        "on_cloud_error": router.on_cloud_error,
        "ledger": ledger_report(router.policy),
        "batches": batcher.batches,
        "routed": batcher.routed,
        "largest_batch": batcher.largest_batch,
        "traffic": None if server.traffic is None else server.traffic.health(),
    }


async def _chat(server: _Server, req: ChatCompletionRequest) -> Response:
    """Route one validated request and answer it (JSON or server-sent events)."""
    from confroute.models.openai import request_fields

    t0 = time.perf_counter()
    router = server.router
    try:
        prompt = routed_prompt(req, server.limits)
        cloud_config = _cloud_config(router.cloud_config, req)
        _check_logprobs(req)
    except (BadRequest, ValueError) as exc:
        server.metrics.invalid.inc()
        if isinstance(exc, BadRequest):
            return _error(exc.status, exc.message, param=exc.param, code=exc.code)
        return _error(400, str(exc), code="invalid_value")
    forced = req.forced
    try:
        decision = await server.batcher.submit(prompt, forced=forced)
    except Exception as exc:
        logger.exception("edge routing failed")
        server.metrics.observe("error", time.perf_counter() - t0)
        return _error(500, f"Routing failed on the edge model: {type(exc).__name__}: {exc}",
                      type_="server_error", code="edge_failed")
    denied = forced is not None and decision.source == "edge"
    if denied and forced == "media":  # nothing can answer it
        server.metrics.observe("error", time.perf_counter() - t0)
        resp = RoutedResponse(text=None, source="edge", decision=decision)
        return _budget_error(server, _record(resp, forced, denied), str(forced), None)
    with request_fields(_forwarded(req)):
        (resp,) = await router.aanswer([decision], cloud_config=cloud_config)
    reply = _reply(server, req, resp) if resp.text is not None else None
    why = None
    if denied and forced == "json" and reply is not None and req.response_format is not None:
        why = check_json(reply.message.get("content"), req.response_format)
    server.metrics.observe("error" if why else _outcome(resp), time.perf_counter() - t0)
    if server.traffic is not None:
        await _log_request(server.traffic, resp)
    record = _record(resp, forced, denied)
    headers = _headers(resp)
    if resp.cloud_error is not None:
        logger.warning("cloud call failed: %s", resp.error)
    if reply is None:
        return _error(502, client_error(resp) or "the cloud call failed", type_="cloud_error",
                      code=getattr(resp.cloud_error, "reason", None) or "cloud_failed",
                      extra={"confroute": record}, headers=headers)
    if why is not None:
        return _budget_error(server, record, "json", why)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(server, resp, record, headers, include_usage, reply)
    from starlette.responses import JSONResponse

    payload = {
        "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
        # the model that answered; the alias (model_name) stays the id clients address
        "created": int(time.time()), "model": resp.answered_by or server.model_name,
        "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                     "logprobs": reply.logprobs, "message": reply.message}],
        "usage": _usage(resp),
        "confroute": record,
    }
    return JSONResponse(payload, headers=headers)


def _record(resp: RoutedResponse, forced: str | None, denied: bool) -> dict[str, Any]:
    """The ``confroute`` field, with the forced-escalation rule's outcome.

    ``forced`` is the kind (``"media"``, ``"tools"``, ``"json"``) of a request
    escalated without an edge generation, else None; ``budget_denied`` is True
    when the budget refused that escalation.
    """
    return {**decision_record(resp), "forced": forced, "budget_denied": denied}


def _budget_error(server: _Server, record: dict[str, Any], kind: str, why: str | None
                  ) -> Response:
    """The 429 of a forced escalation that the budget refused and the edge cannot answer."""
    from confroute.serve_surface import FORCED_WHY

    budget_kind, budget = _budget_of(server.router.policy)
    name = f"'{budget_kind}' budget ({budget:g})" if budget_kind else "cloud budget"
    tail = (f"the edge model answered, but {why}." if why
            else "the edge model cannot answer it.")
    return _error(429, f"The {name} of this server refuses the cloud call this request needs "
                  f"({FORCED_WHY[kind]}): {record['reason']}; {tail}",
                  type_="insufficient_quota", code="budget_exhausted",
                  extra={"confroute": record})


def _check_logprobs(req: ChatCompletionRequest) -> None:
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("'top_logprobs' requires 'logprobs' to be true. Got "
                          f"top_logprobs={req.top_logprobs} with logprobs={req.logprobs}.",
                          "top_logprobs", "invalid_value")


def _forwarded(req: ChatCompletionRequest) -> dict[str, Any]:
    """The request's fields for the cloud body (see ``ChatCompletionRequest.forwarded``).

    The messages are sent as the client wrote them (``developer`` still routed as
    ``system``) when the routed prompt cannot carry them: media parts, tool
    calls, ``tool_call_id`` or other message fields.
    """
    fields = req.forwarded()
    if req.logprobs:
        fields["logprobs"] = True
        if req.top_logprobs is not None:
            fields["top_logprobs"] = req.top_logprobs
    if any(m.has_media or m.content is None or m.model_extra for m in req.messages):
        fields["messages"] = [{**m.model_dump(exclude_none=True), "role": m.routed_role}
                              for m in req.messages]
    return fields


@dataclass(frozen=True)
class _Reply:
    message: dict[str, Any]
    finish_reason: str
    logprobs: dict[str, Any] | None


def _reply(server: _Server, req: ChatCompletionRequest, resp: RoutedResponse) -> _Reply:
    """The choice of an answered request: message, OpenAI finish reason and logprobs."""
    from confroute.serve_surface import (
        cloud_logprobs,
        edge_logprobs,
        edge_view,
        finish_reason,
        reply_message,
    )

    text = resp.text or ""
    if resp.source == "cloud":
        lp = cloud_logprobs(resp.sample, req.top_logprobs) if req.logprobs else None
        return _Reply(reply_message(resp, text), finish_reason(resp, "stop"), lp)
    tokenizer = getattr(server.router.edge, "tokenizer", None)
    text, finish, ids, lps = edge_view(resp.sample, text, req.max_new_tokens, req.stops,
                                       tokenizer)
    logprobs = None
    if req.logprobs:
        content = edge_logprobs(ids, lps, tokenizer)
        # an edge served over HTTP has no tokenizer here but its server's own logprobs
        logprobs = ({"content": content, "refusal": None} if content is not None
                    else cloud_logprobs(resp.sample, req.top_logprobs))
    return _Reply({"role": "assistant", "content": text}, finish, logprobs)


def _stream(server: _Server, resp: RoutedResponse, record: dict[str, Any],
            headers: Mapping[str, str], include_usage: bool, reply: _Reply) -> Response:
    """The answer as OpenAI chat-completion chunks (server-sent events).

    The text comes in word-sized deltas (the first one carries the whole
    ``logprobs`` when asked), then the cloud's tool calls or refusal, then the
    finish reason, then the usage chunk when ``include_usage``.
    """
    from starlette.responses import StreamingResponse

    cid, now = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    with_usage = {"usage": None} if include_usage else {}
    msg = reply.message
    text = msg.get("content")
    rest = {k: v for k, v in msg.items() if k in ("tool_calls", "refusal") and v is not None}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": now,
               "model": resp.answered_by or server.model_name, "choices": choices, **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def delta(content: dict[str, Any], finish: str | None, logprobs: Any = None
              ) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": content, "finish_reason": finish, "logprobs": logprobs}]

    async def events() -> AsyncIterator[str]:
        yield chunk(delta({"role": "assistant", "content": "" if text is not None else None},
                          None), confroute=record, **with_usage)
        logprobs = reply.logprobs
        for piece in _pieces(text or ""):
            yield chunk(delta({"content": piece}, None, logprobs), **with_usage)
            logprobs = None
        if "tool_calls" in rest:
            calls = [{**call, "index": i} for i, call in enumerate(rest["tool_calls"])]
            yield chunk(delta({"tool_calls": calls}, None), **with_usage)
        if "refusal" in rest:
            yield chunk(delta({"refusal": rest["refusal"]}, None), **with_usage)
        yield chunk(delta({}, reply.finish_reason, logprobs), **with_usage)
        if include_usage:
            yield chunk([], usage=_usage(resp))  # null for edge answers (not metered)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})


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

