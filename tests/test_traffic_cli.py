"""confroute calibrate --labeler (prompt-only data) and confroute recalibrate, in-process,
on a tiny saved edge model and a real loopback OpenAI-compatible cloud/judge."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from confroute.cli import main
from confroute.labeling import read_labels_jsonl
from confroute.router import Router
from confroute.traffic import DecisionLog, router_fingerprint
from confroute.types import Decision
from tests.fault_server import FaultServer
from tests.tiny_models import save_causal_lm

N = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_causal_lm(tmp_path_factory.mktemp("edge") / "tiny", "llama", seed=0)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judge_or_cloud(body: dict) -> str:
    """The loopback cloud: answers questions; as a judge, prefers the edge answer (tie) on
    even-numbered questions and the other answer in both orders on odd ones."""
    msgs = body.get("messages", [])
    if msgs and "impartial judge" in str(msgs[0].get("content", "")):
        i = int(re.search(r"Question (\d+)", msgs[-1]["content"]).group(1))
        return "Both are fine. [[C]]" if i % 2 == 0 else "Assistant A is better. [[A]]"
    return "The answer is 4"


@pytest.fixture
def prompts_file(tmp_path):
    return _write_jsonl(tmp_path / "prompts.jsonl",
                        [{"prompt": f"Question {i}: what is {i} plus {i}?"} for i in range(N)])


def test_label_free_calibrate_with_a_judge_then_reuse_the_labels(tmp_path, model_dir,
                                                                 prompts_file, capsys):
    out, labels = tmp_path / "r.json", tmp_path / "labels.jsonl"
    with FaultServer(answer=_judge_or_cloud) as srv:
        spec = f"openai:test-model@{srv.base_url}"
        assert main(["calibrate", "--data", str(prompts_file), "--out", str(out),
                     "--edge", str(model_dir), "--labeler", "judge", "--cloud", spec,
                     "--judge", spec, "--labels-out", str(labels)]) == 0
        n_requests = len(srv.requests)
    err = capsys.readouterr().err
    assert f"{N} cloud + {2 * N} judge requests (0 failed)" in err  # cost report
    assert f"labels: {N // 2} good, {N // 2} bad, 0 unknown" in err  # label balance
    assert n_requests == 3 * N  # one cloud answer, two judge orders per prompt
    saved = Router.load(out)
    cal = saved.calibration_
    assert cal["labeler"]["labeler"] == "judge" and cal["labeler"]["counts"]["good"] == N // 2
    assert cal["labels"] == [int(i % 2 == 0) for i in range(N)]
    assert len(cal["scores"]) == N and len(cal["scores"][0]) == 1
    got_prompts, got, meta = read_labels_jsonl(labels)
    assert got.tolist() == [float(i % 2 == 0) for i in range(N)]
    assert got_prompts[3] == "Question 3: what is 3 plus 3?"
    assert meta["backend"] == "judge-pairwise"

    # reuse: no labeler, no cloud (the server is gone), same labels
    again = tmp_path / "r2.json"
    assert main(["calibrate", "--data", str(prompts_file), "--out", str(again),
                 "--edge", str(model_dir), "--labels-in", str(labels)]) == 0
    assert Router.load(again).calibration_["labels"] == cal["labels"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labeler", "cloud_agreement"], "'--labeler cloud_agreement' option of confroute "
         "calibrate needs '--cloud'"),
        (["--labeler", "se_preference"], "needs '--cloud'"),
        (["--labeler", "judge", "--cloud", "openai:m@http://127.0.0.1:9/v1"], "needs '--judge'"),
        (["--labeler", "oracle", "--cloud", "x"],
         "'--labeler' option of confroute calibrate must be one of cloud_agreement, judge, "
         "se_preference. Got 'oracle'"),
        (["--labeler", "cloud_agreement", "--cloud", "x", "--equivalence", "nli"],
         "needs '--nli-model PATH'"),
        (["--labeler", "cloud_agreement", "--cloud", "x", "--threshold", "0.7"],
         "needs '--equivalence embedding'"),
        (["--labeler", "cloud_agreement", "--cloud", "x", "--equivalence", "embedding",
          "--threshold", "1.5"], "'--threshold' parameter of confroute calibrate"),
        (["--labeler", "judge", "--labels-in", "l.jsonl"], "exclude each other"),
    ],
)
def test_label_free_bad_options_fail_before_any_model_loads(tmp_path, prompts_file, extra,
                                                            message, capsys):
    out = tmp_path / "r.json"
    # the edge spec does not exist: a check that ran after loading would say so instead
    code = main(["calibrate", "--data", str(prompts_file), "--out", str(out),
                 "--edge", "/no/such/model", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_label_free_empty_prompt_file_and_missing_data(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["calibrate", "--data", str(empty), "--out", str(tmp_path / "r.json"),
                 "--edge", "/no/such/model", "--labeler", "cloud_agreement",
                 "--cloud", "x"]) == 2
    assert "'--data' option of confroute calibrate must be a JSONL file with at least one " \
           "prompt" in capsys.readouterr().err
    assert main(["calibrate", "--out", str(tmp_path / "r.json"), "--edge", "/no/such/model",
                 "--labeler", "cloud_agreement", "--cloud", "x"]) == 2
    assert "'--data' option of confroute calibrate is required" in capsys.readouterr().err


def test_labels_in_must_cover_every_prompt(tmp_path, prompts_file, capsys):
    from confroute.labeling import write_labels_jsonl

    labels = write_labels_jsonl(tmp_path / "l.jsonl", ["Question 0: what is 0 plus 0?"], [1])
    assert main(["calibrate", "--data", str(prompts_file), "--out", str(tmp_path / "r.json"),
                 "--edge", "/no/such/model", "--labels-in", str(labels)]) == 2
    assert "no label for 15 of them (first: row 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- recalibrate


@pytest.fixture(scope="module")
def saved_router(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("router")
    data = _write_jsonl(tmp / "labelled.jsonl",
                        [{"prompt": f"Question {i}?", "label": i % 2} for i in range(20)])
    path = tmp / "router.json"
    assert main(["calibrate", "--data", str(data), "--out", str(path),
                 "--edge", str(model_dir)]) == 0
    return path


def _fill_log(path, router, n, seed=0):
    """A decision log of ``router`` with ``n`` labelled rows: low scores are good."""
    rng = np.random.default_rng(seed)
    name = router.feature_names[0]
    with DecisionLog(path, router_fingerprint=router_fingerprint(router)) as log:
        for i in range(n):
            s = float(rng.uniform(0, 4))
            d = Decision(prompt=f"traffic {i}", source="edge", p_good=0.5, scores={name: s},
                         edge_answer="x")
            log.append(d, label=int(rng.uniform() < 1 / (1 + np.exp(2 * s - 4))))
        log.append(Decision(prompt="unlabelled", source="cloud", p_good=0.1,
                            scores={name: 3.0}, edge_answer="y"))


def test_recalibrate_round_trip(tmp_path, saved_router, capsys):
    router = Router.load(saved_router)
    log = tmp_path / "decisions.sqlite"
    _fill_log(log, router, 120)
    out = tmp_path / "r2.json"
    assert main(["recalibrate", "--log", str(log), "--router", str(saved_router),
                 "--out", str(out), "--min-labels", "100"]) == 0
    assert "refitted on 120 labelled of 121 logged requests" in capsys.readouterr().err
    new = Router.load(out)
    assert new.calibration_["source"] == "traffic" and new.calibration_["n"] == 120
    assert new.calibration_["previous_fingerprint"] == router_fingerprint(router)
    assert router_fingerprint(new) != router_fingerprint(router)
    p = new.calibrator.p_good(np.array([0.2, 3.8]))
    assert p[0] > p[1]  # learned from the log: low scores are good
    merged = tmp_path / "r3.json"
    assert main(["recalibrate", "--log", str(log), "--router", str(saved_router),
                 "--out", str(merged), "--merge-calibration", "--weight-recent", "50"]) == 0
    assert Router.load(merged).calibration_["n"] == 120 + 20
    # the Python API mirrors it
    with DecisionLog(log, router_fingerprint=router_fingerprint(router)) as opened:
        api = router.recalibrate(opened, min_labels=100)
    assert api.calibration_["n"] == 120
    np.testing.assert_allclose(api.calibrator.p_good(np.array([0.2, 3.8])), p)


def test_recalibrate_refuses_a_log_of_another_router_and_writes_nothing(tmp_path, saved_router,
                                                                        capsys):
    other = Router.load(saved_router)
    other.policy.set_params(min_p_good=0.9)  # decides differently: another fingerprint
    log = tmp_path / "other.sqlite"
    _fill_log(log, other, 60)
    before = log.read_bytes()
    out = tmp_path / "r2.json"
    assert main(["recalibrate", "--log", str(log), "--router", str(saved_router),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'--log' option of confroute recalibrate must be a decision log written by the " \
           "router in --router" in err
    assert router_fingerprint(other) in err
    assert not out.exists()
    assert log.read_bytes() == before


def test_recalibrate_bad_inputs_write_nothing(tmp_path, saved_router, capsys):
    out = tmp_path / "r2.json"
    missing = tmp_path / "missing.sqlite"
    assert main(["recalibrate", "--log", str(missing), "--router", str(saved_router),
                 "--out", str(out)]) == 2
    assert "'--log' option of confroute recalibrate must be an existing" in \
        capsys.readouterr().err
    assert not missing.exists()
    router = Router.load(saved_router)
    log = tmp_path / "few.sqlite"
    _fill_log(log, router, 10)
    assert main(["recalibrate", "--log", str(log), "--router", str(saved_router),
                 "--out", str(out)]) == 2
    assert "at least 50 labelled rows" in capsys.readouterr().err
    assert main(["recalibrate", "--log", str(log), "--router", str(saved_router),
                 "--out", str(out), "--min-labels", "1"]) == 2
    assert "'--min-labels' parameter of confroute recalibrate" in capsys.readouterr().err
    # a router saved without its calibration set cannot merge it
    bare = tmp_path / "bare.json"
    del router.calibration_["scores"]
    router.save(bare)
    assert main(["recalibrate", "--log", str(log), "--router", str(bare), "--out", str(out),
                 "--merge-calibration", "--min-labels", "5"]) == 2
    assert "'--merge-calibration' option of confroute recalibrate needs" in \
        capsys.readouterr().err
    assert not out.exists()
