"""The shared budget ledger against a real redis-server started by the tests on loopback."""

from __future__ import annotations

import copy
import multiprocessing as mp
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confroute.errors import InvalidParameterError, LedgerUnavailableError
from confroute.ledgers import LedgerSpec, MemoryLedger, RedisLedger, make_ticket, redact_url
from confroute.policies import BudgetPolicy, CostAwarePolicy, ThresholdPolicy
from tests.redis_server import REDIS_SERVER, RedisServer

pytest.importorskip("redis", reason="the redis client is needed (pip install 'confroute[redis]')")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server binary not found (apt-get install redis-server)")

CAL = np.linspace(0.0, 1.0, 101)  # fit data: p_good 0.0 always wants the cloud, 1.0 never


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture()
def own_server() -> Iterator[RedisServer]:
    """A server this test may kill and restart."""
    with RedisServer() as server:
        yield server


_KEYS = iter(range(10**9))


def new_key() -> str:
    return f"test:{time.monotonic_ns()}:{next(_KEYS)}"


def budget(url: str, key: str, b: float, **kw: Any) -> BudgetPolicy:
    return BudgetPolicy(max_cloud_fraction=b, ledger=url, ledger_key=key, **kw).fit(CAL)


# ------------------------------------------------------------- two processes, one budget
def _worker(conn: Any) -> None:
    """Admit jobs sent by the test, concurrently with the other worker."""
    while True:
        job = conn.recv()
        if job is None:
            return
        url, key, b, window, wants, refunds, barrier_key = job
        mode = {"enforce": "window", "window": window} if window else {}
        pol = budget(url, key, b, **mode)
        import redis  # wait for the other worker: both start admitting together

        client = redis.Redis.from_url(url)
        client.incr(barrier_key)
        while int(client.get(barrier_key) or 0) < 2:
            time.sleep(0.001)
        out = []
        for want, refund in zip(wants, refunds):
            t = pol.admit(0.0 if want else 1.0)
            settled = bool(refund and t.escalate and pol.settle(t, spent=False))
            out.append((t.seq, want, t.escalate, settled))
        conn.send(out)


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Any]]:
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for _ in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    yield conns
    for conn, proc in zip(conns, procs):
        conn.send(None)
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


arrivals = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(5, 95).map(lambda x: x / 100), a=arrivals, c=arrivals,
       refunds_on=st.booleans(), window=st.sampled_from([0, 0, 5, 16]))
def test_two_processes_never_exceed_the_budget_at_any_prefix(
    redis_url: str, workers: list[Any], b: float, a: list[tuple[bool, bool]],
    c: list[tuple[bool, bool]], refunds_on: bool, window: int,
) -> None:
    """Total (window=0) and sliding-window budgets across two OS processes."""
    key = new_key()
    for conn, lst in zip(workers, (a, c)):
        wants = [w for w, _ in lst]
        refunds = [r and refunds_on for _, r in lst]
        conn.send((redis_url, key, b, window, wants, refunds, key + ":barrier"))
    got = sorted(workers[0].recv() + workers[1].recv())
    n = len(a) + len(c)
    assert [seq for seq, *_ in got] == list(range(n))  # one global order, nothing lost
    budget_frac = Fraction(repr(b))
    kept = np.array([esc and not refunded for _, _, esc, refunded in got], dtype=int)
    for k in range(n):  # every prefix (and, for a window, the last `window` of it)
        lo = max(0, k + 1 - window) if window else 0
        allowed = (budget_frac.numerator * (k + 1 - lo)) // budget_frac.denominator
        assert kept[lo:k + 1].sum() <= allowed
    if not refunds_on:  # exact: the same decisions as one in-process ledger on that order
        mem = MemoryLedger(LedgerSpec(share=budget_frac, window=window or None))
        assert [mem.admit(w, Fraction(0)).escalate for _, w, _, _ in got] == [
            esc for _, _, esc, _ in got]
    mode = {"enforce": "window", "window": window} if window else {}
    snap = budget(redis_url, key, b, **mode).snapshot()
    assert snap.requests == n and snap.cloud == int(kept.sum()) and snap.backend == "redis"
    if window:
        assert snap.window_cloud == int(kept[max(0, n - window):].sum())


