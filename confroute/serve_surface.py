"""The OpenAI surface of the routing server: the forced-escalation rule and reply shaping.

Used by :mod:`confroute.serve`; imports neither fastapi nor pydantic.

Forced escalation
-----------------
Some requests ask for what the edge model cannot do (see
:attr:`confroute.serve_schema.ChatCompletionRequest.forced`): read an image,
audio or file part (``"media"``), call tools (``"tools"``), or promise JSON
(``"json"``). They go to the cloud *without* an edge generation, admitted by the
router's online policy exactly like a normal escalation (``admit(p_good=0.0)``,
the strongest wish to escalate, so only the budget can refuse it). When the
budget refuses:

========  ==============================================================
media     no answer: a 429 naming the budget (the edge cannot read it)
tools     the edge answers in plain text (a model may always decline to
          call a tool); the record says ``budget_denied``
json      the edge answers and its text must parse as JSON (and meet the
          ``json_schema`` when ``jsonschema`` is installed), else a 429
========  ==============================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from confroute.types import Decision, Prompt, RoutedResponse, Sample

if TYPE_CHECKING:  # pragma: no cover
    from confroute.router import Router

__all__ = [
    "EDGE_FINISH",
    "FORCED_WHY",
    "check_json",
    "cloud_logprobs",
    "edge_logprobs",
    "edge_view",
    "finish_reason",
    "forced_decisions",
    "reply_message",
]

#: confroute's finish reasons as OpenAI's: an early-stopped answer was cut before
#: its end (as by a length limit); "error" has no OpenAI counterpart.
EDGE_FINISH: Mapping[str, str] = {"stop": "stop", "length": "length", "early_stop": "length",
                                  "error": "stop"}
#: What each forced-escalation kind means, for reasons and error messages (the
#: wording of :data:`confroute.integrations.common.ESCALATION_RULE`).
FORCED_WHY: Mapping[str, str] = {
    "media": "a message has content that is not text",
    "tools": "the request carries tools (the edge model cannot call tools)",
    "json": "the request asks for structured output (the edge model cannot guarantee a "
            "schema)",
}
# OpenAI's stand-in for a log-probability of -inf (JSON has no infinity).
_MIN_LOGPROB = -9999.0


def forced_decisions(router: Router, prompts: Sequence[Prompt], kinds: Sequence[str]
                     ) -> list[Decision]:
    """Decide requests the edge cannot honour, in order (run on the edge thread).

    Each is admitted by the router's online policy when it enforces a budget
    (``admit(0.0)``); an escalation needs no edge generation. A refused
    ``"tools"`` or ``"json"`` request gets the edge's greedy answer; a refused
    ``"media"`` one gets no answer (``edge_answer`` None).

    Parameters
    ----------
    router : Router
    prompts : sequence of Prompt, length n
    kinds : sequence of {"media", "tools", "json"}, length n

    Returns
    -------
    list of Decision
        ``source="cloud"`` when admitted, ``"edge"`` when the budget refused;
        ``p_good`` is NaN (nothing was scored).
    """
    from confroute.models.base import SampleRequest, collect_samples
    from confroute.policies import OnlinePolicy

    policy = router.policy
    online = isinstance(policy, OnlinePolicy) and policy.enforced
    out = []
    for prompt, kind in zip(prompts, kinds):
        ticket = policy.admit(0.0) if online else None
        if ticket is None or ticket.escalate:
            out.append(Decision(prompt=prompt, source="cloud", p_good=math.nan, scores={},
                                edge_answer=None, reason=f"escalated by rule: {FORCED_WHY[kind]}",
                                ticket=ticket))
            continue
        greedy = None
        if kind != "media":
            (got,) = collect_samples(router.edge, [prompt], [SampleRequest(
                greedy=True, max_new_tokens=router.edge_max_new_tokens)])
            greedy = got.greedy
        out.append(Decision(prompt=prompt, source="edge", p_good=math.nan, scores={},
                            edge_answer=None if greedy is None else greedy.text,
                            reason=f"budget_denied: {ticket.reason}", ticket=ticket,
                            edge_sample=greedy))
    return out


def edge_view(sample: Sample | None, text: str, max_tokens: int | None,
              stops: Sequence[str], tokenizer: Any) -> tuple[str, str, list[int], Any]:
    """The edge answer as the request asked for it: cut at ``max_tokens`` and ``stops``.

    The edge decodes greedily, so its first ``max_tokens`` tokens are the answer
    it would have given under that limit; cutting needs the edge's tokenizer
    (without one the answer is served whole).

    Returns
    -------
    text : str
    finish_reason : str
        OpenAI's: ``"length"`` when cut by ``max_tokens`` (or early-stopped),
        else ``"stop"``.
    token_ids : list of int
        The tokens of ``text`` (empty without a sample).
    token_logprobs : ndarray of shape (len(token_ids),) or None
    """
    if sample is None:
        return text, "stop", [], None
    finish = EDGE_FINISH.get(sample.finish_reason, "stop")
    ids, lps = list(sample.token_ids), sample.token_logprobs
    if max_tokens is not None and tokenizer is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        lps = None if lps is None else lps[:max_tokens]
        text, finish = tokenizer.decode(ids, skip_special_tokens=True), "length"
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
        cut = min(cuts)
        text, finish = text[:cut], "stop"
        if tokenizer is not None:
            keep = 0
            while keep < len(ids) and len(tokenizer.decode(ids[:keep + 1],
                                                           skip_special_tokens=True)) <= cut:
                keep += 1
            ids = ids[:keep]
            lps = None if lps is None else lps[:keep]
    return text, finish, ids, lps


def edge_logprobs(ids: Sequence[int], logprobs: Any, tokenizer: Any
                  ) -> list[dict[str, Any]] | None:
    """OpenAI ``logprobs.content`` of an edge answer (special tokens left out).

    ``top_logprobs`` is always an empty list: a Sample keeps the chosen token's
    log-probability only. None when the edge reported no log-probabilities or
    has no tokenizer to name the tokens.
    """
    if logprobs is None or tokenizer is None:
        return None
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    out = []
    for tid, lp in zip(ids, logprobs):
        if int(tid) in special:
            continue
        token = tokenizer.decode([int(tid)])
        value = float(lp)
        out.append({"token": token,
                    "logprob": value if math.isfinite(value) else _MIN_LOGPROB,
                    "bytes": list(token.encode("utf-8")), "top_logprobs": []})
    return out


def cloud_logprobs(sample: Sample | None, top: int | None) -> dict[str, Any] | None:
    """The cloud's own ``logprobs`` object, its alternatives cut to ``top`` per token."""
    raw = None if sample is None else sample.extra.get("logprobs")
    if not isinstance(raw, Mapping):
        return None
    content = raw.get("content")
    if top is None or not isinstance(content, list):
        return dict(raw)
    items = [{**item, "top_logprobs": list(item.get("top_logprobs") or [])[:top]}
             if isinstance(item, Mapping) else item for item in content]
    return {**raw, "content": items}


