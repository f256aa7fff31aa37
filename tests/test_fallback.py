"""The cloud fallback chain on real parts: a tiny real edge model, two loopback
OpenAI-compatible servers (the primary failing with HTTP 500 or refusing
connections, the fallback healthy), ``OpenAIModel`` talking real HTTP to them, an
enforced spend ledger, through ``Router.__call__``, ``Router.acall`` and the
routing server with 16 concurrent clients."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from confroute import GenerationConfig, Router
from confroute.estimators.logprob import SequenceLogProb
from confroute.models.openai import OpenAIModel
from confroute.policies import CostAwarePolicy
from tests.fault_server import FaultServer

PROMPTS = [f"Question number {i}: what is {i} + {i}?" for i in range(16)]
FALLBACK_PRICES = {"prompt": 2.0, "completion": 3.0}


def _refused_url() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@contextmanager
def _primary(kind: str):
    """Base URL of a primary cloud that is down: HTTP 500 on every attempt, or refused."""
    if kind == "refused":
        yield _refused_url(), None
        return
    with FaultServer(["500"] * 400) as srv:
        yield srv.base_url, srv


def _router(edge, clouds) -> tuple[Router, CostAwarePolicy]:
    """Escalates every prompt (uninformative labels give p_good = 0.5 to all; the
    cost-aware rule escalates below 1) under an enforced, never-binding spend cap."""
    est = SequenceLogProb(max_new_tokens=4)
    got = est.estimate(PROMPTS[:4], edge)
    policy = CostAwarePolicy(cloud_cost=1e-3, quality_value=1.0, spend_budget=1e6)
    router = Router(est, "isotonic", policy, edge=edge, cloud=clouds, edge_max_new_tokens=4,
                    on_cloud_error="error", cloud_config=GenerationConfig(max_new_tokens=8))
    router.calibrate(PROMPTS[:4] * 2, [1] * 4 + [0] * 4, samples=got.samples * 2)
    return router, policy


def _clouds(primary_url: str, fallback_url: str) -> list[OpenAIModel]:
    return [
        OpenAIModel("big", base_url=primary_url, name="primary", api_key_env=None,
                    max_retries=1, backoff_base=0.0, backoff_max=0.0, timeout=5.0,
                    price_table={"prompt": 100.0, "completion": 100.0}),
        OpenAIModel("backup", base_url=fallback_url, name="fallback", api_key_env=None,
                    max_retries=0, timeout=10.0, price_table=FALLBACK_PRICES),
    ]


def _expected_cost(usage) -> float:
    return (usage["prompt_tokens"] * FALLBACK_PRICES["prompt"]
            + usage["completion_tokens"] * FALLBACK_PRICES["completion"]) / 1e6


def _check_all_answered_by_fallback(responses, policy, n_before=0, spent_before=0.0):
    assert len(responses) == len(PROMPTS)
    assert [r.error for r in responses] == [None] * len(PROMPTS)  # 0 lost
    assert {(r.source, r.answered_by) for r in responses} == {("cloud", "fallback")}
    assert all(r.text and r.text.startswith("The answer is") for r in responses)
    for r in responses:
        assert r.cost == pytest.approx(_expected_cost(r.usage)) and r.cost > 0
    snap = policy.snapshot()
    # one charge per answered request, at the fallback's real price
    assert snap.cloud - n_before == len(PROMPTS)
    assert snap.spent - spent_before == pytest.approx(sum(r.cost for r in responses))


@pytest.fixture(scope="module")
def edge(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(*tiny_llama, use_chat_template=False, name="tiny-edge")


@pytest.mark.parametrize("down", ["http_500", "refused"])
def test_sync_call_falls_back_for_every_escalated_prompt(edge, down):
    with _primary(down) as (url, primary_srv), FaultServer() as fallback_srv:
        router, policy = _router(edge, _clouds(url, fallback_srv.base_url))
        assert [m.name for m in router.clouds] == ["primary", "fallback"]
        assert router.cloud is router.clouds[0]
        responses = router(PROMPTS)
        _check_all_answered_by_fallback(responses, policy)
        assert len(fallback_srv.requests) == len(PROMPTS)
        if primary_srv is not None:  # the primary was really tried (and retried) first
            assert len(primary_srv.requests) >= 2 * len(PROMPTS)


@pytest.mark.parametrize("down", ["http_500", "refused"])
def test_async_call_falls_back_for_every_escalated_prompt(edge, down):
    with _primary(down) as (url, _), FaultServer() as fallback_srv:
        router, policy = _router(edge, _clouds(url, fallback_srv.base_url))
        responses = asyncio.run(router.acall(PROMPTS))
        _check_all_answered_by_fallback(responses, policy)
        assert len(fallback_srv.requests) == len(PROMPTS)


def test_primary_answers_when_healthy_and_every_cloud_down_is_an_error(edge):
    with FaultServer() as primary_srv, FaultServer() as fallback_srv:
        router, policy = _router(edge, _clouds(primary_srv.base_url, fallback_srv.base_url))
        responses = router(PROMPTS[:3])
        assert {r.answered_by for r in responses} == {"primary"}
        assert fallback_srv.requests == []  # the fallback is not called
    router.cloud = _clouds(_refused_url(), _refused_url())
    before = policy.snapshot()
    responses = router(PROMPTS[:3])
    assert all(r.text is None and r.cloud_error is not None for r in responses)
    assert {r.answered_by for r in responses} == {None}
    after = policy.snapshot()  # failed, unbilled calls give their budget back
    assert (after.cloud, after.spent) == (before.cloud, pytest.approx(before.spent))


def test_a_single_cloud_and_bad_chains():
    from confroute.errors import InvalidTypeError

    cloud = OpenAIModel("m", base_url="http://127.0.0.1:9/v1", name="only")
    router = Router(cloud=cloud)
    assert router.cloud is cloud and router.clouds == (cloud,)
    assert Router().clouds == () and Router().cloud is None
    with pytest.raises(InvalidTypeError, match=r"'cloud\[1\]' parameter of Router"):
        Router(cloud=[cloud, "gpt-4o"])
    with pytest.raises(InvalidTypeError, match=r"'cloud' parameter of Router"):
        Router(cloud="gpt-4o")


def test_server_with_16_concurrent_clients_is_answered_by_the_fallback(edge):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from confroute.serve import create_app, serve_in_thread

    with _primary("http_500") as (url, _), FaultServer() as fallback_srv:
        router, _ = _router(edge, _clouds(url, fallback_srv.base_url))
        app = create_app(router, model_name="routed", max_cloud_cost=1e6,
                         prices={"input": 1.0, "output": 1.0})
        with serve_in_thread(app) as srv:
            def ask(prompt: str) -> tuple[int, dict]:
                r = httpx.post(f"{srv.base_url}/chat/completions", timeout=120, json={
                    "model": "routed", "messages": [{"role": "user", "content": prompt}]})
                return r.status_code, r.json()

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(ask, PROMPTS))
            health = httpx.get(f"{srv.base_url.removesuffix('/v1')}/health", timeout=30).json()
    assert [status for status, _ in results] == [200] * len(PROMPTS)  # 0 lost
    infos = [body["confroute"] for _, body in results]
    assert {(i["source"], i["answered_by"], i["error"]) for i in infos} == {
        ("cloud", "fallback", None)}
    for _, body in results:
        assert body["choices"][0]["message"]["content"].startswith("The answer is")
        assert body["model"] == "fallback"  # the served model field names who answered
        assert body["confroute"]["cost"] == pytest.approx(_expected_cost(body["usage"]))
    ledger = health["ledger"]
    assert ledger["cloud"] == len(PROMPTS)  # one charge per answered request
    assert ledger["spent"] == pytest.approx(sum(i["cost"] for i in infos))
    assert len(fallback_srv.requests) == len(PROMPTS)