# ------------------------------------------------------------------ refunds, modes
def test_refund_is_seen_by_every_process_sharing_the_key(redis_url: str) -> None:
    key = new_key()
    p1, p2 = budget(redis_url, key, 0.5), budget(redis_url, key, 0.5)
    t = p1.admit(0.0)
    assert not t.escalate and p2.admit(0.0).escalate  # floor(0.5) = 0, then floor(1) = 1
    t3 = p1.admit(0.0)
    assert not t3.escalate and p2.snapshot()[:3] == (3, 1, 0)
    t4 = p1.admit(0.0)  # N=4: 2 allowed
    assert t4.escalate and p2.snapshot().cloud == 2
    assert p1.settle(t4, spent=False) is True  # the cloud call failed: given back
    assert p2.snapshot().cloud == 1
    assert p1.settle(t4, spent=False) is False  # once only
    assert p2.admit(0.0).escalate  # N=5: 1 + 1 <= 2 only thanks to the refund
    p2.reset()  # shared: empties the counts for both
    assert p1.snapshot()[:4] == (0, 0, 0, 0.0)
    assert p1.settle(p2.admit(0.0), spent=False) is False  # nothing to refund: kept on edge


def test_window_budget_is_shared_and_matches_the_in_process_window(redis_url: str) -> None:
    key, rng = new_key(), np.random.default_rng(0)
    pols = [budget(redis_url, key, 0.3, enforce="window", window=7) for _ in range(2)]
    mem = MemoryLedger(LedgerSpec(share=Fraction(3, 10), window=7))
    for i in range(80):
        want = bool(rng.random() < 0.7)
        t = pols[i % 2].admit(0.0 if want else 1.0)
        adm = mem.admit(want, Fraction(0))
        mem_ticket = make_ticket(adm, p_good=0.0, wanted=want, cost=0.0, reason="")
        assert t.escalate == adm.escalate and t.seq == adm.seq
        if t.escalate and rng.random() < 0.2:  # some refunds, by the other process
            assert pols[(i + 1) % 2].settle(t, spent=False)
            assert mem.settle(mem_ticket, False, None)
        snap = pols[0].snapshot()
        assert snap.window_cloud == mem.window_cloud <= (3 * min(i + 1, 7)) // 10


def test_period_budget_restarts_on_the_server_clock(redis_url: str) -> None:
    key = new_key()
    p1, p2 = (budget(redis_url, key, 0.5, enforce="period", period=2.0) for _ in range(2))
    start = time.monotonic()  # the period started when p1 created the shared ledger
    seen = [p1.admit(0.0).escalate, p2.admit(0.0).escalate]  # N=1: 0, N=2: 1
    assert p1.snapshot().requests == 2
    time.sleep(max(0.0, 2.05 - (time.monotonic() - start)))
    t = p1.admit(0.0)
    stale = p2.admit(0.0)
    if time.monotonic() - start > 3.5:
        pytest.skip("machine too slow to stay inside one 2 s period")
    assert seen == [False, True]
    assert (t.seq, t.escalate, stale.seq, stale.escalate) == (0, False, 1, True)  # restarted
    assert p2.snapshot()[:2] == (2, 1)
    time.sleep(max(0.0, 4.05 - (time.monotonic() - start)))
    assert p2.snapshot().requests == 0
    assert p2.settle(stale, spent=False) is False  # from an earlier period: not settleable


def test_cost_aware_spend_cap_is_shared_in_micro_units(redis_url: str) -> None:
    key = new_key()
    pols = [CostAwarePolicy(cloud_cost=0.3, spend_budget=1.0, ledger=redis_url, ledger_key=key)
            for _ in range(2)]
    got = [pols[i % 2].admit(0.0) for i in range(5)]
    assert [t.escalate for t in got] == [True, True, True, False, False]  # 0.9 + 0.3 > 1
    assert pols[0].snapshot().spent == pytest.approx(0.9)
    assert pols[1].settle(got[0], True, cost=0.1000005) is True  # rounded up to micro-units
    assert pols[0].snapshot().spent == pytest.approx(0.700001)
    assert not pols[0].admit(0.0).escalate  # 0.700001 + 0.3 > 1, by one micro-unit
    assert pols[1].settle(got[1], True, cost=0.2999995) is False  # ceil: 0.3, no change
    assert pols[0].snapshot().spent == pytest.approx(0.700001)
    assert pols[0].settle(got[2], True, cost=0.299999) is True
    assert pols[0].snapshot().spent == pytest.approx(0.7)
    assert pols[1].admit(0.0).escalate  # 0.7 + 0.3 <= 1: exactly the cap
    assert not pols[0].admit(0.0).escalate


