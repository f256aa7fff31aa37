"""What the framework adapters share: the escalation rule, prompt conversion, the
decision record, and the few Router calls they make.

Nothing here imports LangChain or LiteLLM; both adapters speak OpenAI-format
messages (``{"role": ..., "content": ...}``) to this module.
"""

from __future__ import annotations

import asyncio
import math
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from confroute._validation import param_error
from confroute.types import Decision, Prompt, RoutedResponse

__all__ = [
    "ESCALATION_RULE",
    "answered",
    "aroute_one",
    "check_router",
    "decision_metadata",
    "edge_lock",
    "escalation_reason",
    "route_one",
    "routed_metadata",
    "rule_decision",
    "settle",
    "to_prompt",
    "truncate_at_stop",
]

ESCALATION_RULE = """\
A request goes to the cloud without being scored (and without any edge generation)
when the edge model cannot honour it:

1. it carries tools (``tools``, ``functions`` or a ``tool_choice`` other than "none");
2. it asks for structured output (a ``response_format`` other than text, or
   LangChain's ``with_structured_output``);
3. its conversation holds tool calls or tool results;
4. a message has content that is not text (images, audio, files).

Such a request is recorded as a decision with ``source="cloud"``, ``p_good=None``,
no scores and a reason starting with "escalated by rule". It is not admitted to the
router's budget ledger: the edge has no answer to offer, so there is nothing to
trade off."""

#: Request fields whose presence means the request carries tools.
_TOOL_FIELDS = ("tools", "functions")


def escalation_reason(
    messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None
) -> str | None:
    """Why the edge model cannot honour a request, or None when it can.

    Parameters
    ----------
    messages : sequence of dict
        The conversation in OpenAI format.
    request : mapping, optional
        The other request fields (``tools``, ``tool_choice``, ``response_format``...).

    Returns
    -------
    str or None
        A reason starting with "escalated by rule" (see :data:`ESCALATION_RULE`).
    """
    req = request or {}
    if any(req.get(k) for k in _TOOL_FIELDS) or req.get("tool_choice") not in (None, "none"):
        return "escalated by rule: the request carries tools (the edge model cannot call tools)"
    fmt = req.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        return ("escalated by rule: the request asks for structured output (the edge model "
                "cannot guarantee a schema)")
    for m in messages:
        if m.get("role") in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            return "escalated by rule: the conversation holds tool calls or tool results"
        content = m.get("content")
        if isinstance(content, list) and any(
            not (isinstance(p, Mapping) and p.get("type") == "text") for p in content
        ):
            return "escalated by rule: a message has content that is not text"
    return None


def to_prompt(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The conversation as the Router sees it: ``[{"role", "content"}]`` with text content.

    The ``developer`` role becomes ``system``; text content parts are joined with
    newlines; anything else (tool calls, names) is dropped, which is why requests
    holding them are escalated by rule first (:func:`escalation_reason`).

    Parameters
    ----------
    messages : sequence of dict, length n
        OpenAI-format messages.

    Returns
    -------
    list of dict, length n
    """
    out: list[dict[str, str]] = []
    for m in messages:
        role = str(m.get("role", "user"))
        content = m.get("content")
        if isinstance(content, list):
            text = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        else:
            text = "" if content is None else str(content)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def rule_decision(prompt: Prompt, reason: str) -> Decision:
    """The decision record of a request escalated by rule (no score, no edge answer)."""
    return Decision(prompt=prompt, source="cloud", p_good=math.nan, scores={},
                    edge_answer=None, reason=reason)


def decision_metadata(
    decision: Decision,
    *,
    model: str | None,
    cost: float | None,
    degraded: bool = False,
    error: str | None = None,
) -> dict[str, Any]:
    """The JSON-friendly record of a routing decision that adapters attach to a response.

    Returns
    -------
    dict
        ``source`` ("edge" or "cloud": where the answer came from), ``p_good``
        (None when not scored), ``scores``, ``reason``, ``escalated_by_rule``,
        ``model`` (the model that answered), ``cost`` (None when unknown),
        ``degraded`` and ``error``.
    """
    p = float(decision.p_good)
    source = "edge" if degraded else decision.source
    return {
        "source": source,
        "p_good": None if math.isnan(p) else p,
        "scores": {k: float(v) for k, v in decision.scores.items()},
        "reason": decision.reason,
        "escalated_by_rule": decision.reason.startswith("escalated by rule"),
        "model": model,
        "cost": cost,
        "degraded": degraded,
        "error": error,
    }


def check_router(router: Any, owner: str) -> Any:
    """Check that ``router`` is a calibrated :class:`~confroute.router.Router`."""
    from confroute.router import Router

    if not isinstance(router, Router):
        raise param_error("router", owner, "a calibrated confroute Router", router,
                          type_error=True)
    router.check_calibrated()
    return router


_EDGE_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def edge_lock(router: Any) -> threading.Lock:
    """The lock that gives one caller at a time to ``router``'s edge work.

    Local edge models are not thread-safe; the adapters decide under this lock
    (one per Router, shared by every adapter using it), while cloud calls run
    outside it.
    """
    with _LOCKS_LOCK:
        lock = _EDGE_LOCKS.get(router)
        if lock is None:
            lock = _EDGE_LOCKS[router] = threading.Lock()
        return lock


def route_one(router: Any, prompt: Prompt) -> Decision:
    """The Router's decision for one prompt (``router.decide``; no cloud call)."""
    with edge_lock(router):
        return router.decide([prompt])[0]


async def aroute_one(router: Any, prompt: Prompt) -> Decision:
    """Asynchronous :func:`route_one`: the edge work runs in a worker thread."""
    return await asyncio.to_thread(route_one, router, prompt)


def answered(router: Any, response: RoutedResponse) -> RoutedResponse:
    """``response`` from ``router.answer``, or its cloud error with ``on_cloud_error="raise"``."""
    if response.cloud_error is not None and router.on_cloud_error == "raise":
        raise response.cloud_error
    return response


def settle(router: Any, decision: Decision, *, spent: bool, cost: float | None = None) -> None:
    """Settle the budget ticket of a decision answered outside the Router, if it has one.

    ``spent=False`` gives the escalation back (the cloud call failed); ``cost``
    replaces the reserved cost by the real one when known.
    """
    from confroute.policies import OnlinePolicy

    if decision.ticket is not None and isinstance(router.policy, OnlinePolicy):
        router.policy.settle(decision.ticket, spent=spent, cost=cost)


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` cut at the first occurrence of any stop string (OpenAI ``stop`` semantics)."""
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def routed_metadata(response: RoutedResponse, router: Any) -> dict[str, Any]:
    """:func:`decision_metadata` of a response answered by the Router itself."""
    model = router.cloud if response.source == "cloud" else router.edge
    return decision_metadata(response.decision, model=getattr(model, "name", None),
                             cost=float(response.cost), degraded=response.degraded,
                             error=response.error)