def finish_reason(resp: RoutedResponse, edge_finish: str) -> str:
    """The cloud's own finish reason for a cloud answer, ``edge_finish`` otherwise."""
    sample = resp.sample
    if resp.source == "cloud" and sample is not None:
        raw = sample.extra.get("finish_reason")
        return raw if isinstance(raw, str) else EDGE_FINISH.get(sample.finish_reason, "stop")
    return edge_finish


def reply_message(resp: RoutedResponse, text: str) -> dict[str, Any]:
    """The assistant message: the cloud's own (tool calls, refusal, ...) or ``text``."""
    raw = None if resp.sample is None else resp.sample.extra.get("message")
    if resp.source != "cloud" or not isinstance(raw, Mapping):
        return {"role": "assistant", "content": text}
    message = {k: v for k, v in raw.items() if k not in ("role", "content")}
    content = None if raw.get("content") is None and not text else text  # null stays null
    return {"role": "assistant", "content": content, **message}


def check_json(text: str | None, response_format: Mapping[str, Any]) -> str | None:
    """Why ``text`` does not meet a JSON ``response_format`` (None when it does).

    ``json_object``: it must parse as JSON. ``json_schema``: it must also
    validate against ``response_format["json_schema"]["schema"]`` when the
    ``jsonschema`` package is installed (otherwise only parsing is checked).
    """
    try:
        value = json.loads(text or "")
    except ValueError as exc:
        return f"it is not valid JSON ({exc})"
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if response_format.get("type") != "json_schema" or not isinstance(schema, Mapping):
        return None
    try:
        import jsonschema
    except ImportError:  # only parsing can be checked
        return None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"it does not meet the JSON schema ({exc.message})"
    except jsonschema.SchemaError as exc:
        return f"the request's JSON schema is invalid ({exc.message})"
    return None
