"""LangChain chat model that routes every call with a confroute Router.

``pip install "confroute[langchain]"``. The conversation is turned into a
confroute prompt (``[{"role", "content"}]``, the ``developer`` role as
``system``); the Router scores the edge model's answer and keeps it or escalates.
An escalated request is answered by ``cloud`` (any LangChain chat model, e.g.
``ChatOpenAI``) when one is given, else by the Router's own cloud model.

Requests with tools (:meth:`ConfrouteChatModel.bind_tools`), structured output
(:meth:`ConfrouteChatModel.with_structured_output`), tool messages or non-text
content are escalated by rule to ``cloud`` (see
:data:`confroute.integrations.common.ESCALATION_RULE`): its tool calls and parsed
output come back unchanged.

Every answer carries the decision in ``message.response_metadata["confroute"]``
(see :func:`confroute.integrations.common.decision_metadata`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from confroute._validation import check_float, param_error
from confroute.errors import CloudError, InvalidParameterError, MissingDependencyError
from confroute.integrations.common import (
    answered,
    aroute_one,
    check_router,
    decision_metadata,
    escalation_reason,
    route_one,
    routed_metadata,
    rule_decision,
    settle,
    to_prompt,
    truncate_at_stop,
)
from confroute.types import Decision, Prompt, RoutedResponse

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        HumanMessage,
        convert_to_messages,
        convert_to_openai_messages,
    )
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.prompt_values import PromptValue
    from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
    from pydantic import ConfigDict
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise MissingDependencyError(
        "confroute.integrations.langchain needs langchain-core: "
        "pip install 'confroute[langchain]'"
    ) from exc

__all__ = ["ConfrouteChatModel"]

_OWNER = "ConfrouteChatModel"
_STRUCTURED = ("escalated by rule: the request asks for structured output (the edge model "
               "cannot guarantee a schema)")


class ConfrouteChatModel(BaseChatModel):
    """A LangChain chat model that answers on the edge model when it is likely right.

    Parameters
    ----------
    router : Router
        A calibrated :class:`~confroute.router.Router` with its ``edge`` model
        (and its ``cloud`` model when ``cloud`` is not given here).
    cloud : BaseChatModel, optional
        The chat model that answers escalated requests, including every request
        with tools or structured output (required for :meth:`bind_tools` and
        :meth:`with_structured_output`). Without it, escalated plain requests are
        answered by ``router.cloud``.
    cloud_prices : tuple of (float, float), optional
        Price per input token and per output token of ``cloud``, used to report
        the cost of its answers from their ``usage_metadata``; None reports the
        cost as None (unknown). Answers of ``router.cloud`` are priced by it.

    Notes
    -----
    ``response_metadata["confroute"]`` holds ``source`` ("edge"/"cloud"),
    ``p_good``, ``scores``, ``reason``, ``escalated_by_rule``, ``model`` (the
    model that answered), ``cost``, ``degraded`` and ``error``. A failed call to
    ``cloud`` gives its budget ticket back and, with the router's
    ``on_cloud_error="degrade"``, serves the edge answer marked ``degraded``;
    otherwise the cloud's exception propagates. ``stop`` cuts the edge answer at
    the first stop string; the router's cloud answer is cut the same way.
    Edge work runs one call at a time per Router (local models are not
    thread-safe; :func:`~confroute.integrations.common.edge_lock`), cloud calls
    concurrently.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    router: Any
    cloud: Any = None
    cloud_prices: Any = None

    def __init__(self, *, router: Any, cloud: Any = None, cloud_prices: Any = None,
                 **kwargs: Any) -> None:
        check_router(router, _OWNER)
        if cloud is not None and not isinstance(cloud, BaseChatModel):
            raise param_error("cloud", _OWNER, "a LangChain chat model (BaseChatModel) or None",
                              cloud, type_error=True)
        if cloud_prices is not None:
            if not isinstance(cloud_prices, (tuple, list)) or len(cloud_prices) != 2:
                raise param_error("cloud_prices", _OWNER,
                                  "a pair (price per input token, price per output token)",
                                  cloud_prices, type_error=True)
            cloud_prices = tuple(float(check_float(v, "cloud_prices", _OWNER, min_value=0.0))
                                 for v in cloud_prices)
        fields: dict[str, Any] = {"router": router, "cloud": cloud, "cloud_prices": cloud_prices}
        super().__init__(**fields, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "confroute"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"edge": getattr(self.router.edge, "name", None),
                "cloud": _model_name(self.cloud) or getattr(self.router.cloud, "name", None)}

    # ------------------------------------------------------------- tools, schemas
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Bind tools: every call then goes to ``cloud`` (the edge cannot call tools).

        Parameters
        ----------
        tools : sequence
            Anything ``cloud.bind_tools`` accepts (dicts, pydantic classes,
            functions, LangChain tools); converted by ``cloud`` itself.
        tool_choice : optional
            Passed to ``cloud.bind_tools``.
        **kwargs
            Passed to ``cloud.bind_tools`` (e.g. ``parallel_tool_calls``, ``strict``).

        Returns
        -------
        Runnable
            Returns the cloud's ``AIMessage`` with its ``tool_calls`` unchanged and
            the decision in ``response_metadata["confroute"]``.
        """
        self._require_cloud("bind_tools")
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=list(tools), **kwargs)

    def with_structured_output(
        self, schema: Any, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[Any, Any]:
        """Structured output from ``cloud`` (``cloud.with_structured_output``), by rule.

        Parameters
        ----------
        schema : pydantic class, TypedDict, JSON schema or OpenAI tool schema
        include_raw : bool, default False
            False returns the parsed object exactly as ``cloud`` parses it; True
            returns ``{"raw", "parsed", "parsing_error"}`` whose ``raw`` message
            carries the decision in ``response_metadata["confroute"]``.
        **kwargs
            Passed to ``cloud.with_structured_output`` (e.g. ``method``, ``strict``).

        Returns
        -------
        Runnable
        """
        cloud = self._require_cloud("with_structured_output")
        structured = cloud.with_structured_output(schema, include_raw=True, **kwargs)

        def run(value: Any, config: RunnableConfig) -> Any:
            prompt = to_prompt(convert_to_openai_messages(_messages_of(value)))
            out = structured.invoke(value, config=config)
            return self._structured_result(prompt, out, include_raw)

        async def arun(value: Any, config: RunnableConfig) -> Any:
            prompt = to_prompt(convert_to_openai_messages(_messages_of(value)))
            out = await structured.ainvoke(value, config=config)
            return self._structured_result(prompt, out, include_raw)

        return RunnableLambda(run, afunc=arun, name="ConfrouteStructuredOutput")

    def _structured_result(self, prompt: Prompt, out: Any, include_raw: bool) -> Any:
        raw = out["raw"]
        if isinstance(raw, AIMessage):
            raw = self._with_metadata(rule_decision(prompt, _STRUCTURED), raw)
        if include_raw:
            return {**out, "raw": raw}
        if out.get("parsing_error") is not None:
            raise out["parsing_error"]
        return out["parsed"]

    def _require_cloud(self, what: str) -> BaseChatModel:
        if self.cloud is None:
            raise InvalidParameterError(
                f"The 'cloud' parameter of {_OWNER} must be a LangChain chat model to use "
                f"{what}: the edge model cannot honour tools or structured output, so these "
                "requests always escalate. Got None."
            )
        return self.cloud

    # ----------------------------------------------------------------- generate
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, rule = self._request(messages, kwargs)
        if rule is not None:
            msg = self._cloud_runnable(kwargs).invoke(messages, stop=stop)
            return _result(self._with_metadata(rule_decision(prompt, rule), msg))
        d = route_one(self.router, prompt)
        if self.cloud is None:
            return self._from_routed(answered(self.router, self.router.answer([d])[0]), stop)
        if d.source == "edge":
            return self._from_edge(d, stop)
        try:
            msg = self.cloud.invoke(messages, stop=stop, **kwargs)
        except Exception as exc:
            settle(self.router, d, spent=False)
            return self._degraded(d, exc, stop)
        msg = self._with_metadata(d, msg)
        settle(self.router, d, spent=True, cost=msg.response_metadata["confroute"]["cost"])
        return _result(msg)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, rule = self._request(messages, kwargs)
        if rule is not None:
            msg = await self._cloud_runnable(kwargs).ainvoke(messages, stop=stop)
            return _result(self._with_metadata(rule_decision(prompt, rule), msg))
        d = await aroute_one(self.router, prompt)
        if self.cloud is None:
            resp = (await self.router.aanswer([d]))[0]
            return self._from_routed(answered(self.router, resp), stop)
        if d.source == "edge":
            return self._from_edge(d, stop)
        try:
            msg = await self.cloud.ainvoke(messages, stop=stop, **kwargs)
        except Exception as exc:
            settle(self.router, d, spent=False)
            return self._degraded(d, exc, stop)
        msg = self._with_metadata(d, msg)
        settle(self.router, d, spent=True, cost=msg.response_metadata["confroute"]["cost"])
        return _result(msg)

    # ------------------------------------------------------------------ helpers
    def _request(self, messages: list[BaseMessage], kwargs: dict[str, Any]
                 ) -> tuple[Prompt, str | None]:
        """The confroute prompt and the escalation rule's reason (None: route it)."""
        oa = convert_to_openai_messages(messages)
        rule = escalation_reason(oa, kwargs)
        if rule is not None:
            self._require_cloud("requests the edge model cannot honour")
        return to_prompt(oa), rule

    def _cloud_runnable(self, kwargs: dict[str, Any]) -> Runnable[Any, Any]:
        cloud = self._require_cloud("tools")
        rest = dict(kwargs)
        tools = rest.pop("tools", None)
        return cloud.bind_tools(tools, **rest) if tools else cloud.bind(**rest)

    def _with_metadata(self, d: Decision, msg: Any) -> AIMessage:
        """The cloud's message with the decision added to its response_metadata."""
        usage = getattr(msg, "usage_metadata", None) or {}
        cost = None
        if self.cloud_prices is not None and usage:
            cost = (usage.get("input_tokens", 0) * self.cloud_prices[0]
                    + usage.get("output_tokens", 0) * self.cloud_prices[1])
        model = msg.response_metadata.get("model_name") or _model_name(self.cloud)
        meta = decision_metadata(d, model=model, cost=cost)
        return msg.model_copy(
            update={"response_metadata": {**msg.response_metadata, "confroute": meta}})

    def _from_edge(self, d: Decision, stop: list[str] | None, *, error: str | None = None
                   ) -> ChatResult:
        model = getattr(self.router.edge, "name", None)
        meta = decision_metadata(d, model=model, cost=0.0, degraded=error is not None,
                                 error=error)
        text = truncate_at_stop(d.edge_answer or "", stop)
        return _result(AIMessage(content=text,
                                 response_metadata={"model_name": model, "confroute": meta}))

    def _degraded(self, d: Decision, exc: Exception, stop: list[str] | None) -> ChatResult:
        if self.router.on_cloud_error != "degrade" or d.edge_answer is None:
            raise exc
        return self._from_edge(d, stop, error=f"cloud call failed: {type(exc).__name__}: {exc}")

    def _from_routed(self, r: RoutedResponse, stop: list[str] | None) -> ChatResult:
        if r.text is None:
            raise CloudError(r.error or "the cloud model returned no answer", reason="no_answer")
        meta = routed_metadata(r, self.router)
        usage = None
        if r.usage:
            i, o = int(r.usage.get("prompt_tokens", 0)), int(r.usage.get("completion_tokens", 0))
            usage = {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}
        msg = AIMessage(content=truncate_at_stop(r.text, stop), usage_metadata=usage,
                        response_metadata={"model_name": meta["model"], "confroute": meta})
        return _result(msg)


def _result(msg: AIMessage) -> ChatResult:
    return ChatResult(generations=[ChatGeneration(message=msg)])


def _model_name(model: Any) -> str | None:
    for attr in ("model_name", "model", "name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def _messages_of(value: Any) -> list[BaseMessage]:
    """LangChain chat-model input (str, PromptValue or message list) as messages."""
    if isinstance(value, str):
        return [HumanMessage(content=value)]
    if isinstance(value, PromptValue):
        return value.to_messages()
    return convert_to_messages(value)

