"""Router: calibrate -> route -> call, persistence and cloud faults.

Most tests feed hand-built generations (``samples=``) so that the routing logic
is exercised exactly and fast; a few run the whole path on tiny real models.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confroute import (
    CloudError,
    GenerationConfig,
    InvalidParameterError,
    NotFittedError,
    Router,
    Sample,
    Samples,
    SerializationError,
)
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import SampleRequest


def _samples(prompts: Sequence[str], nll: Sequence[float], rng: np.random.Generator):
    """One greedy answer per prompt whose mean token NLL is ``nll[i]``."""
    out = []
    for p, v in zip(prompts, nll):
        n = int(rng.integers(2, 6))
        lp = np.full(n, -float(v))
        ent = np.full(n, float(v) * 1.5)
        out.append(Samples(prompt=p, greedy=Sample(text=f"answer to {p}", token_logprobs=lp,
                                                    token_entropies=ent)))
    return out


def _synthetic(n: int, seed: int = 0):
    """Prompts, samples and labels where a low NLL means a good answer (noisy)."""
    rng = np.random.default_rng(seed)
    prompts = [f"question {i}" for i in range(n)]
    nll = rng.uniform(0.0, 3.0, size=n)
    labels = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(3.0 * (nll - 1.5)))).astype(int)
    return prompts, _samples(prompts, nll, rng), labels


class ScriptedCloud:
    """A cloud model that answers or fails as scripted (fault injection only)."""

    name = "scripted-cloud"

    def __init__(self, fail: set[str] | None = None, fail_batch: bool = False) -> None:
        self.fail = fail or set()
        self.fail_batch = fail_batch
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def generate(self, prompts, config):
        with self.lock:
            self.calls.append([str(p) for p in prompts])
        if self.fail_batch and len(prompts) > 1:
            raise CloudError("batch endpoint down", reason="http_503", status=503)
        out = []
        for p in prompts:
            if p in self.fail:
                raise CloudError(f"cannot answer {p}", reason="http_500", status=500, attempts=3)
            out.append([Sample(text=f"cloud says: {p}", token_ids=(1, 2, 3), prompt_tokens=7)])
        return out

    def cost_of(self, samples):
        return 0.001 * sum(s.n_tokens for s in samples)


def _fitted(policy="threshold", n=200, seed=0, **kw):
    prompts, samples, labels = _synthetic(n, seed)
    router = Router("sequence_logprob", "isotonic", policy, **kw)
    router.calibrate(prompts, labels, samples=samples)
    return router


def test_calibrate_and_route_on_given_samples():
    router = _fitted()
    assert router.calibration_["n"] == 200
    prompts, samples, _ = _synthetic(50, seed=1)
    decisions = router.route(prompts, samples=samples)
    assert len(decisions) == 50
    p = np.array([d.p_good for d in decisions])
    nll = np.array([-s.greedy.mean_logprob for s in samples])
    # isotonic on an uncertainty score: p_good never increases with the NLL
    order = np.argsort(nll)
    assert np.all(np.diff(p[order]) <= 1e-12)
    for d, s in zip(decisions, samples):
        assert d.edge_answer == s.greedy.text
        assert d.source == ("cloud" if d.p_good < 0.5 else "edge")
        assert "sequence_logprob" in d.scores
        assert d.reason


def test_route_before_calibrate_says_what_to_call():
    router = Router("sequence_logprob", "isotonic", "threshold")
    prompts, samples, _ = _synthetic(3)
    with pytest.raises(NotFittedError, match=r"call router\.calibrate"):
        router.route(prompts, samples=samples)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of 'labels'"),
        ({"labels": [1, 0], "references": ["a", "b"]}, "exactly one of 'labels'"),
    ],
)
def test_calibrate_needs_labels_or_references(kwargs, match):
    router = Router("sequence_logprob", "isotonic", "threshold")
    prompts, samples, _ = _synthetic(2)
    with pytest.raises(InvalidParameterError, match=match):
        router.calibrate(prompts, samples=samples, **kwargs)


def test_calibrate_length_mismatch_names_the_inputs():
    router = Router("sequence_logprob", "isotonic", "threshold")
    prompts, samples, labels = _synthetic(20)
    with pytest.raises(InvalidParameterError, match="'labels' has 19"):
        router.calibrate(prompts, labels[:19], samples=samples)


def test_calibrate_with_references_grades_edge_answers():
    prompts = [f"q{i}" for i in range(40)]
    rng = np.random.default_rng(3)
    nll = rng.uniform(0, 3, size=40)
    samples = [
        Samples(prompt=p, greedy=Sample(text="Paris" if v < 1.5 else "Lyon",
                                        token_logprobs=np.full(3, -v)))
        for p, v in zip(prompts, nll)
    ]
    router = Router("sequence_logprob", "isotonic", "threshold")
    router.calibrate(prompts, references=[["Paris"]] * 40, grader="contains", samples=samples)
    assert router.calibration_["edge_accuracy"] == pytest.approx(np.mean(nll < 1.5))
    d_good, d_bad = router.route(["a", "b"], samples=[
        Samples(prompt="a", greedy=Sample(text="x", token_logprobs=np.full(3, -0.1))),
        Samples(prompt="b", greedy=Sample(text="y", token_logprobs=np.full(3, -2.9))),
    ])
    assert d_good.source == "edge" and d_bad.source == "cloud"


def test_unknown_grader_lists_valid_names():
    router = Router("sequence_logprob", "isotonic", "threshold")
    prompts, samples, _ = _synthetic(4)
    with pytest.raises(InvalidParameterError, match="'contains'"):
        router.calibrate(prompts, references=["a"] * 4, grader="fuzzy", samples=samples)


def test_unknown_part_names_list_valid_ones():
    with pytest.raises(InvalidParameterError, match=r"Valid names: .*sequence_logprob"):
        Router("no_such_estimator")
    with pytest.raises(InvalidParameterError, match=r"Valid names: .*isotonic"):
        Router("sequence_logprob", "nope")


# --------------------------------------------------------------- persistence
def test_save_load_round_trip_identical_decisions(tmp_path):
    router = _fitted()
    path = tmp_path / "router.json"
    router.save(path)
    loaded = Router.load(path)
    prompts, samples, _ = _synthetic(100, seed=7)
    a = router.route(prompts, samples=samples)
    b = loaded.route(prompts, samples=samples)
    assert [d.source for d in a] == [d.source for d in b]
    np.testing.assert_array_equal([d.p_good for d in a], [d.p_good for d in b])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=30),
       st.sampled_from(["isotonic", "platt"]))
def test_saved_then_loaded_router_decides_the_same(tmp_path_factory, nlls, calibrator):
    prompts, samples, labels = _synthetic(120, seed=11)
    router = Router("sequence_logprob", calibrator, "threshold")
    router.calibrate(prompts, labels, samples=samples)
    path = tmp_path_factory.mktemp("r") / "router.json"
    router.save(path)
    loaded = Router.load(path)
    qs = [f"p{i}" for i in range(len(nlls))]
    ss = _samples(qs, nlls, np.random.default_rng(0))
    a, b = router.route(qs, samples=ss), loaded.route(qs, samples=ss)
    assert [(d.source, d.p_good) for d in a] == [(d.source, d.p_good) for d in b]


def _saved(tmp_path):
    path = tmp_path / "router.json"
    _fitted().save(path)
    return path


def test_tampered_file_is_rejected(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads(path.read_text())
    doc["payload"]["policy"]["params"]["min_p_good"] = 0.01
    path.write_text(json.dumps(doc))
    with pytest.raises(SerializationError, match="checksum"):
        Router.load(path)


def test_truncated_file_is_rejected(tmp_path):
    path = _saved(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(SerializationError, match="not valid JSON"):
        Router.load(path)


def test_file_naming_an_unregistered_class_never_instantiates_it(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads(path.read_text())
    doc["payload"]["estimators"][0]["name"] = "os.system"
    from confroute._serialization import _digest

    doc["sha256"] = _digest(doc["payload"])  # a forger can recompute the checksum
    path.write_text(json.dumps(doc))
    with pytest.raises(SerializationError, match=r"unknown estimator 'os\.system'"):
        Router.load(path)


def test_wrong_kind_and_version_are_rejected(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(SerializationError, match="version 99"):
        Router.load(path)
    with pytest.raises(SerializationError, match="does not exist"):
        Router.load(tmp_path / "missing.json")


def test_no_pickle_anywhere_in_the_package():
    import pathlib

    import confroute

    root = pathlib.Path(confroute.__file__).parent
    offenders = [
        str(p) for p in root.rglob("*.py")
        if any(w in p.read_text() for w in ("import pickle", "torch.load(", "allow_pickle=True"))
    ]
    assert offenders == []


# ------------------------------------------------------------- cloud calls
def test_call_keeps_edge_answers_and_calls_cloud_for_the_rest():
    cloud = ScriptedCloud()
    router = _fitted(cloud=cloud)
    prompts, samples, _ = _synthetic(30, seed=2)
    responses = router(prompts, samples=samples)
    assert len(responses) == 30
    escalated = [r.decision.prompt for r in responses if r.decision.source == "cloud"]
    assert escalated and len(escalated) < 30
    assert cloud.calls == [escalated]  # one batched call, only the escalated prompts
    for r in responses:
        if r.decision.source == "edge":
            assert r.source == "edge" and r.text == r.decision.edge_answer and r.cost == 0
        else:
            assert r.source == "cloud" and r.text == f"cloud says: {r.decision.prompt}"
            assert r.cost == pytest.approx(0.003) and r.usage["prompt_tokens"] == 7


@pytest.mark.parametrize("mode", ["degrade", "error", "raise"])
def test_cloud_failure_never_loses_a_request(mode):
    prompts, samples, _ = _synthetic(30, seed=2)
    probe = _fitted().route(prompts, samples=samples)
    up = [d.prompt for d in probe if d.source == "cloud"]
    cloud = ScriptedCloud(fail={up[0]}, fail_batch=True)
    router = _fitted(cloud=cloud, on_cloud_error=mode)
    if mode == "raise":
        with pytest.raises(CloudError, match=f"cannot answer {up[0]}"):
            router(prompts, samples=samples)
        # every other escalated prompt was still tried individually
        assert {c[0] for c in cloud.calls if len(c) == 1} == set(up)
        return
    responses = router(prompts, samples=samples)
    assert len(responses) == len(prompts)
    failed = next(r for r in responses if r.decision.prompt == up[0])
    assert "http_500" in failed.error
    if mode == "degrade":
        assert failed.degraded and failed.source == "edge"
        assert failed.text == failed.decision.edge_answer
    else:
        assert failed.text is None and not failed.degraded
    others = [r for r in responses if r.decision.prompt in up[1:]]
    assert all(r.source == "cloud" and r.error is None for r in others)


def test_no_cloud_configured_degrades_with_a_reason():
    router = _fitted()
    prompts, samples, _ = _synthetic(30, seed=2)
    responses = router(prompts, samples=samples)
    up = [r for r in responses if r.decision.source == "cloud"]
    assert up and all(r.degraded and "no cloud model" in r.error for r in up)


def test_budget_ledger_counts_only_cloud_calls_that_happened():
    from confroute.policies import BudgetPolicy

    prompts, samples, _ = _synthetic(30, seed=2)
    policy = BudgetPolicy(max_cloud_fraction=0.5, enforce="total")
    router = _fitted(policy=policy, cloud=ScriptedCloud(fail=set(prompts)))
    router(prompts, samples=samples)
    assert policy.snapshot().cloud == 0  # every cloud call failed: nothing was spent


# ---------------------------------------------------- pre-generation estimator
@estimator_registry.register("test_prompt_length")
class PromptLength(UncertaintyEstimator):
    """A query-only estimator: longer prompts are 'more uncertain'."""

    needs_generation = False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def sample_request(self) -> SampleRequest:
        return SampleRequest(greedy=False)

    def score_samples(self, samples, model=None):
        return np.array([len(str(s.prompt)) * self.scale for s in samples]), {}


class CountingEdge:
    name = "counting-edge"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, prompts, config):
        self.prompts += list(prompts)
        return [[Sample(text=f"edge: {p}", token_logprobs=np.zeros(2))] for p in prompts]


def test_pre_generation_estimator_only_generates_for_prompts_kept_on_edge():
    edge = CountingEdge()
    router = Router(PromptLength(), "isotonic", "threshold", edge=edge)
    short = [f"q{i}" for i in range(20)]
    long = [f"a much longer question number {i} that the edge model fails" for i in range(20)]
    router.calibrate(short + long, [1] * 20 + [0] * 20)
    edge.prompts.clear()
    decisions = router.route(["q99", long[0] + "!"])
    assert [d.source for d in decisions] == ["edge", "cloud"]
    assert edge.prompts == ["q99"]  # the escalated prompt never touched the edge model
    assert decisions[0].edge_answer == "edge: q99" and decisions[1].edge_answer is None


def test_several_estimators_feed_a_multi_feature_calibrator():
    prompts, samples, labels = _synthetic(150)
    router = Router(["sequence_logprob", "mean_token_entropy"], "platt", "threshold")
    router.calibrate(prompts, labels, samples=samples)
    d = router.route(prompts[:3], samples=samples[:3])
    assert set(d[0].scores) == {"sequence_logprob", "mean_token_entropy"}


# ------------------------------------------------------------- real models
def test_end_to_end_on_tiny_models(tiny_llama, tiny_gpt2):
    from confroute.models.hf import HFLanguageModel

    edge = HFLanguageModel(*tiny_llama)
    cloud = HFLanguageModel(*tiny_gpt2)
    router = Router("sequence_logprob", "isotonic", "threshold", edge=edge, cloud=cloud,
                    edge_max_new_tokens=6,
                    cloud_config=GenerationConfig(max_new_tokens=4))
    prompts = [f"What is {i} plus {i}?" for i in range(12)]
    labels = [i % 2 for i in range(12)]
    router.calibrate(prompts, labels)
    responses = router(prompts[:4])
    assert len(responses) == 4
    for r in responses:
        assert isinstance(r.text, str)
        assert r.source == r.decision.source
        assert np.isfinite(r.decision.p_good)