# ------------------------------------------------------------------- failure modes
def test_fail_closed_keeps_answers_on_the_edge_then_recovers(own_server: RedisServer) -> None:
    pol = budget(own_server.url, "k", 0.5)
    assert [pol.admit(0.0).escalate for _ in range(4)] == [False, True, False, True]
    own_server.kill()
    t = pol.admit(0.0)
    assert not t.escalate and t.denied_by_budget and "unreachable" in t.reason
    assert [pol.admit(0.0).escalate for _ in range(20)] == [False] * 20
    snap = pol.snapshot()
    assert snap.store_up is False and snap.emergency_used == 0 and snap.requests == 4
    own_server.start()  # comes back empty (no persistence)
    time.sleep(1.1)  # the ledger retries at most every retry_interval (1 s)
    assert [pol.admit(0.0).escalate for _ in range(4)] == [False, True, False, True]
    snap = pol.snapshot()
    assert snap.store_up is True and snap[:2] == (4, 2)


def test_fail_open_escalates_up_to_the_emergency_allowance(own_server: RedisServer) -> None:
    pol = budget(own_server.url, "k", 0.5, ledger_failure_mode="fail_open",
                 ledger_emergency_allowance=3)
    pol.admit(0.0)
    own_server.kill()
    got = [pol.admit(0.0) for _ in range(6)]
    assert [t.escalate for t in got] == [True, True, True, False, False, False]
    assert "emergency" in got[0].reason and pol.snapshot().emergency_used == 3
    assert pol.settle(got[0], spent=False) is True  # a failed emergency call gives it back
    assert pol.admit(0.0).escalate and not pol.admit(0.0).escalate
    assert not pol.admit(1.0).escalate  # the rule still decides first
    snap = pol.snapshot()
    assert (snap.store_up, snap.emergency_used) == (False, 3)
    own_server.start()
    time.sleep(1.1)
    assert pol.snapshot().store_up is True


# --------------------------------------------------------------------------- bad input
def test_routers_with_different_budgets_on_one_key_get_a_typed_error(redis_url: str) -> None:
    key = new_key()
    budget(redis_url, key, 0.3)
    with pytest.raises(InvalidParameterError, match=r"'ledger'.*another budget"):
        budget(redis_url, key, 0.4)
    with pytest.raises(InvalidParameterError, match="'ledger'"):
        budget(redis_url, key, 0.3, enforce="window", window=10)
    with pytest.raises(InvalidParameterError, match="'ledger'"):
        CostAwarePolicy(spend_budget=3.0, ledger=redis_url, ledger_key=key).admit(0.0)
    budget(redis_url, key, 0.3).admit(0.0)  # the same budget joins


def test_unreachable_url_at_start_up_is_a_typed_error_without_credentials() -> None:
    from tests.redis_server import free_port

    url = f"redis://alice:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(LedgerUnavailableError, match=r"'ledger'.*redis://\*\*\*@127\.0\.0\.1") as e:
        budget(url, new_key(), 0.3)
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value)
    assert isinstance(e.value, ConnectionError)
    assert redact_url("redis://:pw@h:1/0") == "redis://***@h:1/0"


@pytest.mark.parametrize("bad", ["http://127.0.0.1:6379", "127.0.0.1:6379", 6379])
def test_a_ledger_that_is_not_a_redis_url_is_rejected_before_connecting(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="'ledger' parameter of BudgetPolicy"):
        BudgetPolicy(max_cloud_fraction=0.3, ledger=bad).fit(CAL)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="'ledger_failure_mode'"):
        BudgetPolicy(max_cloud_fraction=0.3, ledger_failure_mode="open").fit(CAL)
    with pytest.raises(InvalidParameterError, match="'failure_mode'"):
        RedisLedger("redis://127.0.0.1:1/0", spec=LedgerSpec(), failure_mode="x")


def test_a_copied_policy_shares_the_same_ledger(redis_url: str) -> None:
    from sklearn.base import clone

    key = new_key()
    pol = budget(redis_url, key, 0.5)
    pol.admit(0.0)
    twin = copy.deepcopy(pol)
    assert twin.admit(0.0).escalate and pol.snapshot().cloud == 1
    fresh = clone(pol).fit(CAL)
    assert fresh.get_params()["ledger"] == redis_url and fresh.snapshot().requests == 2


