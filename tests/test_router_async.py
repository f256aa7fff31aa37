"""Router.aroute / Router.acall: same decisions as the sync API, edge work off the
event loop, concurrent cloud calls, and no request lost when the cloud fails."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from confroute import CloudError, GenerationConfig, Router, Sample
from confroute.policies import BudgetPolicy
from tests.test_router import ScriptedCloud, _fitted, _synthetic


class AsyncCloud:
    """A cloud with ``agenerate`` that waits ``delay`` seconds per request."""

    name = "async-cloud"

    def __init__(self, delay: float = 0.2, fail: set[str] | None = None) -> None:
        self.delay = delay
        self.fail = fail or set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.sync_calls = 0
        self.prompts: list[object] = []

    def generate(self, prompts, config):  # pragma: no cover - must not be used
        self.sync_calls += 1
        raise AssertionError("acall must prefer agenerate")

    async def agenerate(self, prompts, config):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        out = []
        for p in prompts:
            self.prompts.append(p)
            if p in self.fail:
                raise CloudError(f"refused {p}", reason="http_429", status=429, attempts=2)
            out.append([Sample(text=f"async cloud: {p}", token_ids=(1, 2), prompt_tokens=3)])
        return out


def test_aroute_decides_like_route():
    router = _fitted()
    prompts, samples, _ = _synthetic(40, seed=5)
    sync = router.route(prompts, samples=samples)
    got = asyncio.run(router.aroute(prompts, samples=samples))
    assert [(d.source, d.p_good, d.edge_answer, d.reason) for d in got] == [
        (d.source, d.p_good, d.edge_answer, d.reason) for d in sync
    ]


def test_aroute_validates_like_route():
    router = _fitted()
    with pytest.raises(ValueError, match=r"'prompts' parameter of Router\.aroute"):
        asyncio.run(router.aroute([]))
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        asyncio.run(router.aroute("one prompt"))


def test_acall_matches_call_with_a_sync_cloud():
    prompts, samples, _ = _synthetic(30, seed=2)
    sync = _fitted(cloud=ScriptedCloud())(prompts, samples=samples)
    cloud = ScriptedCloud()
    got = asyncio.run(_fitted(cloud=cloud).acall(prompts, samples=samples))
    assert [(r.text, r.source, r.cost, dict(r.usage)) for r in got] == [
        (r.text, r.source, r.cost, dict(r.usage)) for r in sync
    ]
    # one request per escalated prompt (concurrent), never an edge-kept prompt
    up = [r.decision.prompt for r in got if r.decision.source == "cloud"]
    assert sorted(c[0] for c in cloud.calls) == sorted(up)
    assert all(len(c) == 1 for c in cloud.calls)


def test_acall_runs_cloud_calls_concurrently_with_agenerate():
    cloud = AsyncCloud(delay=0.3)
    router = _fitted(cloud=cloud)
    prompts, samples, _ = _synthetic(30, seed=2)
    t0 = time.perf_counter()
    responses = asyncio.run(router.acall(prompts, samples=samples))
    elapsed = time.perf_counter() - t0
    n_up = sum(r.decision.source == "cloud" for r in responses)
    assert n_up >= 3
    assert cloud.max_in_flight == n_up and cloud.sync_calls == 0
    assert elapsed < 0.3 * n_up / 2  # far below the sequential time
    for r in responses:
        if r.decision.source == "cloud":
            assert r.text == f"async cloud: {r.decision.prompt}" and r.source == "cloud"
        else:
            assert r.text == r.decision.edge_answer


def test_event_loop_stays_responsive_during_edge_work(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    class SlowEdge:
        """The tiny real model, made slow so blocking the loop would be visible."""

        name = "slow-edge"

        def __init__(self) -> None:
            self.inner = HFLanguageModel(*tiny_llama)
            self.thread: threading.Thread | None = None

        def generate(self, prompts, config):
            self.thread = threading.current_thread()
            time.sleep(0.4)
            return self.inner.generate(prompts, config)

    edge = SlowEdge()
    router = Router("sequence_logprob", "isotonic", "threshold", edge=edge,
                    edge_max_new_tokens=4)
    prompts = [f"What is {i} plus {i}?" for i in range(8)]
    router.calibrate(prompts, [i % 2 for i in range(8)])

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        decisions = await router.aroute(prompts[:2])
        task.cancel()
        return decisions, ticks

    decisions, ticks = asyncio.run(main())
    assert len(decisions) == 2 and all(isinstance(d.edge_answer, str) for d in decisions)
    assert edge.thread is not threading.main_thread()
    assert ticks >= 10  # the loop kept running for the whole 0.4 s edge call


@pytest.mark.parametrize("mode", ["degrade", "error", "raise"])
def test_acall_cloud_failure_never_loses_a_request(mode):
    prompts, samples, _ = _synthetic(30, seed=2)
    up = [d.prompt for d in _fitted().route(prompts, samples=samples) if d.source == "cloud"]
    cloud = AsyncCloud(delay=0.01, fail={up[0]})
    router = _fitted(cloud=cloud, on_cloud_error=mode)
    if mode == "raise":
        with pytest.raises(CloudError, match=f"refused {up[0]}"):
            asyncio.run(router.acall(prompts, samples=samples))
        assert set(cloud.prompts) == set(up)  # the others were still answered first
        return
    responses = asyncio.run(router.acall(prompts, samples=samples))
    assert len(responses) == len(prompts)
    failed = next(r for r in responses if r.decision.prompt == up[0])
    assert "http_429" in failed.error
    if mode == "degrade":
        assert failed.degraded and failed.source == "edge"
        assert failed.text == failed.decision.edge_answer
    else:
        assert failed.text is None and not failed.degraded
    others = [r for r in responses if r.decision.prompt in up[1:]]
    assert others and all(r.source == "cloud" and r.error is None for r in others)


def test_acall_failed_cloud_calls_give_budget_back():
    prompts, samples, _ = _synthetic(30, seed=2)
    policy = BudgetPolicy(max_cloud_fraction=0.5, enforce="total")
    router = _fitted(policy=policy, cloud=AsyncCloud(delay=0.0, fail=set(prompts)))
    responses = asyncio.run(router.acall(prompts, samples=samples))
    assert any(r.degraded for r in responses)
    assert policy.snapshot().requests == 30 and policy.snapshot().cloud == 0


def test_acall_budget_ledger_counts_successful_calls():
    prompts, samples, _ = _synthetic(30, seed=2)
    policy = BudgetPolicy(max_cloud_fraction=0.2, enforce="total")
    router = _fitted(policy=policy, cloud=AsyncCloud(delay=0.0))
    responses = asyncio.run(router.acall(prompts, samples=samples))
    n_cloud = sum(r.source == "cloud" for r in responses)
    assert policy.snapshot().cloud == n_cloud <= 6


def test_acall_without_cloud_degrades():
    router = _fitted()
    prompts, samples, _ = _synthetic(30, seed=2)
    responses = asyncio.run(router.acall(prompts, samples=samples))
    up = [r for r in responses if r.decision.source == "cloud"]
    assert up and all(r.degraded and "no cloud model" in r.error for r in up)


def test_acall_end_to_end_on_tiny_models(tiny_llama, tiny_gpt2):
    from confroute.models.hf import HFLanguageModel

    router = Router("sequence_logprob", "isotonic", "threshold",
                    edge=HFLanguageModel(*tiny_llama), cloud=HFLanguageModel(*tiny_gpt2),
                    edge_max_new_tokens=6, cloud_config=GenerationConfig(max_new_tokens=4))
    prompts = [f"What is {i} plus {i}?" for i in range(12)]
    router.calibrate(prompts, [i % 2 for i in range(12)])
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is 2 + 2?"}]
    responses = asyncio.run(router.acall([*prompts[:3], conv]))
    assert len(responses) == 4
    for r in responses:
        assert isinstance(r.text, str) and r.source == r.decision.source
        assert np.isfinite(r.decision.p_good)
    assert responses[3].decision.prompt == tuple(conv)
