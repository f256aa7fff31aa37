"""A routing strategy for ``litellm.Router`` that picks the edge or the cloud deployment.

``pip install "confroute[litellm]"``. Give the strategy the ids
(``model_info["id"]``) of two deployments of one model group, and one of:

- **a calibrated confroute Router** (post-generation). For each request the
  Router's own ``edge`` model generates the edge answer and scores it; the
  strategy then picks the edge deployment when the answer is kept and the cloud
  deployment otherwise. *Cost:* every request pays one edge generation before
  LiteLLM calls anything, and a kept request is generated a second time by the
  edge deployment (LiteLLM serves what the deployment returns, not the answer
  that was scored); with greedy decoding on the same model both are the same
  text. Point the Router's ``edge`` at the edge deployment's server (an
  :class:`~confroute.models.OpenAIModel`) or load the same weights locally.
- **a query-only router** (pre-generation): a fitted
  :class:`~confroute.predictive.QueryRouter` and the embedder it was trained
  with. ``p_strong`` of the prompt's embedding decides before any generation:
  the cloud deployment when ``p_strong > threshold``, the edge one otherwise.
  *Cost:* one embedding per request; nothing is generated twice.

Requests the edge cannot honour (tools, structured output, tool messages,
non-text content) go to the cloud deployment by rule
(:data:`confroute.integrations.common.ESCALATION_RULE`).

Which model answered: LiteLLM reports it on every response
(``response.model`` and ``response._hidden_params["model_id"]``, the deployment
id); :meth:`ConfrouteRoutingStrategy.decision_for` returns the confroute
decision of a response, with ``deployment`` and ``model`` filled in.

Importing this module imports LiteLLM, which would fetch its model price map from
the internet on import: ``LITELLM_LOCAL_MODEL_COST_MAP`` is set to ``"True"``
first unless you set it yourself (confroute makes no hidden network calls).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from confroute._validation import check_float, check_int, param_error
from confroute.errors import InvalidParameterError, MissingDependencyError, NotFittedError
from confroute.integrations.common import (
    check_router,
    decision_metadata,
    escalation_reason,
    route_one,
    rule_decision,
    settle,
    to_prompt,
)
from confroute.types import Decision, Prompt, prompt_text

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

try:
    from litellm.types.router import CustomRoutingStrategyBase
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise MissingDependencyError(
        "confroute.integrations.litellm needs LiteLLM: pip install 'confroute[litellm]'"
    ) from exc

__all__ = ["ConfrouteRoutingStrategy", "deployments_of"]

_OWNER = "ConfrouteRoutingStrategy"


def deployments_of(llm_router: Any) -> list[Any]:
    """The deployments (model-list entries, as dicts) of a ``litellm.Router``.

    Reads ``llm_router.registry().all()`` on LiteLLM versions that have it and
    ``llm_router.model_list`` on older ones.
    """
    registry = getattr(llm_router, "registry", None)
    entries = registry().all() if callable(registry) else getattr(llm_router, "model_list", None)
    if entries is None:
        raise param_error("llm_router", _OWNER, "a litellm.Router", llm_router, type_error=True)
    return [e for e in entries if isinstance(e, Mapping)]


def _deployment_id(entry: Mapping[str, Any]) -> str | None:
    info = entry.get("model_info") or {}
    return None if info.get("id") is None else str(info["id"])


class ConfrouteRoutingStrategy(CustomRoutingStrategyBase):
    """Pick the edge or the cloud deployment of a ``litellm.Router`` with confroute.

    Parameters
    ----------
    llm_router : litellm.Router
        The LiteLLM router whose deployments are picked; :meth:`install`
        registers the strategy on it.
    edge, cloud : str
        Deployment ids (``model_info["id"]``) of the edge and the cloud deployment.
    router : Router, optional
        A calibrated confroute Router with its ``edge`` model (post-generation).
    query_router : QueryRouter, optional
        A fitted query-only router (pre-generation); exactly one of ``router``
        and ``query_router`` must be given.
    embedder : QueryEmbedder or TextEncoder, optional
        The embedder ``query_router`` was trained with (default: the default
        :class:`~confroute.predictive.QueryEmbedder`).
    threshold : float in [0, 1], default 0.5
        ``query_router`` escalates when ``p_strong > threshold``.
    max_records : int, default 10000
        How many recent decisions :meth:`decision_for` can look up.

    Notes
    -----
    A decision is made once per LiteLLM call (keyed by ``litellm_call_id``, which
    the strategy sets when the caller did not): LiteLLM's retries reuse it. With
    an enforced budget the escalation is counted when it is decided, whether or
    not the cloud call then succeeds (LiteLLM owns retries and fallbacks).
    Edge work runs one request at a time per Router (in a worker thread for
    ``acompletion``).
    """

    def __init__(
        self,
        llm_router: Any,
        *,
        edge: str,
        cloud: str,
        router: Any = None,
        query_router: Any = None,
        embedder: Any = None,
        threshold: float = 0.5,
        max_records: int = 10000,
    ) -> None:
        if (router is None) == (query_router is None):
            raise InvalidParameterError(
                f"{_OWNER} needs exactly one of 'router' (a calibrated confroute Router, "
                "post-generation) or 'query_router' (a fitted QueryRouter, pre-generation)."
            )
        self.router = None if router is None else check_router(router, _OWNER)
        self.query_router = None if query_router is None else _check_query_router(query_router)
        self.embedder = None if query_router is None else _embedder(embedder)
        self.threshold = float(check_float(threshold, "threshold", _OWNER, min_value=0.0,
                                           max_value=1.0))
        self.max_records = int(check_int(max_records, "max_records", _OWNER, min_value=1))
        self.llm_router = llm_router
        self.edge, self.cloud = self._find(edge, "edge"), self._find(cloud, "cloud")
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def _find(self, deployment_id: Any, name: str) -> dict[str, Any]:
        entries = deployments_of(self.llm_router)
        ids = [_deployment_id(e) for e in entries]
        if not isinstance(deployment_id, str) or deployment_id not in ids:
            valid = ", ".join(repr(i) for i in ids if i is not None)
            raise param_error(name, _OWNER, f"the id of a deployment of llm_router ({valid})",
                              deployment_id)
        return entries[ids.index(deployment_id)]

    def install(self) -> ConfrouteRoutingStrategy:
        """Register the strategy on ``llm_router`` and return it."""
        register = getattr(self.llm_router, "register_plugin", None)
        if not callable(register):  # LiteLLM before register_plugin
            register = self.llm_router.set_custom_routing_strategy
        register(self)
        return self

    # ----------------------------------------------------------------- LiteLLM API
    def get_available_deployment(  # type: ignore[override]  # the base annotates None
        self,
        model: str,
        messages: list[dict[str, Any]] | None = None,
        input: Any = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The deployment that answers this request (LiteLLM's synchronous hook)."""
        call_id, prompt, rule = self._request(messages, input, request_kwargs)
        record = self._recorded(call_id)
        if record is None:
            record = self._record(call_id, self._decide(prompt, rule))
        return self.edge if record["source"] == "edge" else self.cloud

    async def async_get_available_deployment(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, Any]] | None = None,
        input: Any = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The deployment that answers this request (LiteLLM's asynchronous hook)."""
        call_id, prompt, rule = self._request(messages, input, request_kwargs)
        record = self._recorded(call_id)
        if record is None:
            d = await asyncio.to_thread(self._decide, prompt, rule)
            record = self._record(call_id, d)
        return self.edge if record["source"] == "edge" else self.cloud

    def decision_for(self, response: Any) -> dict[str, Any] | None:
        """The confroute decision behind a LiteLLM response, or None if unknown.

        Parameters
        ----------
        response : litellm ModelResponse
            A response of ``llm_router.completion`` / ``acompletion``.

        Returns
        -------
        dict or None
            :func:`~confroute.integrations.common.decision_metadata` with
            ``deployment`` (the id of the deployment that answered, from
            LiteLLM), ``model`` (the model it reported) and ``cost`` (LiteLLM's
            ``response_cost``, None when it has none).
        """
        hidden = getattr(response, "_hidden_params", None) or {}
        call_id = hidden.get("litellm_call_id")
        record = None if call_id is None else self._recorded(str(call_id))
        if record is None:
            return None
        cost = hidden.get("response_cost")
        return {**record, "deployment": hidden.get("model_id"),
                "model": getattr(response, "model", None) or record["model"],
                "cost": None if cost is None else float(cost)}

    # ------------------------------------------------------------------- helpers
    def _request(self, messages: Any, input: Any, request_kwargs: dict[str, Any] | None
                 ) -> tuple[str, Prompt, str | None]:
        kwargs = request_kwargs if request_kwargs is not None else {}
        call_id = str(kwargs.setdefault("litellm_call_id", str(uuid.uuid4())))
        if messages is None:
            if not isinstance(input, str):
                raise param_error("messages", _OWNER, "chat messages (or a text 'input')",
                                  messages)
            messages = [{"role": "user", "content": input}]
        rule = escalation_reason(messages, kwargs)
        return call_id, to_prompt(messages), rule

    def _decide(self, prompt: Prompt, rule: str | None) -> Decision:
        if rule is not None:
            return rule_decision(prompt, rule)
        if self.router is not None:
            d = route_one(self.router, prompt)
            settle(self.router, d, spent=True)
            return d
        qr, emb = self.query_router, self.embedder
        assert qr is not None and emb is not None  # exactly one of router / query_router
        p = float(qr.p_strong(emb.encode([prompt_text(prompt)]))[0])
        up = p > self.threshold
        reason = f"p_strong {p:.2f} {'>' if up else '<='} threshold {self.threshold:.2f}"
        return Decision(prompt=prompt, source="cloud" if up else "edge", p_good=math.nan,
                        scores={"p_strong": p}, edge_answer=None, reason=reason)

    def _record(self, call_id: str, d: Decision) -> dict[str, Any]:
        target = self.edge if d.source == "edge" else self.cloud
        model = (target.get("litellm_params") or {}).get("model")
        record = decision_metadata(d, model=model, cost=None)
        with self._lock:
            self._records[call_id] = record
            while len(self._records) > self.max_records:
                self._records.popitem(last=False)
        return record

    def _recorded(self, call_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._records.get(call_id)


def _check_query_router(query_router: Any) -> Any:
    from confroute.predictive.routers import QueryRouter

    if not isinstance(query_router, QueryRouter):
        raise param_error("query_router", _OWNER, "a fitted QueryRouter", query_router,
                          type_error=True)
    if not hasattr(query_router, "n_features_in_"):
        raise NotFittedError(
            f"The 'query_router' passed to {_OWNER} is not fitted: call "
            "query_router.fit(embeddings, labels) first, or load a saved one with "
            "QueryRouter.load(path)."
        )
    return query_router


def _embedder(embedder: Any) -> Any:
    from confroute.predictive.embed import QueryEmbedder

    return embedder if isinstance(embedder, QueryEmbedder) else QueryEmbedder(embedder)
