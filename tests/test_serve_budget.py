"""Budgets enforced by the routing server (issue 12), over real loopback HTTP.

A router calibrated for a 30% cloud share (a BudgetPolicy fitted on held-out
prompts, not enforced) meets shifted traffic: prompts the calibration never saw,
all with p_good below its threshold, so on its own it sends every one of them
to the cloud. Served with ``max_cloud_fraction=0.3``, 32 concurrent clients get
an answer each and the cloud share stays within floor(0.3 * k) at every prefix
k of the ledger's arrival order; /health and /metrics report the same ledger.
"""

from __future__ import annotations

import asyncio
import math
from fractions import Fraction

import httpx
import numpy as np
import pytest

from confroute import Router
from confroute.errors import InvalidParameterError
from confroute.estimators.logprob import SequenceLogProb
from confroute.policies import BudgetPolicy, CostAwarePolicy, ThresholdPolicy

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prom_parser = pytest.importorskip("prometheus_client.parser")

from confroute.serve import (  # noqa: E402
    apply_budget,
    create_app,
    ledger_report,
    parse_period,
    serve_in_thread,
)
from tests.test_serve import EchoCloud, calibrated_router  # noqa: E402

N_CLIENTS = 32
BUDGET = Fraction(3, 10)
WORDS = ["capital", "answer", "yes", "count", "hello", "Hamlet", "colour", "cat"]
CANDIDATES = [f"Q{i}: what about {w} {i % 7}?" for i in range(6) for w in WORDS]  # 48


def _conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def _budget_router(edge) -> tuple[Router, list[str]]:
    """A router calibrated for a 30% cloud share, and N_CLIENTS shifted prompts.

    The 16 candidates the tiny edge is most confident on are the held-out set;
    their labels follow its confidence with some inversions (a real but noisy
    signal, so p_good has several levels), and the BudgetPolicy is fitted for a
    30% cloud share on them. The N_CLIENTS candidates it is least confident on
    are the shifted traffic: never seen by the calibration, less confident than
    every held-out prompt.
    """
    est = SequenceLogProb(max_new_tokens=6)
    got = est.estimate([_conv(q) for q in CANDIDATES], edge)
    order = np.argsort(got.scores, kind="stable")
    held, shifted = order[:16], order[-N_CLIENTS:]
    by_rank = [1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0]  # most confident first
    policy = BudgetPolicy(max_cloud_fraction=0.3, enforce="none")  # fitted, not enforced
    router = Router(est, "isotonic", policy, edge=edge, cloud=EchoCloud(),
                    edge_max_new_tokens=6)
    router.calibrate([_conv(CANDIDATES[i]) for i in held], by_rank,
                     samples=[got.samples[i] for i in held])
    p = router.predict_proba([_conv(CANDIDATES[i]) for i in shifted],
                             samples=[got.samples[i] for i in shifted])
    assert (p < router.policy.threshold_).all(), (router.policy.threshold_, p)
    return router, [CANDIDATES[i] for i in shifted]


