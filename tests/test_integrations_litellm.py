"""ConfrouteRoutingStrategy against the real installed LiteLLM, offline.

Two loopback OpenAI-compatible servers (tests/fault_server.py) are the edge and
the cloud deployments of one ``litellm.Router`` model group; the confroute side
is a tiny real transformers edge model (post-generation) or a fitted KNN query
router over a tiny in-test text encoder (pre-generation).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

# The confroute module first: it keeps LiteLLM from fetching its price map on import.
pytest.importorskip("confroute.integrations.litellm")

import litellm

from confroute.errors import InvalidParameterError, InvalidTypeError, NotFittedError
from confroute.integrations.litellm import ConfrouteRoutingStrategy, deployments_of
from confroute.predictive import KNNRouter
from tests.fault_server import FaultServer
from tests.tiny_models import split_router

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

QUESTIONS = [f"What is {i} plus {i}?" for i in range(8)]
GROUP = "confroute"


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


class HashEmbedder:
    """Deterministic tiny encoder: character codes hashed into a unit vector."""

    name = "hash16"

    def encode(self, texts):
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for i, t in enumerate(texts):
            for j, ch in enumerate(t):
                out[i, (ord(ch) * 31 + j) % 16] += 1.0
            out[i, 0] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def split(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    edge = HFLanguageModel(*tiny_llama, name="tiny-edge")
    router, kept, escalated = split_router(edge, [conv(q) for q in QUESTIONS])
    assert kept and escalated
    return router, [p[0]["content"] for p in kept], [p[0]["content"] for p in escalated]


@pytest.fixture()
def servers():
    with FaultServer(model_id="edge-m") as e, FaultServer(model_id="cloud-m") as c:
        yield e, c


def llm_router(edge_srv: FaultServer, cloud_srv: FaultServer):
    def deployment(srv: FaultServer, model: str, ident: str) -> dict:
        return {"model_name": GROUP, "model_info": {"id": ident},
                "litellm_params": {"model": f"openai/{model}", "api_base": srv.base_url,
                                   "api_key": "sk-test"}}

    return litellm.Router(model_list=[deployment(edge_srv, "edge-m", "edge"),
                                      deployment(cloud_srv, "cloud-m", "cloud")],
                          num_retries=0)


def test_a_completion_is_routed_and_reports_which_model_answered(split, servers):
    router, kept, escalated = split
    edge_srv, cloud_srv = servers
    llm = llm_router(edge_srv, cloud_srv)
    strategy = ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", router=router).install()

    resp = llm.completion(model=GROUP, messages=conv(kept[0]))
    info = strategy.decision_for(resp)
    expected = router.route([conv(kept[0])])[0]
    assert resp.model == "edge-m" and resp._hidden_params["model_id"] == "edge"
    assert info["source"] == "edge" and info["deployment"] == "edge" and info["model"] == "edge-m"
    assert info["p_good"] == pytest.approx(expected.p_good)
    assert (len(edge_srv.requests), len(cloud_srv.requests)) == (1, 0)

    resp = llm.completion(model=GROUP, messages=conv(escalated[0]))
    info = strategy.decision_for(resp)
    assert resp.model == "cloud-m" and info["deployment"] == "cloud"
    assert info["source"] == "cloud" and info["p_good"] < 0.5 and "threshold" in info["reason"]
    assert (len(edge_srv.requests), len(cloud_srv.requests)) == (1, 1)
    assert cloud_srv.requests[0].body["messages"] == conv(escalated[0])


def test_async_completions_are_routed(split, servers):
    router, kept, escalated = split
    llm = llm_router(*servers)
    strategy = ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", router=router).install()

    async def go():
        return await asyncio.gather(llm.acompletion(model=GROUP, messages=conv(kept[0])),
                                    llm.acompletion(model=GROUP, messages=conv(escalated[0])))

    a, b = asyncio.run(go())
    assert (a.model, strategy.decision_for(a)["source"]) == ("edge-m", "edge")
    assert (b.model, strategy.decision_for(b)["source"]) == ("cloud-m", "cloud")


def test_tools_and_json_formats_go_to_the_cloud_by_rule(split, servers):
    router, kept, _ = split
    llm = llm_router(*servers)
    strategy = ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", router=router).install()
    tool = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    resp = llm.completion(model=GROUP, messages=conv(kept[0]), tools=[tool])
    info = strategy.decision_for(resp)
    assert resp.choices[0].message.tool_calls[0].function.name == "weather"
    assert info["source"] == "cloud" and info["escalated_by_rule"] and info["p_good"] is None
    resp = llm.completion(model=GROUP, messages=conv(kept[0]),
                          response_format={"type": "json_object"})
    assert strategy.decision_for(resp)["deployment"] == "cloud"


def test_a_query_router_picks_the_deployment_before_any_generation(servers):
    hard = [f"prove theorem {i} about {w}" for i, w in enumerate("abcdefgh")]
    easy = [f"easy hi {w}{w}" for w in "abcdefgh"]
    enc = HashEmbedder()
    qr = KNNRouter(k=1).fit(enc.encode(hard + easy), ["strong"] * 8 + ["weak"] * 8)
    edge_srv, cloud_srv = servers
    llm = llm_router(edge_srv, cloud_srv)
    strategy = ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", query_router=qr,
                                        embedder=enc).install()
    up = llm.completion(model=GROUP, messages=conv(hard[2]))
    down = asyncio.run(llm.acompletion(model=GROUP, messages=conv(easy[3])))
    assert (up.model, down.model) == ("cloud-m", "edge-m")
    info = strategy.decision_for(up)
    assert info["scores"] == {"p_strong": 1.0} and info["p_good"] is None
    assert info["reason"] == "p_strong 1.00 > threshold 0.50"
    assert strategy.decision_for(down)["scores"] == {"p_strong": 0.0}
    assert (len(edge_srv.requests), len(cloud_srv.requests)) == (1, 1)


def test_a_retried_call_keeps_its_decision(split):
    router, _, escalated = split
    with FaultServer(model_id="edge-m") as e, FaultServer(["500"], model_id="cloud-m") as c:
        llm = llm_router(e, c)
        strategy = ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", router=router)
        kwargs = {"litellm_call_id": "fixed-id"}
        first = strategy.get_available_deployment(GROUP, conv(escalated[0]),
                                                  request_kwargs=kwargs)
        again = strategy.get_available_deployment(GROUP, conv("a different text"),
                                                  request_kwargs=kwargs)
        assert first is again and first["model_info"]["id"] == "cloud"
        fresh: dict = {}
        strategy.get_available_deployment(GROUP, conv(escalated[0]), request_kwargs=fresh)
        assert fresh["litellm_call_id"] != "fixed-id"


def test_decision_for_an_unknown_response_is_none(split, servers):
    router, _, _ = split
    llm = llm_router(*servers)
    strategy = ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", router=router)
    resp = llm.completion(model=GROUP, messages=conv("hi"))  # default routing, not installed
    assert strategy.decision_for(resp) is None


def test_bad_arguments_are_typed_errors(split, servers):
    router, _, _ = split
    llm = llm_router(*servers)
    assert sorted(d["model_info"]["id"] for d in deployments_of(llm)) == ["cloud", "edge"]
    with pytest.raises(InvalidParameterError, match=r"'edge' parameter.*'edge', 'cloud'"):
        ConfrouteRoutingStrategy(llm, edge="nope", cloud="cloud", router=router)
    with pytest.raises(InvalidParameterError, match="exactly one of 'router'"):
        ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud")
    with pytest.raises(InvalidTypeError, match="'router' parameter"):
        ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", router="router.json")
    with pytest.raises(NotFittedError, match=r"query_router\.fit"):
        ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", query_router=KNNRouter())
    with pytest.raises(InvalidParameterError, match="'threshold' parameter"):
        ConfrouteRoutingStrategy(llm, edge="edge", cloud="cloud", router=router, threshold=2.0)
    with pytest.raises(InvalidTypeError, match="'llm_router' parameter"):
        ConfrouteRoutingStrategy(object(), edge="edge", cloud="cloud", router=router)
