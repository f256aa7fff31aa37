"""The routing server with a decision log, shadow labelling and drift gauges, over real
loopback HTTP: uvicorn in a thread, the official ``openai`` client with 16 concurrent
clients, a tiny real edge model, and ``OpenAIModel`` talking to the fault-injecting
server as the (shadow) cloud."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest

from confroute import GenerationConfig, Router
from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.estimators.logprob import SequenceLogProb
from confroute.models.openai import OpenAIModel
from confroute.policies import ThresholdPolicy
from confroute.traffic import DecisionLog, router_fingerprint
from tests.fault_server import FaultServer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from confroute.serve import create_app, serve_in_thread  # noqa: E402
from confroute.shadow import build_traffic_tap  # noqa: E402

CAL = ["What is the capital of France?", "What is 2 + 2?", "Who wrote Hamlet?",
       "What is the capital of Italy?", "Say yes or no.", "Count from 1 to 5."]
N_CLIENTS = 16


@pytest.fixture(scope="module")
def edge(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(*tiny_llama, use_chat_template=False)


def keep_all_router(edge, cloud) -> Router:
    """Calibrated on uninformative labels (p_good = 0.5 everywhere) with a threshold of 0:
    every request is kept on the edge. The calibration scores are recorded as
    ``confroute calibrate`` records them (the drift monitor's PSI reference)."""
    est = SequenceLogProb(max_new_tokens=6)
    got = est.estimate(CAL, edge)
    router = Router(est, "isotonic", ThresholdPolicy(min_p_good=0.0), edge=edge, cloud=cloud,
                    edge_max_new_tokens=6, cloud_config=GenerationConfig(max_new_tokens=16))
    n = len(CAL)
    router.calibrate(CAL * 2, [1] * n + [0] * n, samples=got.samples * 2)
    router.calibration_["scores"] = [[float(s)] for s in got.scores]
    return router


def _cloud(srv: FaultServer) -> OpenAIModel:
    return OpenAIModel("test-model", base_url=srv.base_url, api_key="unused", max_retries=0,
                       timeout=60.0)


async def _ask_all(base_url: str, n: int) -> list[object]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                  timeout=120) as client:
        sem = asyncio.Semaphore(N_CLIENTS)

        async def one(i: int) -> object:
            async with sem:
                return await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"request {i}: hello"}])

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def _wait_idle(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if health["traffic"]["shadow"]["pending"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_shadow_calls_capped_never_wait_and_label_the_log(tmp_path, edge):
    gate = threading.Event()

    def slow_answer(body: dict) -> str:  # the shadow cloud answers only once the gate opens
        gate.wait(60)
        return "The answer is 4"

    n, cap = 40, 6
    with FaultServer(answer=slow_answer) as cloud_srv:
        router = keep_all_router(edge, _cloud(cloud_srv))
        tap = build_traffic_tap(router, tmp_path / "decisions.sqlite", shadow_rate=0.5,
                                shadow_max_calls=cap, seed=1, drift_min_samples=5)
        app = create_app(router, max_batch=4, traffic=tap)
        with serve_in_thread(app) as srv:
            responses = asyncio.run(_ask_all(srv.base_url, n))
            # every response is back while the shadow calls are still held by the cloud
            assert len(responses) == n and not gate.is_set()
            assert all(r.model_extra["confroute"]["source"] == "edge" for r in responses)
            gate.set()
            health = _wait_idle(srv.url)
            metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        n_cloud_requests = len(cloud_srv.requests)
    traffic = health["traffic"]
    assert 1 <= n_cloud_requests == traffic["shadow"]["calls"] <= cap
    assert traffic["counts"]["logged"] == n
    assert traffic["counts"]["shadow_ok"] == traffic["counts"]["labelled"] == n_cloud_requests
    assert traffic["drift"]["cloud_share"] == 0.0 and traffic["drift"]["n_decisions"] == n
    fp = router_fingerprint(router)
    with DecisionLog(tmp_path / "decisions.sqlite", router_fingerprint=fp,
                     store_prompts=None) as log:
        rows = log.rows()
        assert len(rows) == n  # one row per request
        assert len(log.labelled()) == n_cloud_requests
    assert {r["router_fingerprint"] for r in rows} == {fp}
    assert all(r["decision"] == "edge" and len(r["prompt"]) == 64 for r in rows)  # hashed
    assert all(r["cloud_answer_hash"] for r in rows if r["label"] is not None)

    families = {f.name: f for f in parser.text_string_to_metric_families(metrics)}
    for name in ("confroute_drift_cloud_share", "confroute_drift_agreement",
                 "confroute_drift_ece", "confroute_drift_psi"):
        assert families[name].type == "gauge", name
    value = {f.name: f.samples[0].value for f in families.values() if f.samples}
    assert value["confroute_drift_cloud_share"] == 0.0
    assert value["confroute_drift_agreement"] == pytest.approx(
        np.mean([r["label"] for r in rows if r["label"] is not None]))
    assert np.isfinite(value["confroute_drift_psi"]) and np.isfinite(value["confroute_drift_ece"])
    calls = {s.labels["outcome"]: s.value for s in families["confroute_shadow_calls"].samples
             if s.name.endswith("_total")}
    assert calls == {"ok": n_cloud_requests, "failed": 0}
    assert families["confroute_decision_log_rows"].samples[0].value == n


def _contents(responses: list[object]) -> list[tuple[str, str, bool]]:
    return [(r.choices[0].message.content, r.model_extra["confroute"]["source"],
             r.model_extra["confroute"]["degraded"]) for r in responses]


def test_a_failing_shadow_cloud_changes_no_response(tmp_path, edge):
    n = 24
    with FaultServer(["500"] * 200) as cloud_srv:
        router = keep_all_router(edge, _cloud(cloud_srv))
        tap = build_traffic_tap(router, tmp_path / "d.sqlite", shadow_rate=1.0, seed=0)
        # max_batch=1: each request is routed alone, so answers do not depend on batching
        with serve_in_thread(create_app(router, max_batch=1, traffic=tap)) as srv:
            shadowed = asyncio.run(_ask_all(srv.base_url, n))
            health = _wait_idle(srv.url)
        assert len(cloud_srv.requests) == n  # every kept request was shadowed, and failed
    with serve_in_thread(create_app(keep_all_router(edge, None), max_batch=1)) as srv:
        plain = asyncio.run(_ask_all(srv.base_url, n))
    assert _contents(shadowed) == _contents(plain)
    counts = health["traffic"]["counts"]
    assert counts["shadow_failed"] == n and counts["labelled"] == 0 and counts["logged"] == n
    assert health["traffic"]["drift"]["agreement"] is None  # no label, no agreement


def test_traffic_options_are_checked_at_start_up(tmp_path, edge):
    router = keep_all_router(edge, None)
    for rate in (1.5, -0.1):
        with pytest.raises(InvalidParameterError, match="'shadow_rate' parameter of "
                           r"build_traffic_tap must be a float in \[0, 1\]"):
            build_traffic_tap(router, tmp_path / "a.sqlite", shadow_rate=rate)
    with pytest.raises(InvalidParameterError, match=r"'shadow_rate'.*no cloud model"):
        build_traffic_tap(router, tmp_path / "a.sqlite", shadow_rate=0.5)
    with FaultServer() as srv:
        cloudy = keep_all_router(edge, _cloud(srv))
        with pytest.raises(InvalidParameterError, match=r"'labeler'.*'cloud_agreement' or "
                           "'judge'"):
            build_traffic_tap(cloudy, tmp_path / "a.sqlite", shadow_rate=0.5,
                              labeler="se_preference")
        with pytest.raises(InvalidParameterError, match="'max_calls'"):
            build_traffic_tap(cloudy, tmp_path / "a.sqlite", shadow_rate=0.5,
                              shadow_max_calls=-1)
    with pytest.raises(InvalidTypeError, match="'router'"):
        build_traffic_tap("router.json", tmp_path / "a.sqlite")  # type: ignore[arg-type]
    assert not (tmp_path / "a.sqlite").exists()  # nothing opened before the checks
    other = tmp_path / "other.sqlite"
    DecisionLog(other, router_fingerprint="someone-else").close()
    with pytest.raises(InvalidParameterError, match=r"'router_fingerprint'.*someone-else"):
        build_traffic_tap(router, other)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--decision-log", "d.sqlite", "--shadow-rate", "1.5", "--cloud", "x"],
         "'--shadow-rate' parameter of confroute serve must be a float in [0, 1]"),
        (["--shadow-rate", "0.5", "--cloud", "x"], "need '--decision-log FILE'"),
        (["--decision-log", "d.sqlite", "--shadow-rate", "0.5"], "needs '--cloud'"),
        (["--decision-log", "d.sqlite", "--shadow-max-calls", "-2"], "'--shadow-max-calls'"),
    ],
)
def test_cli_serve_traffic_options_fail_before_any_model_loads(extra, message):
    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args

    args = build_parser().parse_args(["serve", "--edge", "/no/such/model", *extra])
    with pytest.raises(InvalidParameterError) as err:
        app_from_args(args)
    assert message in str(err.value)


