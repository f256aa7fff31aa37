"""The Router's public seams: decide / answer / aanswer, check_calibrated, p_good_of,
to_dict / from_dict, calibrate's up-front validation and labelers, and the rule that
no module reaches into the Router's or the policies' private names."""

from __future__ import annotations

import ast
import asyncio
import math
import pathlib

import numpy as np
import pytest

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
from confroute._serialization import read_file, write_file
from confroute.errors import ConfrouteError
from confroute.policies import BudgetPolicy, CostAwarePolicy, OnlinePolicy, Ticket
from tests.test_router import ScriptedCloud, _fitted, _synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1] / "confroute"


# ------------------------------------------------------------ private names
_OWN_MODULES = ("router.py", "policies.py")
_ALWAYS = {"_route", "_answer", "_aanswer", "_check_fitted", "_ledger", "_admit_locked"}


def _private_names() -> set[str]:
    """Underscore (non-dunder) methods of the classes in router.py and policies.py."""
    names = set(_ALWAYS)
    for mod in _OWN_MODULES:
        tree = ast.parse((ROOT / mod).read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for node in cls.body:
                is_fn = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                if is_fn and node.name.startswith("_") and not node.name.startswith("__"):
                    names.add(node.name)
    return names


def _violations(source: str, names: set[str]) -> list[str]:
    """Uses of ``names`` on another object than self/cls/super(), or private imports
    from confroute.router / confroute.policies, unless the module defines that name."""
    tree = ast.parse(source)
    defined = {n.name for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in (
            "confroute.router", "confroute.policies"
        ):
            out += [f"line {node.lineno}: imports {a.name}" for a in node.names
                    if a.name.startswith("_")]
        if not isinstance(node, ast.Attribute) or node.attr not in names:
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
            continue
        if node.attr not in defined:
            out.append(f"line {node.lineno}: .{node.attr}")
    return out


def test_the_private_name_check_can_fail():
    names = _private_names()
    assert {"_decide", "_apply_policy", "_admit_one", "_ledger_locked"} <= names
    bad = (
        "def f(router, policy):\n"
        "    router._route([], None)\n"
        "    policy._ledger_locked({})\n"
        "from confroute.policies import _Ledger\n"
    )
    assert len(_violations(bad, names)) == 3
    ok = "class A:\n    def _route(self):\n        return self._route()\n"
    assert _violations(ok, names) == []


def test_no_module_uses_router_or_policy_private_names():
    names = _private_names()
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        if path.parent == ROOT and path.name in _OWN_MODULES:
            continue
        bad = _violations(path.read_text(), names)
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert found == {}


# --------------------------------------------------------------- decide
def _budget_router(cloud=None, budget=0.2, **kw):
    prompts, samples, labels = _synthetic(200)
    policy = BudgetPolicy(max_cloud_fraction=budget)
    router = Router("sequence_logprob", "isotonic", policy, cloud=cloud, **kw)
    router.calibrate(prompts, labels, samples=samples)
    return router, policy


def test_decide_admits_to_an_enforced_budget_and_carries_tickets():
    router, policy = _budget_router()
    assert isinstance(policy, OnlinePolicy) and policy.enforced
    prompts, samples, _ = _synthetic(40, seed=3)
    decisions = router.decide(prompts, samples=samples)
    assert all(isinstance(d.ticket, Ticket) for d in decisions)
    assert [d.ticket.seq for d in decisions] == list(range(40))
    assert [d.source == "cloud" for d in decisions] == [d.ticket.escalate for d in decisions]
    cum = np.cumsum([d.source == "cloud" for d in decisions])
    assert all(c <= math.floor(0.2 * (i + 1)) for i, c in enumerate(cum))
    assert policy.snapshot().requests == 40 and policy.snapshot().cloud == cum[-1]
    # the ticket stays out of repr and equality
    assert "ticket" not in repr(decisions[0])
    assert router.route(prompts[:1], samples=samples[:1])[0].ticket.seq == 40


def test_decide_without_online_policy_has_no_ticket_and_matches_route():
    router = _fitted()
    prompts, samples, _ = _synthetic(20, seed=4)
    a, b = router.decide(prompts, samples=samples), router.route(prompts, samples=samples)
    assert a == b and all(d.ticket is None for d in a)


def test_unenforced_online_policy_is_not_admitted():
    prompts, samples, labels = _synthetic(100)
    policy = BudgetPolicy(max_cloud_fraction=0.2, enforce="none")
    router = Router("sequence_logprob", "isotonic", policy)
    router.calibrate(prompts, labels, samples=samples)
    decisions = router.decide(prompts, samples=samples)
    assert all(d.ticket is None for d in decisions)
    assert policy.snapshot().requests == 0
    assert "not a guarantee" in decisions[0].reason


def test_check_calibrated_and_p_good_of():
    router = Router("sequence_logprob", "isotonic", "threshold")
    with pytest.raises(NotFittedError, match=r"call router\.calibrate"):
        router.check_calibrated()
    with pytest.raises(NotFittedError, match="calibrate"):
        router.decide(["q"], samples=[Samples(prompt="q", greedy=Sample(text="a"))])
    router = _fitted()
    router.check_calibrated()
    p = router.p_good_of(np.array([0.1, 1.5, 2.9]))
    assert p.shape == (3,) and p.dtype == np.float64 and p[0] >= p[2]
    prompts, samples, _ = _synthetic(5, seed=9)
    np.testing.assert_array_equal(router.predict_proba(prompts, samples=samples),
                                  [d.p_good for d in router.decide(prompts, samples=samples)])


# --------------------------------------------------------------- answer
class ConfigCloud(ScriptedCloud):
    """Records the generation configs it was called with."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.configs: list[GenerationConfig] = []

    def generate(self, prompts, config):
        self.configs.append(config)
        return super().generate(prompts, config)


def test_answer_settles_tickets_and_never_raises():
    prompts, samples, _ = _synthetic(40, seed=2)
    router, policy = _budget_router(budget=0.5, on_cloud_error="raise")
    decisions = router.decide(prompts, samples=samples)
    up = [d for d in decisions if d.source == "cloud"]
    assert len(up) >= 2
    router.cloud = ConfigCloud(fail={up[0].prompt})
    before = policy.snapshot().cloud
    cfg = GenerationConfig(max_new_tokens=7)
    responses = router.answer(decisions, cloud_config=cfg)  # "raise" is __call__'s business
    assert len(responses) == 40 and [r.decision for r in responses] == decisions
    failed = responses[decisions.index(up[0])]
    assert isinstance(failed.cloud_error, CloudError) and failed.cloud_error.reason == "http_500"
    assert failed.text is None and "http_500" in failed.error
    assert policy.snapshot().cloud == before - 1  # the failed call gave its budget back
    assert all(c is cfg for c in router.cloud.configs)
    assert all(r.cloud_error is None for r in responses if r is not failed)
    assert all(d.ticket.settled for d in up)
    # settling again (answering the same decisions twice) changes nothing
    router.cloud = ScriptedCloud()
    router.answer(decisions)
    assert policy.snapshot().cloud == before - 1


def test_call_raises_the_cloud_error_of_the_response():
    prompts, samples, _ = _synthetic(30, seed=2)
    up = [d.prompt for d in _fitted().route(prompts, samples=samples) if d.source == "cloud"]
    router = _fitted(cloud=ScriptedCloud(fail={up[1]}), on_cloud_error="raise")
    with pytest.raises(CloudError, match=f"cannot answer {up[1]}") as info:
        router(prompts, samples=samples)
    assert info.value.status == 500


def test_aanswer_matches_answer_and_validates():
    prompts, samples, _ = _synthetic(30, seed=2)
    router = _fitted(cloud=ScriptedCloud())
    decisions = router.decide(prompts, samples=samples)
    sync = router.answer(decisions)
    got = asyncio.run(router.aanswer(decisions))
    assert [(r.text, r.source, r.cost) for r in got] == [(r.text, r.source, r.cost) for r in sync]
    with pytest.raises(TypeError, match=r"'decisions' parameter of Router\.aanswer"):
        asyncio.run(router.aanswer(decisions[0]))
    with pytest.raises(TypeError, match=r"'cloud_config' parameter of Router\.answer"):
        router.answer(decisions, cloud_config={"max_new_tokens": 3})


def test_aanswer_gives_budget_back_on_failure():
    prompts, samples, _ = _synthetic(30, seed=2)
    router, policy = _budget_router(budget=0.5, cloud=ScriptedCloud(fail=set(prompts)))
    decisions = router.decide(prompts, samples=samples)
    assert policy.snapshot().cloud > 0
    responses = asyncio.run(router.aanswer(decisions))
    assert policy.snapshot().cloud == 0
    assert all(r.cloud_error is not None for r in responses if r.decision.source == "cloud")


# ---------------------------------------------------------- persistence
def test_to_dict_from_dict_round_trip():
    router, _ = _budget_router(budget=0.3)
    data = router.to_dict()
    assert data["policy"]["name"] == "budget" and data["policy"]["params"]["enforce"] == "total"
    cloud = ScriptedCloud()
    back = Router.from_dict(data, cloud=cloud)
    assert back.cloud is cloud and back.calibration_ == router.calibration_
    assert back.calibration_ is not router.calibration_
    prompts, samples, _ = _synthetic(60, seed=8)
    a, b = router.decide(prompts, samples=samples), back.decide(prompts, samples=samples)
    assert [(d.source, d.p_good) for d in a] == [(d.source, d.p_good) for d in b]
    with pytest.raises(NotFittedError):
        Router().to_dict()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("estimators"), "incomplete"),
        (lambda d: d.pop("calibration"), "no calibration record"),
        (lambda d: d["policy"].update(name="os.system"), "unknown policy"),
    ],
)
def test_from_dict_rejects_bad_data(mutate, match):
    data = _fitted().to_dict()
    mutate(data)
    with pytest.raises(SerializationError, match=match):
        Router.from_dict(data)
    with pytest.raises(SerializationError, match="must be a dict"):
        Router.from_dict([])  # type: ignore[arg-type]


def test_a_file_saved_before_the_period_parameter_still_loads(tmp_path):
    prompts, samples, labels = _synthetic(100)
    router = Router("sequence_logprob", "isotonic", BudgetPolicy(max_cloud_fraction=0.3,
                                                                 enforce="none"))
    router.calibrate(prompts, labels, samples=samples)
    old = router.to_dict()
    del old["policy"]["params"]["period"]  # written by a version without period mode
    path = tmp_path / "old.json"
    write_file(path, "router", old)
    loaded = Router.load(path)
    assert loaded.policy.enforce == "none" and loaded.policy.period is None
    router.save(tmp_path / "new.json")
    saved = read_file(tmp_path / "new.json", "router")["policy"]
    assert saved["params"] == router.to_dict()["policy"]["params"]


# ------------------------------------------------- calibrate: validation
class SpyEdge:
    """Wraps a real model and counts every call made to it."""

    def __init__(self, model) -> None:
        self.model = model
        self.name = "spy"
        self.calls = 0

    def __getattr__(self, attr):
        inner = getattr(self.model, attr)
        if not callable(inner):
            return inner

        def spied(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        return spied


class NoLabel:
    pass


PROMPTS = [f"What is {i} plus {i}?" for i in range(6)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of 'labels'"),
        ({"labels": [1, 0] * 3, "references": ["a"] * 6}, "exactly one of"),
        ({"labels": [1, 0] * 3, "labeler": NoLabel()}, "exactly one of"),
        ({"labels": [1, 0, 1]}, "'labels' has 3"),
        ({"labels": [1, 0, 2, 1, 0, 1]}, "'labels'.*0/1"),
        ({"labels": [1] * 6}, "'labels'.*both classes"),
        ({"references": ["a"] * 5}, "'references' has 5"),
        ({"references": ["a", 3, "b", "c", "d", "e"]}, "'references'"),
        ({"references": "abcdef"}, "'references'"),
        ({"references": ["a"] * 6, "grader": "fuzzy"}, "'contains'"),
        ({"references": ["a"] * 6, "grader": ["exact"] * 5}, "'grader' has 5"),
        ({"references": ["a"] * 6, "grader": ["exact"] * 5 + ["nope"]}, "nope"),
        ({"labels": [1, 0] * 3, "samples": [Samples(prompt="x")] * 5}, "'samples' has 5"),
        ({"labels": [1, 0] * 3, "samples": ["x"] * 6}, "'samples'"),
        ({"labeler": NoLabel()}, "'labeler'"),
        ({"labeler": 3}, "'labeler'"),
    ],
)
def test_calibrate_checks_every_argument_before_any_generation(tiny_llama, kwargs, match):
    from confroute.models.hf import HFLanguageModel

    spy = SpyEdge(HFLanguageModel(*tiny_llama))
    router = Router("sequence_logprob", "isotonic", "threshold", edge=spy,
                    edge_max_new_tokens=3)
    with pytest.raises(ConfrouteError, match=match):
        router.calibrate(PROMPTS, **kwargs)
    assert spy.calls == 0
    assert router.calibration_ is None


def test_spy_sees_the_generation_of_a_valid_calibration(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    spy = SpyEdge(HFLanguageModel(*tiny_llama))
    router = Router("sequence_logprob", "isotonic", "threshold", edge=spy,
                    edge_max_new_tokens=3)
    router.calibrate(PROMPTS, [1, 0] * 3)
    assert spy.calls > 0 and router.calibration_["n"] == 6


# ------------------------------------------------------ calibrate: labeler
class AnswerLabeler:
    """Labels an edge answer by its text: 'Paris' good, 'Lyon' bad, anything else unknown."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def label(self, prompts, edge_samples):
        self.seen.append(len(prompts))
        table = {"Paris": 1.0, "Lyon": 0.0}
        return np.array([table.get(s.greedy.text, np.nan) for s in edge_samples])

    def describe(self):
        return {"name": "answer_table", "version": 1}


def _paris_samples(n: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [f"q{i}" for i in range(n)]
    nll = rng.uniform(0, 3, size=n)
    texts = ["Paris" if v < 1.5 else "Lyon" for v in nll]
    for i in range(0, n, 5):
        texts[i] = "I am not sure"
    samples = [Samples(prompt=p, greedy=Sample(text=t, token_logprobs=np.full(3, -v)))
               for p, t, v in zip(prompts, texts, nll)]
    return prompts, samples, texts


def test_labeler_labels_fit_and_unknowns_are_left_out_and_counted():
    prompts, samples, texts = _paris_samples(60, seed=3)
    labeler = AnswerLabeler()
    router = Router("sequence_logprob", "isotonic", "threshold")
    router.calibrate(prompts, samples=samples, labeler=labeler)
    assert labeler.seen == [60]
    cal = router.calibration_
    assert cal["n"] == 60 and cal["n_unlabeled"] == 12
    assert cal["labeler"] == {"name": "answer_table", "version": 1}
    known = [i for i, t in enumerate(texts) if t != "I am not sure"]
    assert cal["edge_accuracy"] == pytest.approx(np.mean([texts[i] == "Paris" for i in known]))
    # the same fit as explicit labels on the labelled prompts only
    ref = Router("sequence_logprob", "isotonic", "threshold")
    ref.calibrate([prompts[i] for i in known], [int(texts[i] == "Paris") for i in known],
                  samples=[samples[i] for i in known])
    q, qs, _ = _synthetic(30, seed=4)
    assert [d.p_good for d in router.decide(q, samples=qs)] == [
        d.p_good for d in ref.decide(q, samples=qs)]


class BadShapeLabeler:
    def label(self, prompts, edge_samples):
        return np.ones(len(prompts) + 1)


class BadValueLabeler:
    def label(self, prompts, edge_samples):
        return np.full(len(prompts), 0.5)


@pytest.mark.parametrize("labeler", [BadShapeLabeler(), BadValueLabeler()])
def test_labeler_output_is_checked(labeler):
    prompts, samples, _ = _paris_samples(10, seed=1)
    router = Router("sequence_logprob", "isotonic", "threshold")
    with pytest.raises(InvalidParameterError, match=r"'labeler'.*1 \(good\), 0 \(bad\) or NaN"):
        router.calibrate(prompts, samples=samples, labeler=labeler)
    assert router.calibration_ is None


def test_cost_aware_spend_cap_is_enforced_through_the_router():
    prompts, samples, labels = _synthetic(100)
    policy = CostAwarePolicy(cloud_cost=1.0, quality_value=10.0, spend_budget=3.0)
    router = Router("sequence_logprob", "isotonic", policy, cloud=ScriptedCloud())
    router.calibrate(prompts, labels, samples=samples)
    responses = router(prompts, samples=samples)
    # three reservations of cloud_cost=1.0 fit the cap when the batch is decided ...
    assert sum(r.source == "cloud" for r in responses) == 3
    # ... and the ledger keeps what was really spent: the cloud's cost_of per answer
    real = [r.cost for r in responses if r.source == "cloud"]
    assert real == [pytest.approx(0.003)] * 3
    assert policy.snapshot().spent == pytest.approx(sum(real))