@pytest.fixture(scope="module")
def edge(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    return HFLanguageModel(*tiny_llama, use_chat_template=False)


@pytest.fixture(scope="module")
def shifted(edge):
    """The router and N_CLIENTS unseen prompts that all fall below its threshold."""
    router, prompts = _budget_router(edge)
    assert 0.0 < router.policy.threshold_ < 1.0
    return router, prompts


def _post_all(url: str, prompts: list[str]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(
                client.post(url + "/v1/chat/completions",
                            json={"model": "m", "messages": _conv(q)})
                for q in prompts))

    return asyncio.run(run())


def test_unenforced_router_sends_shifted_traffic_to_the_cloud(shifted):
    router, prompts = shifted
    decisions = router.route([_conv(q) for q in prompts])
    # the failure issue 12 reports: far more than the 30% the router was calibrated for
    assert sum(d.source == "cloud" for d in decisions) == len(prompts)


def test_max_cloud_fraction_holds_at_every_prefix_under_concurrency(shifted):
    router, prompts = shifted
    app = create_app(router, max_cloud_fraction=0.3, max_batch=8)
    served = app.state.router
    assert served is not router and router.policy.threshold_ == served.policy.threshold_
    with serve_in_thread(app) as srv:
        responses = _post_all(srv.url, prompts)
        health = httpx.get(srv.url + "/health", timeout=10).json()
        metrics_text = httpx.get(srv.url + "/metrics", timeout=10).text
    # 0 lost: every client got an answer
    assert [r.status_code for r in responses] == [200] * N_CLIENTS
    bodies = [r.json() for r in responses]
    assert all(isinstance(b["choices"][0]["message"]["content"], str) for b in bodies)
    records = sorted((b["confroute"] for b in bodies), key=lambda r: r["ledger_seq"])
    assert [r["ledger_seq"] for r in records] == list(range(N_CLIENTS))
    cloud = 0
    for k, rec in enumerate(records, start=1):
        cloud += rec["source"] == "cloud"
        assert cloud <= math.floor(BUDGET * k), (k, cloud)
    assert cloud == math.floor(BUDGET * N_CLIENTS)  # every request wanted the cloud
    denied = [r for r in records if r["source"] == "edge"]
    assert all(r["reason"].startswith("budget") for r in denied)
    # /health and /metrics agree with the ledger
    snap = ledger_report(served.policy)
    assert snap is not None and snap["requests"] == N_CLIENTS and snap["cloud"] == cloud
    assert health["ledger"] == snap and health["enforced"] is True
    assert health["policy"] == "BudgetPolicy"
    assert snap["cloud_share"] == pytest.approx(cloud / N_CLIENTS)
    assert snap["budget"] == pytest.approx(0.3) and snap["allowance"] == cloud
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in prom_parser.text_string_to_metric_families(metrics_text)
              for s in fam.samples}
    assert values[("confroute_ledger_requests", ())] == N_CLIENTS
    assert values[("confroute_ledger_cloud", ())] == cloud
    assert values[("confroute_ledger_budget", ())] == pytest.approx(0.3)
    assert values[("confroute_ledger_allowance", ())] == snap["allowance"]
    assert values[("confroute_requests_total", (("source", "cloud"),))] == cloud
    assert values[("confroute_requests_total", (("source", "edge"),))] == N_CLIENTS - cloud
    assert values[("confroute_request_latency_seconds_count", (("source", "cloud"),))] == cloud


def test_max_cloud_cost_caps_the_reserved_spend(shifted):
    router, prompts = shifted
    # 1000 prompt tokens at 1000 per million: 1.0 reserved per escalation; a cap of 5
    budgeted = apply_budget(router, max_cloud_cost=5.0, prices={"input": 1000, "output": 0})
    policy = budgeted.policy
    assert isinstance(policy, CostAwarePolicy) and router.policy is not policy
    decisions = budgeted.route([_conv(q) for q in prompts[:12]])
    assert sum(d.source == "cloud" for d in decisions) == 5
    report = ledger_report(policy)
    assert report is not None and report["spent"] == pytest.approx(5.0)
    assert (report["budget_kind"], report["budget"]) == ("spend", 5.0)
    # the rule itself is the router's own: nothing below the threshold is kept unless denied
    assert all(d.reason.startswith("spend budget") for d in decisions if d.source == "edge")


def test_apply_budget_keeps_the_threshold_of_a_threshold_policy(served_threshold_router):
    router = served_threshold_router
    budgeted = apply_budget(router, max_cloud_fraction=0.5)
    assert isinstance(budgeted.policy, BudgetPolicy)
    assert budgeted.policy.threshold_ == router.policy.min_p_good == 1.0
    # every request wants the cloud (p_good 0.5 < 1): exactly floor(0.5 k) escalate
    decisions = budgeted.route([f"q{i} hello" for i in range(7)])
    assert [d.source for d in decisions] == ["edge", "cloud"] * 3 + ["edge"]
    assert isinstance(router.policy, ThresholdPolicy)  # the original is untouched


@pytest.fixture(scope="module")
def served_threshold_router(edge):
    return calibrated_router(edge, EchoCloud(), ThresholdPolicy(min_p_good=1.0))