def test_cli_serve_with_a_decision_log(tmp_path, edge):
    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args
    from confroute.models.hf import HFLanguageModel
    from tests.tiny_models import save_causal_lm

    model_dir = save_causal_lm(tmp_path / "edge")
    router = keep_all_router(HFLanguageModel(str(model_dir), use_chat_template=False), None)
    router.save(tmp_path / "router.json")
    with FaultServer() as cloud_srv:
        args = build_parser().parse_args([
            "serve", "--router", str(tmp_path / "router.json"), "--edge", str(model_dir),
            "--cloud", f"openai:test-model@{cloud_srv.base_url}", "--decision-log",
            str(tmp_path / "d.sqlite"), "--store-prompts", "text", "--shadow-rate", "1",
            "--shadow-max-calls", "1"])
        with serve_in_thread(app_from_args(args)) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
            for q in ("What is 2 + 2?", "Who wrote Hamlet?"):
                client.chat.completions.create(model="m",
                                               messages=[{"role": "user", "content": q}])
            client.close()
            health = _wait_idle(srv.url)
        assert len(cloud_srv.requests) == 1  # the shadow cap
    assert health["traffic"]["store_prompts"] == "text"
    saved = Router.load(tmp_path / "router.json")
    with DecisionLog(tmp_path / "d.sqlite", router_fingerprint=router_fingerprint(saved),
                     store_prompts="text") as log:
        assert [json.loads(r["prompt"]) for r in log.rows()] == [
            [{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Who wrote Hamlet?")]


def test_escalations_are_labelled_for_free_and_a_crossed_bound_warns(tmp_path, edge, caplog):
    n = 12
    with FaultServer() as cloud_srv:
        router = keep_all_router(edge, _cloud(cloud_srv))
        router.policy.set_params(min_p_good=1.0)  # every request escalates
        tap = build_traffic_tap(router, tmp_path / "d.sqlite", shadow_rate=1.0, seed=0,
                                drift_bounds={"cloud_share": (None, 0.5)}, drift_min_samples=5)
        app = create_app(router, max_batch=4, traffic=tap)
        with caplog.at_level("WARNING", logger="confroute.traffic"), serve_in_thread(app) as srv:
            responses = asyncio.run(_ask_all(srv.base_url, n))
            health = _wait_idle(srv.url)
        assert len(cloud_srv.requests) == n  # the user's cloud calls only: no shadow call
    assert all(r.model_extra["confroute"]["source"] == "cloud" for r in responses)
    counts = health["traffic"]["counts"]
    assert counts["escalated_labelled"] == n and counts["shadow_ok"] == 0
    assert health["traffic"]["drift"]["n_labelled"] == 0  # kept-answer agreement only
    assert health["traffic"]["drift"]["cloud_share"] == 1.0
    with DecisionLog(tmp_path / "d.sqlite", router_fingerprint=router_fingerprint(router),
                     store_prompts=None) as log:
        rows = log.rows()
    assert [r["decision"] for r in rows] == ["cloud"] * n
    assert all(r["label"] in (0.0, 1.0) and r["cloud_answer_hash"] for r in rows)
    warnings = [r.getMessage() for r in caplog.records if "confroute drift" in r.getMessage()]
    assert len(warnings) == 1 and "cloud_share = 1" in warnings[0]
