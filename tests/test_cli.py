"""The confroute command line, run in-process on tiny saved models."""

from __future__ import annotations

import json

import pytest

from confroute.cli import main
from tests.tiny_models import save_causal_lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_causal_lm(tmp_path_factory.mktemp("edge") / "tiny", "llama", seed=0)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("route", "calibrate"):
        assert cmd in out


def test_calibrate_then_route_round_trips_through_a_saved_router(tmp_path, model_dir, capsys):
    data = _write_jsonl(tmp_path / "labelled.jsonl", [
        {"prompt": f"What is {i} plus {i}?", "label": i % 2} for i in range(16)
    ])
    router_path = tmp_path / "router.json"
    assert main(["calibrate", "--data", str(data), "--out", str(router_path),
                 "--edge", str(model_dir), "--max-cloud-fraction", "0.5"]) == 0
    saved = json.loads(router_path.read_text())
    assert saved["kind"] == "router"
    assert saved["payload"]["policy"]["name"] == "budget"

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": f"q{i}", "prompt": f"Who wrote book number {i}?"} for i in range(5)
    ])
    out = tmp_path / "decisions.jsonl"
    assert main(["route", "--router", str(router_path), "--edge", str(model_dir),
                 "--input", str(prompts), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(5)]
    for r in rows:
        assert r["source"] in ("edge", "cloud")
        assert 0.0 <= r["p_good"] <= 1.0
        assert isinstance(r["edge_answer"], str)
        assert (r["answer"] is None) == (r["source"] == "cloud")
    assert "wrote 5 decisions" in capsys.readouterr().out


def test_route_prints_decision_p_good_and_answer(tmp_path, model_dir, capsys):
    data = _write_jsonl(tmp_path / "labelled.jsonl", [
        {"prompt": f"Name a colour, number {i}.", "answers": ["red"]} for i in range(4)
    ] + [{"prompt": f"Say hello {i}", "label": 1} for i in range(0)])
    # graded references: the tiny random model never says "red", so every label is 0
    code = main(["calibrate", "--data", str(data), "--out", str(tmp_path / "r.json"),
                 "--edge", str(model_dir)])
    assert code == 2  # single-class labels: a clear error, not a crash
    err = capsys.readouterr().err
    assert "both classes" in err

    rows = [{"prompt": f"Question {i}?", "label": i % 2} for i in range(12)]
    _write_jsonl(data, rows)
    assert main(["calibrate", "--data", str(data), "--out", str(tmp_path / "r.json"),
                 "--edge", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["route", "--router", str(tmp_path / "r.json"), "--edge", str(model_dir),
                 "First question?", "Second question?"]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2
    assert "p_good=" in out and "why:" in out
    assert ("-> EDGE" in out) or ("ESCALATE to cloud" in out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["route"], "Give prompts"),
        (["route", "--edge", "/no/such/model", "hi"], "not an existing path"),
        (["calibrate", "--data", "/no/such.jsonl", "--out", "x.json"], "No such file"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_jsonl_names_the_line(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    assert main(["route", "--edge", str(model_dir), "--input", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "attrs"),
    [
        ("sequence_logprob", {"normalize": True}),
        ("sequence_logprob:normalize=false", {"normalize": False}),
        ("semantic_entropy:n_samples=5,equivalence=exact", {"n_samples": 5,
                                                            "equivalence": "exact"}),
    ],
)
def test_parse_estimator_reads_name_and_parameters(spec, attrs):
    from confroute.cli._common import parse_estimator

    est = parse_estimator(spec)
    for key, value in attrs.items():
        assert getattr(est, key) == value


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_estimator", "Valid names"),
        ("sequence_logprob:normalize", "NAME:key=value"),
        ("sequence_logprob:bogus=1", "Bad parameters for estimator 'sequence_logprob'"),
    ],
)
def test_parse_estimator_rejects_bad_specs(spec, message):
    from confroute import InvalidParameterError
    from confroute.cli._common import parse_estimator

    with pytest.raises(InvalidParameterError, match=message):
        parse_estimator(spec)


def test_the_shipped_default_router_loads_and_orders_answers_by_likelihood():
    import numpy as np

    from confroute import Router, Sample, Samples
    from confroute.cli._common import default_router_path

    router = Router.load(default_router_path())
    assert router.feature_names == ["sequence_logprob"]
    assert router.estimators[0].normalize is False
    assert router.calibration_["n"] >= 300
    sure = Samples(prompt="a", greedy=Sample(text="Paris.", token_logprobs=np.full(4, -0.05)))
    unsure = Samples(prompt="b", greedy=Sample(text="Maybe...", token_logprobs=np.full(40, -1.5)))
    d_sure, d_unsure = router.route(["a", "b"], samples=[sure, unsure])
    assert d_sure.p_good > d_unsure.p_good
    assert (d_sure.source, d_unsure.source) == ("edge", "cloud")


# ------------------------------------------------------------------ enforced budgets
@pytest.fixture(scope="module")
def budget_router(model_dir, tmp_path_factory):
    """A router saved by 'confroute calibrate --max-cloud-fraction 0.25'."""
    tmp = tmp_path_factory.mktemp("budget")
    data = _write_jsonl(tmp / "labelled.jsonl", [
        {"prompt": f"What is {i} plus {i}?", "label": i % 2} for i in range(16)
    ])
    path = tmp / "router.json"
    assert main(["calibrate", "--data", str(data), "--out", str(path), "--edge", str(model_dir),
                 "--max-cloud-fraction", "0.25"]) == 0
    return path


def test_calibrate_budget_is_enforced_unless_threshold_only(budget_router, model_dir, tmp_path):
    from confroute import Router

    saved = json.loads(budget_router.read_text())["payload"]
    assert saved["policy"]["name"] == "budget"
    assert saved["policy"]["params"]["enforce"] == "total"
    p_good = saved["calibration"]["p_good"]
    assert len(p_good) == 16 and all(0.0 <= p <= 1.0 for p in p_good)
    # the recorded p_good are the router's own calibrated probabilities
    router = Router.load(budget_router)
    t = router.policy.threshold_
    assert router.policy.calibration_cloud_fraction_ == pytest.approx(
        sum(p < t for p in p_good) / 16)

    data = _write_jsonl(tmp_path / "labelled.jsonl", [
        {"prompt": f"Question {i}?", "label": i % 2} for i in range(12)
    ])
    out = tmp_path / "threshold_only.json"
    assert main(["calibrate", "--data", str(data), "--out", str(out), "--edge", str(model_dir),
                 "--max-cloud-fraction", "0.25", "--threshold-only"]) == 0
    assert json.loads(out.read_text())["payload"]["policy"]["params"]["enforce"] == "none"


def _route(router_path, model_dir, out, prompts, *extra):
    assert main(["route", "--router", str(router_path), "--edge", str(model_dir),
                 "--input", str(prompts), "--output", str(out), "--batch-size", "3",
                 *extra]) == 0
    return [json.loads(line)["source"] == "cloud" for line in out.read_text().splitlines()]


def test_route_max_cloud_fraction_caps_shifted_traffic_at_every_prefix(
        budget_router, model_dir, tmp_path):
    from confroute import BudgetPolicy, Router

    # Shifted traffic: the calibration record says every p_good was 1.0, so the refitted
    # threshold is 1.0 and nearly every new prompt wants the cloud.
    router = Router.load(budget_router)
    n_cal = len(router.calibration_["p_good"])
    router.calibration_["p_good"] = [1.0] * n_cal
    shifted = tmp_path / "shifted.json"
    router.save(shifted)
    # a threshold-only policy: not enforced
    router.policy = BudgetPolicy(max_cloud_fraction=0.3, enforce="none").fit([1.0] * n_cal)
    loose = tmp_path / "loose.json"
    router.save(loose)
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": i, "prompt": f"Tell me about topic {i}."} for i in range(10)
    ])
    wanted = _route(loose, model_dir, tmp_path / "loose.jsonl", prompts)
    assert sum(wanted) > 3  # without enforcement the 30% budget is broken on this traffic

    cloud = _route(shifted, model_dir, tmp_path / "enforced.jsonl", prompts,
                   "--max-cloud-fraction", "0.3")
    for k in range(1, len(cloud) + 1):
        assert sum(cloud[:k]) <= (3 * k) // 10, (k, cloud)
    assert sum(cloud) == 3  # the budget is used, not only respected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "--out", "x.json", "--edge", "/no/such/model",
          "--max-cloud-fraction", "1.5"],
         "The '--max-cloud-fraction' parameter of confroute calibrate must be"),
        (["calibrate", "--out", "x.json", "--edge", "/no/such/model", "--threshold-only"],
         "only applies with '--max-cloud-fraction'"),
        (["calibrate-predictive", "--query-router", "/no/such.json", "--data", "d.jsonl",
          "--out", "x.json", "--max-cloud-fraction", "-0.1"],
         "The '--max-cloud-fraction' parameter of confroute calibrate-predictive must be"),
        (["route", "--edge", "/no/such/model", "--max-cloud-fraction", "2", "hi"],
         "The '--max-cloud-fraction' parameter of confroute route must be"),
        # the built-in router records no calibration p_good: refused before loading models
        (["route", "--edge", "/no/such/model", "--max-cloud-fraction", "0.3", "hi"],
         "records none"),
    ],
)
def test_budget_options_are_checked_before_any_model_is_loaded(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "not an existing path" not in err


def test_route_refuses_a_budget_for_a_router_without_recorded_p_good(
        budget_router, model_dir, tmp_path, capsys):
    from confroute import Router

    router = Router.load(budget_router)
    del router.calibration_["p_good"]
    bare = tmp_path / "bare.json"
    router.save(bare)
    assert main(["route", "--router", str(bare), "--edge", str(model_dir),
                 "--max-cloud-fraction", "0.3", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"{bare} records none" in err and "confroute calibrate" in err