def test_apply_budget_validates_before_any_work(served_threshold_router):
    router = served_threshold_router
    with pytest.raises(InvalidParameterError, match="exactly one of"):
        apply_budget(router)
    with pytest.raises(InvalidParameterError, match="exactly one of"):
        apply_budget(router, max_cloud_fraction=0.3, max_cloud_cost=1.0)
    with pytest.raises(ValueError, match="'max_cloud_fraction' parameter of apply_budget"):
        apply_budget(router, max_cloud_fraction=1.5)
    with pytest.raises(InvalidParameterError, match="'prices' parameter of apply_budget"):
        apply_budget(router, max_cloud_cost=1.0)  # the echo cloud has no price table
    with pytest.raises(TypeError, match="'prices' parameter of apply_budget"):
        apply_budget(router, max_cloud_cost=1.0, prices=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'period' parameter of parse_period"):
        apply_budget(router, max_cloud_fraction=0.3, period="1w")
    with pytest.raises(TypeError, match="'router' parameter of apply_budget"):
        apply_budget("router.json", max_cloud_fraction=0.3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"calibrate"):
        apply_budget(Router(), max_cloud_fraction=0.3)
    with pytest.raises(InvalidParameterError, match="need max_cloud_fraction"):
        create_app(router, period=60)
    with pytest.raises(InvalidParameterError, match="'adapt_window' parameter of create_app"):
        create_app(router, adapt_window=100)
    with pytest.raises(ValueError, match="'adapt_window' parameter of apply_budget"):
        apply_budget(router, max_cloud_fraction=0.3, adapt_window=-1)
    assert apply_budget(router, max_cloud_fraction=0.3, adapt_window=64).policy.adapt_window == 64


@pytest.mark.parametrize(("text", "seconds"), [
    ("3600", 3600.0), ("30m", 1800.0), ("1h", 3600.0), ("1d", 86400.0), ("45s", 45.0),
    ("1.5h", 5400.0), (90, 90.0), (0.5, 0.5),
])
def test_parse_period(text, seconds):
    assert parse_period(text) == seconds


@pytest.mark.parametrize("bad", ["1w", "", "h", "-5", "0", 0, -1.0, float("inf"), True, None])
def test_parse_period_rejects(bad):
    with pytest.raises(InvalidParameterError, match="'period' parameter of parse_period"):
        parse_period(bad)


def test_cli_serve_budget_flags(tmp_path, edge, served_threshold_router):
    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args
    from tests.tiny_models import save_causal_lm

    model_dir = save_causal_lm(tmp_path / "edge")
    served_threshold_router.save(tmp_path / "router.json")
    base = ["serve", "--router", str(tmp_path / "router.json"), "--edge", str(model_dir)]
    args = build_parser().parse_args([*base, "--max-cloud-fraction", "0.3"])
    app = app_from_args(args)
    policy = app.state.router.policy
    assert isinstance(policy, BudgetPolicy) and policy.threshold_ == 1.0
    assert policy.adapt_window == 0
    args = build_parser().parse_args([*base, "--max-cloud-fraction", "0.3",
                                      "--adapt-window", "500"])
    assert app_from_args(args).state.router.policy.adapt_window == 500
    args = build_parser().parse_args([*base, "--max-cloud-cost", "2.5", "--price-input", "3",
                                      "--price-output", "15", "--period", "1h"])
    assert (args.max_cloud_cost, args.period, args.price_input, args.price_output) == (
        2.5, "1h", 3.0, 15.0)
    policy = app_from_args(args).state.router.policy
    assert isinstance(policy, CostAwarePolicy)
    assert (policy.spend_budget, policy.period) == (2.5, 3600.0)
    # 1000 prompt tokens at 3/M plus the cloud's 16 new tokens at 15/M per escalation
    assert policy.cloud_cost == pytest.approx((1000 * 3 + 16 * 15) / 1e6)


def test_period_budgets(served_threshold_router):
    router = served_threshold_router
    share = apply_budget(router, max_cloud_fraction=0.5, period="1h").policy
    assert isinstance(share, BudgetPolicy) and share.enforced
    assert (share.enforce, share.period, share.threshold_) == ("period", 3600.0, 1.0)
    spend = apply_budget(router, max_cloud_cost=2.0, period=60,
                         prices={"input": 1000, "output": 0}).policy
    assert isinstance(spend, CostAwarePolicy) and spend.enforced
    assert (spend.spend_budget, spend.period, spend.cloud_cost) == (2.0, 60.0, 1.0)
    # within one period: two escalations fit the cap of 2.0, the others stay on the edge
    budgeted = apply_budget(router, max_cloud_cost=2.0, period=3600,
                            prices={"input": 1000, "output": 0})
    decisions = budgeted.route([f"p{i} hi" for i in range(4)])
    assert [d.source for d in decisions] == ["cloud", "cloud", "edge", "edge"]