# ------------------------------------------------------------ confroute serve replicas
def test_two_served_replicas_share_the_ledger_and_report_its_state(tiny_llama, own_server):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import httpx

    from confroute.cli.serve import apply_ledger
    from confroute.models.hf import HFLanguageModel
    from confroute.serve import create_app, serve_in_thread
    from tests.test_serve import EchoCloud, calibrated_router

    edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
    routers = []
    for _ in range(2):
        router = calibrated_router(edge, EchoCloud(), BudgetPolicy(max_cloud_fraction=0.25))
        router.policy.threshold_ = 1.0  # every request asks for the cloud: the budget decides
        apply_ledger(router.policy, own_server.url, key="serve")
        routers.append(router)
    with pytest.raises(InvalidParameterError, match="'--ledger'"):
        apply_ledger(ThresholdPolicy(), own_server.url)
    body = {"model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with serve_in_thread(create_app(routers[0])) as a, serve_in_thread(create_app(routers[1])) as b:
        def ask(srv: Any) -> bool:
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200
            return bool(r.json()["confroute"]["routed_to"] == "cloud")

        got = [ask((a, b)[i % 2]) for i in range(8)]
        assert sum(got) == 2  # floor(0.25 * 8) across both replicas
        health = httpx.get(b.url + "/health", timeout=10).json()["ledger"]
        assert health["requests"] == 8 and health["cloud"] == 2
        assert health["backend"] == "redis" and health["store_up"] is True
        assert "confroute_ledger_store_up 1.0" in httpx.get(a.url + "/metrics").text
        own_server.kill()
        assert not any(ask(a) for _ in range(4))  # fail_closed: answered on the edge
        assert httpx.get(a.url + "/health", timeout=10).json()["ledger"]["store_up"] is False
        assert "confroute_ledger_store_up 0.0" in httpx.get(a.url + "/metrics").text
        own_server.start()
        time.sleep(1.1)
        assert httpx.get(a.url + "/health", timeout=10).json()["ledger"]["store_up"] is True


def test_cli_serve_ledger_flags(tmp_path: Any, tiny_llama: Any, redis_url: str) -> None:
    pytest.importorskip("fastapi")
    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args
    from confroute.models.hf import HFLanguageModel
    from tests.test_serve import EchoCloud, calibrated_router
    from tests.tiny_models import save_causal_lm

    edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
    calibrated_router(edge, EchoCloud(), ThresholdPolicy(min_p_good=1.0)).save(
        tmp_path / "router.json")
    key = new_key()
    base = ["serve", "--router", str(tmp_path / "router.json"), "--edge",
            str(save_causal_lm(tmp_path / "edge")), "--ledger", redis_url, "--ledger-key", key]
    args = build_parser().parse_args([*base, "--max-cloud-fraction", "0.3",
                                      "--ledger-failure-mode", "fail_open",
                                      "--ledger-emergency-allowance", "5"])
    policy = app_from_args(args).state.router.policy
    assert isinstance(policy, BudgetPolicy) and policy.ledger == redis_url
    assert (policy.ledger_key, policy.ledger_failure_mode, policy.ledger_emergency_allowance) == (
        key, "fail_open", 5)
    assert policy.snapshot().backend == "redis"
    with pytest.raises(InvalidParameterError, match=r"'ledger'.*another budget"):
        app_from_args(build_parser().parse_args([*base, "--max-cloud-fraction", "0.4"]))
    with pytest.raises(InvalidParameterError, match="'--ledger'"):
        app_from_args(build_parser().parse_args(base))  # a ThresholdPolicy keeps no ledger
    from tests.redis_server import free_port

    base[base.index(redis_url)] = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(LedgerUnavailableError, match="unreachable"):
        app_from_args(build_parser().parse_args([*base, "--max-cloud-fraction", "0.3"]))


def test_the_password_can_stay_out_of_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from confroute.ledgers import PASSWORD_ENV

    with RedisServer(args=["--requirepass", "pw-42"]) as server:
        monkeypatch.delenv(PASSWORD_ENV, raising=False)
        with pytest.raises(LedgerUnavailableError, match="'ledger'") as e:
            budget(server.url, "k", 0.3)
        assert "pw-42" not in str(e.value)
        monkeypatch.setenv(PASSWORD_ENV, "pw-42")
        pol = budget(server.url, "k", 0.3)  # the URL (saved with the router) has no secret
        assert pol.snapshot().store_up and "pw-42" not in repr(pol.get_params())
        authed = f"redis://:pw-42@127.0.0.1:{server.port}/0"
        assert budget(authed, "k", 0.3).snapshot().backend == "redis"
