"""ConfrouteChatModel against the real langchain-core and langchain-openai, offline.

The edge is a tiny real transformers model; the cloud is ``ChatOpenAI`` (or the
Router's own OpenAIModel) talking HTTP to the loopback server of
tests/fault_server.py, which answers tool calls and JSON response formats.
"""

from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_openai")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from confroute.errors import InvalidParameterError, InvalidTypeError, NotFittedError
from confroute.integrations.langchain import ConfrouteChatModel
from confroute.models.openai import OpenAIModel
from confroute.router import Router
from tests.fault_server import FaultServer
from tests.tiny_models import split_router

QUESTIONS = [f"What is {i} plus {i}?" for i in range(8)]


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


class Weather(BaseModel):
    city: str
    celsius: float


@pytest.fixture(scope="module")
def edge(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(*tiny_llama, name="tiny-edge")


@pytest.fixture(scope="module")
def split(edge):
    """(router, kept questions, escalated questions) over conversation prompts."""
    router, kept, escalated = split_router(edge, [conv(q) for q in QUESTIONS])
    assert kept and escalated
    return router, [p[0]["content"] for p in kept], [p[0]["content"] for p in escalated]


@pytest.fixture()
def server():
    with FaultServer(model_id="cloud-m", tool_arguments={"city": "Paris"},
                     json_content={"city": "Paris", "celsius": 21.5}) as srv:
        yield srv


def chat_cloud(srv: FaultServer) -> ChatOpenAI:
    return ChatOpenAI(model="cloud-m", base_url=srv.base_url, api_key="sk-test",
                      max_retries=0, timeout=10)


def test_plain_questions_are_routed_with_the_decision_in_response_metadata(split, server):
    router, kept, escalated = split
    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server))
    edge_msg = model.invoke(kept[0])
    meta = edge_msg.response_metadata["confroute"]
    expected = router.route([conv(kept[0])])[0]
    assert meta["source"] == "edge" and meta["model"] == "tiny-edge"
    assert edge_msg.content == expected.edge_answer
    assert meta["p_good"] == pytest.approx(expected.p_good) and meta["p_good"] >= 0.5
    assert set(meta["scores"]) == {"sequence_logprob"} and meta["cost"] == 0.0
    assert not meta["escalated_by_rule"]
    assert server.requests == []  # the edge answer was kept: no cloud call

    cloud_msg = model.invoke(escalated[0])
    meta = cloud_msg.response_metadata["confroute"]
    assert meta["source"] == "cloud" and meta["p_good"] < 0.5
    assert meta["model"] == "cloud-m" and cloud_msg.content == "The answer is 0"
    assert len(server.requests) == 1
    assert server.requests[0].body["messages"] == conv(escalated[0])


def test_bind_tools_returns_the_clouds_tool_calls(split, server):
    router, kept, _ = split

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return city

    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server))
    msg = model.bind_tools([get_weather]).invoke(kept[0])  # even a confident question
    assert isinstance(msg, AIMessage)
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    meta = msg.response_metadata["confroute"]
    assert meta["source"] == "cloud" and meta["escalated_by_rule"] and meta["p_good"] is None
    assert "tools" in meta["reason"] and meta["model"] == "cloud-m"
    sent = server.requests[0].body
    assert sent["tools"][0]["function"]["name"] == "get_weather"


def test_bind_tools_passes_tool_choice_to_the_cloud(split, server):
    router, kept, _ = split
    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server))
    msg = model.bind_tools([Weather], tool_choice="Weather").invoke(kept[0])
    assert msg.tool_calls[0]["name"] == "Weather"
    assert server.requests[0].body["tool_choice"]["function"]["name"] == "Weather"


@pytest.mark.parametrize("include_raw", [False, True])
def test_with_structured_output_returns_a_parsed_object(split, server, include_raw):
    router, kept, _ = split
    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server))
    out = model.with_structured_output(Weather, include_raw=include_raw).invoke(kept[0])
    parsed = out["parsed"] if include_raw else out
    assert parsed == Weather(city="Paris", celsius=21.5)
    assert server.requests[0].body["response_format"]["type"] == "json_schema"
    if include_raw:
        meta = out["raw"].response_metadata["confroute"]
        assert meta["source"] == "cloud" and meta["escalated_by_rule"]
        assert "structured output" in meta["reason"]


def test_async_routes_and_escalates_like_sync(split, server):
    router, kept, escalated = split
    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server))

    async def go():
        a = await model.ainvoke(kept[0])
        b = await model.ainvoke(escalated[0])
        c = await model.bind_tools([Weather]).ainvoke(escalated[0])
        d = await model.with_structured_output(Weather).ainvoke(kept[0])
        return a, b, c, d

    a, b, c, d = asyncio.run(go())
    assert a.response_metadata["confroute"]["source"] == "edge"
    assert b.response_metadata["confroute"]["source"] == "cloud"
    assert c.tool_calls[0]["args"] == {"city": "Paris"}
    assert d == Weather(city="Paris", celsius=21.5)


def test_concurrent_calls_share_the_edge_one_at_a_time(split, server):
    router, kept, escalated = split
    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server))
    questions = kept[:2] + escalated[:2]
    out = asyncio.run(model.abatch(questions))
    sources = [m.response_metadata["confroute"]["source"] for m in out]
    assert sources == ["edge", "edge", "cloud", "cloud"]
    with_threads = model.batch(questions, config={"max_concurrency": 4})
    assert [m.response_metadata["confroute"]["p_good"] for m in with_threads] == [
        m.response_metadata["confroute"]["p_good"] for m in out]


