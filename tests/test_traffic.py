"""Decision log, shadow sampler, drift monitor, recalibration: real SQLite, a real
writer process killed mid-loop, real threads, a real Router fed with samples."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.labeling import CloudAgreementLabeler, SEPreferenceLabeler
from confroute.router import Router
from confroute.traffic import (
    DecisionLog,
    DriftMonitor,
    ShadowSampler,
    expected_calibration_error,
    population_stability_index,
    recalibrate,
    router_fingerprint,
    shadow_label,
)
from confroute.types import Decision, Sample, Samples

ROOT = Path(__file__).resolve().parents[1]


def decision(i: int, source: str = "edge", p: float = 0.5, score: float = 1.0) -> Decision:
    return Decision(prompt=f"question {i}?", source=source, p_good=p,  # type: ignore[arg-type]
                    scores={"sequence_logprob": score}, edge_answer=f"answer {i}")


# --------------------------------------------------------------------------- log

WRITER = """
import itertools, sys
from confroute.traffic import DecisionLog
from confroute.types import Decision
log = DecisionLog(sys.argv[1], router_fingerprint="fp-1")
for i in itertools.count():
    d = Decision(prompt=f"q{i}", source="cloud" if i % 3 == 0 else "edge", p_good=i / (i + 1),
                 scores={"s": float(i)}, edge_answer="a" * 2000)
    log.append(d, cloud_answer="c" * 2000, cost=0.5)