def test_without_a_chat_cloud_the_routers_cloud_answers(edge, server):
    cloud = OpenAIModel("cloud-m", base_url=server.base_url, api_key="sk-test", max_retries=0)
    router, kept, escalated = split_router(edge, [conv(q) for q in QUESTIONS], cloud=cloud)
    model = ConfrouteChatModel(router=router)
    n0 = len(server.requests)
    msg = model.invoke(escalated[0][0]["content"])
    meta = msg.response_metadata["confroute"]
    assert meta["source"] == "cloud" and meta["model"] == "cloud-m"
    assert msg.content == "The answer is 0" and msg.usage_metadata["output_tokens"] > 0
    assert len(server.requests) == n0 + 1
    kept_msg = asyncio.run(model.ainvoke(kept[0][0]["content"]))
    assert kept_msg.response_metadata["confroute"]["source"] == "edge"
    with pytest.raises(InvalidParameterError, match="'cloud' parameter of ConfrouteChatModel"):
        model.bind_tools([Weather])
    with pytest.raises(InvalidParameterError, match="'cloud' parameter"):
        model.with_structured_output(Weather)
    n = len(server.requests)
    with pytest.raises(InvalidParameterError, match="cannot honour"):
        model.invoke([HumanMessage(content="weather?"), ToolMessage(content="21",
                                                                     tool_call_id="c1")])
    assert len(server.requests) == n  # refused before any model call


def test_conversations_are_converted_and_tool_results_escalate(split, server):
    router, kept, _ = split
    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server))
    msgs = [SystemMessage(content="Be brief."), HumanMessage(content=kept[0])]
    model.invoke(msgs)  # routed: whatever the decision, the cloud saw the same conversation
    history = [HumanMessage(content="weather?"),
               AIMessage(content="", tool_calls=[{"name": "Weather", "args": {}, "id": "c1"}]),
               ToolMessage(content="21", tool_call_id="c1")]
    msg = model.invoke(history)
    meta = msg.response_metadata["confroute"]
    assert meta["escalated_by_rule"] and "tool calls or tool results" in meta["reason"]


def test_a_failed_cloud_degrades_to_the_edge_answer(split):
    router, _, escalated = split
    with FaultServer(["500"]) as srv:
        model = ConfrouteChatModel(router=router, cloud=chat_cloud(srv))
        msg = model.invoke(escalated[0])
    meta = msg.response_metadata["confroute"]
    assert meta["degraded"] and meta["source"] == "edge" and "cloud call failed" in meta["error"]
    assert msg.content == router.route([conv(escalated[0])])[0].edge_answer


def test_the_budget_ledger_counts_only_answered_escalations(edge):
    from confroute.policies import BudgetPolicy

    router, _, escalated = split_router(edge, [conv(q) for q in QUESTIONS],
                                        policy=BudgetPolicy(max_cloud_fraction=1.0))
    router.policy.reset()
    with FaultServer(["500"], model_id="cloud-m") as srv:
        model = ConfrouteChatModel(router=router, cloud=chat_cloud(srv), cloud_prices=(1.0, 0.0))
        failed = model.invoke(escalated[0])
        assert failed.response_metadata["confroute"]["degraded"]
        assert router.policy.snapshot().cloud == 0  # the failed call gave its ticket back
        ok = model.invoke(escalated[1])
    assert ok.response_metadata["confroute"]["source"] == "cloud"
    ledger = router.policy.snapshot()
    assert (ledger.requests, ledger.cloud) == (2, 1)
    assert ledger.spent == pytest.approx(ok.usage_metadata["input_tokens"])


def test_stop_cuts_the_answer_at_the_first_stop_string(edge, server):
    cloud = OpenAIModel("cloud-m", base_url=server.base_url, api_key="sk-test", max_retries=0)
    router, _, escalated = split_router(edge, [conv(q) for q in QUESTIONS], cloud=cloud)
    model = ConfrouteChatModel(router=router)
    q = escalated[0][0]["content"]
    assert model.invoke(q, stop=[" is", " answer"]).content == "The"
    assert model.invoke(q, stop=["nowhere"]).content == "The answer is 0"


def test_cloud_prices_give_the_cost_of_cloud_answers(split, server):
    router, _, escalated = split
    model = ConfrouteChatModel(router=router, cloud=chat_cloud(server), cloud_prices=(1.0, 2.0))
    msg = model.invoke(escalated[0])
    usage = msg.usage_metadata
    assert msg.response_metadata["confroute"]["cost"] == pytest.approx(
        usage["input_tokens"] * 1.0 + usage["output_tokens"] * 2.0)


def test_bad_arguments_are_typed_errors(split, edge):
    router, _, _ = split
    with pytest.raises(InvalidTypeError, match="'router' parameter of ConfrouteChatModel"):
        ConfrouteChatModel(router="router.json")
    with pytest.raises(NotFittedError, match="calibrate"):
        ConfrouteChatModel(router=Router(edge=edge))
    with pytest.raises(InvalidTypeError, match="'cloud' parameter"):
        ConfrouteChatModel(router=router, cloud="gpt-4o")
    with pytest.raises(InvalidTypeError, match="'cloud_prices' parameter"):
        ConfrouteChatModel(router=router, cloud_prices=1.0)
    with pytest.raises(InvalidParameterError, match="'cloud_prices' parameter"):
        ConfrouteChatModel(router=router, cloud_prices=(-1.0, 1.0))
    assert math.isfinite(router.route([conv("x")])[0].p_good)