"""


def test_log_survives_a_writer_killed_mid_loop(tmp_path) -> None:
    path = tmp_path / "log.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if path.exists():
                with DecisionLog(path, router_fingerprint="fp-1") as reader:
                    if len(reader) >= 40:
                        break
            time.sleep(0.05)
        else:
            pytest.fail("the writer process did not write 40 rows in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with DecisionLog(path, router_fingerprint="fp-1") as log:
        rows = log.rows()
        assert len(rows) >= 40
        assert [r["request_id"] for r in rows] == list(range(1, len(rows) + 1))
        for r in rows:  # every committed row is whole
            i = r["request_id"] - 1
            assert r["scores"] == {"s": float(i)}
            assert r["decision"] == ("cloud" if i % 3 == 0 else "edge")
            assert r["p_good"] == pytest.approx(i / (i + 1))
            assert r["cost"] == 0.5 and r["label"] is None
            assert len(r["edge_answer_hash"]) == 64 and len(r["cloud_answer_hash"]) == 64
        assert log.append(decision(0)) == len(rows) + 1  # still appendable


def test_log_rows_labels_and_filters(tmp_path) -> None:
    log = DecisionLog(tmp_path / "l.sqlite", router_fingerprint="fp", store_prompts="text")
    ids = [log.append(decision(i, "cloud" if i == 1 else "edge", p=float("nan") if i == 2
                               else 0.5), timestamp=100.0 + i) for i in range(4)]
    log.set_label(ids[0], 1, cloud_answer="answer 0")
    log.set_label(ids[3], 0.0)
    assert [r["request_id"] for r in log.labelled()] == [ids[0], ids[3]]
    assert [r["label"] for r in log.labelled()] == [1.0, 0.0]
    assert len(log.rows(labelled=False)) == 2
    assert [r["request_id"] for r in log.rows(decision="cloud")] == [ids[1]]
    assert [r["request_id"] for r in log.rows(since=102.0)] == ids[2:]
    assert [r["request_id"] for r in log.rows(last=2)] == ids[2:]
    assert math.isnan(log.rows()[2]["p_good"])
    assert log.rows()[0]["prompt"] == '"question 0?"'
    assert log.rows()[0]["cloud_answer_hash"] is not None
    with pytest.raises(InvalidParameterError, match="'request_id'"):
        log.set_label(999, 1)
    with pytest.raises(InvalidParameterError, match="'label'"):
        log.set_label(ids[1], 0.5)
    with pytest.raises(InvalidParameterError, match="'label'"):
        log.append(decision(9), label=2)
    with pytest.raises(InvalidTypeError, match="'decision'"):
        log.append("not a decision")  # type: ignore[arg-type]
    assert len(log) == 4 and log.rows()[1]["label"] is None
    log.close()


def test_log_of_another_router_is_refused_and_untouched(tmp_path) -> None:
    path = tmp_path / "l.sqlite"
    with DecisionLog(path, router_fingerprint="router-v1") as log:
        log.append(decision(0))
    with pytest.raises(InvalidParameterError, match=r"'router_fingerprint'.*router-v1"):
        DecisionLog(path, router_fingerprint="router-v2")
    with pytest.raises(InvalidParameterError, match="'store_prompts'"):
        DecisionLog(path, router_fingerprint="router-v1", store_prompts="text")
    with DecisionLog(path, router_fingerprint="router-v1") as log:  # still v1's, one row
        assert len(log) == 1
    with DecisionLog(path, router_fingerprint="router-v2", allow_foreign=True) as log:
        assert [r["router_fingerprint"] for r in log.rows()] == ["router-v1"]
        log.append(decision(1))
        assert [r["router_fingerprint"] for r in log.rows()] == ["router-v1", "router-v2"]
    with pytest.raises(InvalidParameterError, match="'store_prompts'"):
        DecisionLog(tmp_path / "x.sqlite", router_fingerprint="a", store_prompts="plain")


# --------------------------------------------------------------------------- shadow sampler


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"max_calls": 37}, 37),
    ({"max_cost": 5.0}, 16),  # 16 * 0.3 = 4.8 <= 5 < 17 * 0.3
])
def test_shadow_cap_is_exact_under_16_threads(kwargs, expected) -> None:
    sampler = ShadowSampler(1.0, seed=0, **kwargs)
    start = threading.Barrier(16)
    granted: list[int] = []

    def worker() -> None:
        start.wait()
        n = sum(sampler.admit(decision(0), cost=0.3) for _ in range(200))
        granted.append(n)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == expected == sampler.n_calls_
    assert sampler.n_seen_ == 16 * 200
    assert sampler.spent_ <= 5.0 + 1e-9 or "max_calls" in kwargs


def test_shadow_rate_and_escalated_requests() -> None:
    sampler = ShadowSampler(0.25, seed=3)
    got = sum(sampler.admit(decision(i)) for i in range(4000))
    assert 900 <= got <= 1100
    assert not ShadowSampler(1.0).admit(decision(0, "cloud"))
    assert not any(ShadowSampler(0.0).admit() for _ in range(100))
    s = ShadowSampler(1.0, max_calls=1)
    assert s.admit() and not s.admit()
    s.release()
    assert s.admit()


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_shadow_rate_outside_unit_interval(rate: float) -> None:
    with pytest.raises(InvalidParameterError, match=r"'rate' parameter of ShadowSampler.*\[0, 1\]"):
        ShadowSampler(rate)
    with pytest.raises(InvalidTypeError, match="'rate'"):
        ShadowSampler("high")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- drift


def test_ece_by_hand() -> None:
    p = [0.1, 0.1, 0.9, 0.9, 0.6, np.nan]
    y = [0, 1, 1, 1, 0, 1]
    # bins: 0.1 -> 2 rows, |0.5 - 0.1| * 2/5 = 0.16; 0.9 -> |1 - 0.9| * 2/5 = 0.04;
    # 0.6 -> |0 - 0.6| * 1/5 = 0.12; total 0.32 (the NaN row is left out).
    assert expected_calibration_error(p, y) == pytest.approx(0.32)
    assert expected_calibration_error([1.0], [1]) == 0.0  # p = 1 falls in the last bin


def test_psi_by_hand() -> None:
    expected = np.arange(10.0)  # median 4.5 splits it 5 / 5 with 2 bins
    actual = [1.0, 1.0, 1.0, 6.0]  # 3 / 1
    want = (0.75 - 0.5) * math.log(0.75 / 0.5) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert population_stability_index(expected, actual, n_bins=2) == pytest.approx(want)
    assert population_stability_index(expected, expected) == pytest.approx(0.0)


def test_drift_monitor_snapshot_alarm_once_and_prometheus(caplog) -> None:
    from prometheus_client import CollectorRegistry

    rng = np.random.default_rng(0)
    mon = DriftMonitor(rng.normal(size=2000), window=100, min_samples=50, n_bins=5,
                       bounds={"psi": (None, 0.25), "cloud_share": (None, 0.5)})
    reg = CollectorRegistry()
    mon.register_metrics(reg)
    caplog.set_level(logging.WARNING, logger="confroute.traffic")
    for i in range(100):  # same distribution, 20% cloud
        mon.observe(decision(i, "cloud" if i % 5 == 0 else "edge", score=float(rng.normal())))
    snap = mon.snapshot()
    assert snap["cloud_share"] == pytest.approx(0.2) and snap["psi"] < 0.25
    assert math.isnan(snap["ece"]) and not caplog.records
    for i in range(100):  # scores shift by 3 sd: PSI alarm, logged once
        mon.observe(decision(i, score=float(rng.normal() + 3.0)))
    assert mon.snapshot()["psi"] > 1.0
    alarms = [r for r in caplog.records if "psi" in r.getMessage()]
    assert len(alarms) == 1
    for p, y in [(0.9, 1.0)] * 30 + [(0.9, 0.0)] * 30:
        mon.observe_label(p, y)
    snap = mon.snapshot()
    assert snap["agreement"] == pytest.approx(0.5) and snap["ece"] == pytest.approx(0.4)
    assert reg.get_sample_value("confroute_drift_agreement") == pytest.approx(0.5)
    assert reg.get_sample_value("confroute_drift_psi") == pytest.approx(snap["psi"])
    with pytest.raises(InvalidParameterError, match="'bounds'"):
        DriftMonitor([0.0, 1.0], bounds={"latency": (0, 1)})


# --------------------------------------------------------------------------- recalibrate


def _samples(prompts: list[str], scores: np.ndarray) -> list[Samples]:
    return [Samples(prompt=p, greedy=Sample(text="an answer", token_logprobs=np.array([-s])))
            for p, s in zip(prompts, scores)]


def _world(n: int, shift: float, seed: int, tag: str):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 4, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(2.0 + shift - 2.0 * s)))).astype(int)
    prompts = [f"{tag} {i}?" for i in range(n)]
    return prompts, s, y


@pytest.fixture
def calibrated() -> tuple[Router, np.ndarray, np.ndarray]:
    prompts, s, y = _world(400, 0.0, 0, "cal")
    router = Router("sequence_logprob", "isotonic", "threshold")
    router.calibrate(prompts, y, samples=_samples(prompts, s))
    return router, s, y


def test_recalibrate_improves_ece_after_a_shift(tmp_path, calibrated) -> None:
    router, cal_s, cal_y = calibrated
    fp = router_fingerprint(router)
    log = DecisionLog(tmp_path / "log.sqlite", router_fingerprint=fp)
    prompts, s, y = _world(800, 3.0, 1, "traffic")  # edge answers got much better
    for d, label in zip(router.route(prompts, samples=_samples(prompts, s)), y):
        log.append(d, label=int(label))
    new = recalibrate(router, log, min_labels=100)
    test_p, test_s, test_y = _world(2000, 3.0, 2, "test")
    old_ece = expected_calibration_error(router.predict_proba(test_p,
                                         samples=_samples(test_p, test_s)), test_y)
    new_ece = expected_calibration_error(new.predict_proba(test_p,
                                         samples=_samples(test_p, test_s)), test_y)
    assert old_ece > 0.15 and new_ece < 0.06
    assert router_fingerprint(router) == fp != router_fingerprint(new)  # original untouched
    assert new.calibration_["source"] == "traffic" and new.calibration_["n"] == 800
    merged = recalibrate(router, log, min_labels=100, weight_recent=200,
                         merge_calibration=(cal_s, cal_y), labeler=CloudAgreementLabeler())
    assert merged.calibration_["n"] == 1200 and merged.calibration_["labeler"]["labeler"] \
        == "cloud_agreement"
    merged_ece = expected_calibration_error(merged.predict_proba(
        test_p, samples=_samples(test_p, test_s)), test_y)
    assert merged_ece < old_ece


def test_recalibrate_refuses_too_few_labels(tmp_path, calibrated) -> None:
    router, _, _ = calibrated
    log = DecisionLog(tmp_path / "log.sqlite", router_fingerprint=router_fingerprint(router))
    for i in range(10):
        log.append(decision(i, score=float(i)), label=i % 2)
    fp = router_fingerprint(router)
    with pytest.raises(InvalidParameterError, match=r"'log' parameter of recalibrate.*at least 50"):
        recalibrate(router, log)
    with pytest.raises(InvalidParameterError, match="'merge_calibration'"):
        recalibrate(router, log, min_labels=5, merge_calibration=([1.0, 2.0], [1]))
    with pytest.raises(InvalidTypeError, match="'log'"):
        recalibrate(router, "log.sqlite")  # type: ignore[arg-type]
    assert router_fingerprint(router) == fp


# --------------------------------------------------------------------------- shadow_label


def test_shadow_label_writes_the_label_and_feeds_the_monitor(tmp_path) -> None:
    log = DecisionLog(tmp_path / "l.sqlite", router_fingerprint="fp")
    mon = DriftMonitor([0.0, 1.0, 2.0], min_samples=1)
    d_good = Decision(prompt="Capital of France?", source="edge", p_good=0.8,
                      scores={"s": 1.0}, edge_answer="Paris")
    d_bad = Decision(prompt="Capital of Italy?", source="edge", p_good=0.7,
                     scores={"s": 1.0}, edge_answer="Milan")
    r1, r2 = log.append(d_good), log.append(d_bad)
    lab = CloudAgreementLabeler()
    assert shadow_label(log, r1, d_good, "The answer is Paris.", lab, monitor=mon) == 1.0
    assert shadow_label(log, r2, d_bad, "Rome.", lab, monitor=mon) == 0.0
    assert [r["label"] for r in log.rows()] == [1.0, 0.0]
    assert all(r["cloud_answer_hash"] for r in log.rows())
    assert mon.snapshot()["agreement"] == 0.5 and lab.describe()["counts"]["good"] == 1
    with pytest.raises(InvalidTypeError, match="'labeler'"):
        shadow_label(log, r1, d_good, "Paris", SEPreferenceLabeler())
    no_answer = Decision(prompt="q?", source="cloud", p_good=0.1, scores={}, edge_answer=None)
    with pytest.raises(InvalidParameterError, match="'decision'"):
        shadow_label(log, r1, no_answer, "x", lab)
    assert [r["label"] for r in log.rows()] == [1.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_shadow_budget_is_never_exceeded_property(seed: int) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(rate=st.floats(0, 1), max_calls=st.none() | st.integers(0, 20),
           max_cost=st.none() | st.floats(0, 5),
           costs=st.lists(st.floats(0, 1), max_size=60))
    def check(rate, max_calls, max_cost, costs) -> None:
        s = ShadowSampler(rate, max_calls=max_calls, max_cost=max_cost, seed=seed)
        granted = [c for c in costs if s.admit(cost=c)]
        assert max_calls is None or len(granted) <= max_calls
        assert max_cost is None or sum(granted) <= max_cost + 1e-9
        assert s.n_calls_ == len(granted) and s.n_seen_ == len(costs)

    check()
