"""Fuzz stage (issue 13): the public API's parameters and a served OpenAPI schema.

Every call gets arbitrary values (wrong types, NaN, huge numbers, nested junk) and
must either succeed or raise a typed :class:`~confroute.errors.ConfrouteError`:
never another exception. The server is fuzzed with schemathesis on its own
``/openapi.json`` over loopback: no 5xx.

Bounded and seeded for CI (``derandomize=True``; ``CONFROUTE_FUZZ_EXAMPLES``
examples per test, default 15); ``nox -s fuzz`` runs it with more and prints the
counts of outcomes.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confroute import ConfrouteError, Router
from confroute.calibration import calibrator_registry
from confroute.policies import ThresholdPolicy, policy_registry
from confroute.types import GenerationConfig
from tests.test_hardening import _fitted, _forge

EXAMPLES = int(os.environ.get("CONFROUTE_FUZZ_EXAMPLES", "15"))
COUNTS: collections.Counter[str] = collections.Counter()
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([0, 1, -1, 0.5, 1e308, -1e308, 10**12, "", "\ud800", "a\r\nb"]),
)
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3),
    st.tuples(inner, inner)), max_leaves=8)
numbers = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0,
                   max_size=30)


def _outcome(call: Callable[[], Any], what: str) -> None:
    """Run ``call``: success or a typed confroute error, counted under ``what``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except ConfrouteError as exc:
            COUNTS[f"{what}: {type(exc).__name__}"] += 1
            return
    COUNTS[f"{what}: ok"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nfuzz outcomes ({EXAMPLES} examples per test):")
    for key, n in sorted(COUNTS.items()):
        print(f"  {n:6d}  {key}")


def _kwargs_strategy(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for ``cls``: each parameter absent, junk, or a plausible value."""
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    plausible = st.one_of(st.floats(0.0, 1.0), st.integers(1, 2000), junk)
    required = {p.name: plausible for p in params if p.default is p.empty}
    return st.fixed_dictionaries(required, optional={
        p.name: plausible for p in params if p.default is not p.empty})


@FUZZ
@given(estimator=st.one_of(st.sampled_from(["sequence_logprob", "verbalized", "nope"]), junk),
       calibrator=st.one_of(st.sampled_from(calibrator_registry.names()), junk),
       policy=st.one_of(st.sampled_from(policy_registry.names()), junk),
       edge=st.one_of(st.none(), junk), cloud=st.one_of(st.none(), junk),
       on_cloud_error=st.one_of(st.sampled_from(["degrade", "raise"]), junk),
       edge_max_new_tokens=st.one_of(st.integers(-5, 10**9), junk))
def test_router_constructor(**kwargs: Any) -> None:
    _outcome(lambda: Router(**kwargs), "Router()")


@FUZZ
@given(name=st.sampled_from(calibrator_registry.names()), data=st.data(),
       scores=numbers, labels=st.one_of(st.lists(st.sampled_from([0, 1, 2, -1, 0.5, None]),
                                                 max_size=30), junk))
def test_calibrator_fit_predict(name: str, data: st.DataObject, scores: list[float],
                                labels: Any) -> None:
    cls = calibrator_registry.get_class(name)
    kwargs = data.draw(_kwargs_strategy(cls))

    def run() -> None:
        cal = cls(**kwargs).fit(scores, labels)
        p = cal.predict_proba(np.asarray(scores, dtype=float))
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()

    _outcome(run, f"{name}.fit")


@FUZZ
@given(name=st.sampled_from(policy_registry.names()), data=st.data(), p=numbers,
       labels=st.lists(st.sampled_from([0, 1]), max_size=30))
def test_policy_fit_decide(name: str, data: st.DataObject, p: list[float],
                           labels: list[int]) -> None:
    cls = policy_registry.get_class(name)
    kwargs = data.draw(_kwargs_strategy(cls))

    def run() -> None:
        pol = cls(**kwargs)
        if name == "risk_control":
            pol.fit(p, labels)
        elif getattr(pol, "requires_fit", False):
            pol.fit(p)
        pol.decide(p)

    _outcome(run, f"{name}.fit/decide")


@FUZZ
@given(kwargs=_kwargs_strategy(GenerationConfig))
def test_generation_config(kwargs: dict[str, Any]) -> None:
    _outcome(lambda: GenerationConfig(**kwargs), "GenerationConfig()")


@pytest.fixture(scope="module")
def fitted() -> Router:
    return _fitted()


@FUZZ
@given(prompts=st.one_of(st.lists(st.text(max_size=8), max_size=3), junk),
       samples=st.one_of(st.none(), junk))
def test_decide_inputs(fitted: Router, prompts: Any, samples: Any) -> None:
    _outcome(lambda: fitted.decide(prompts, samples=samples), "Router.decide")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("fuzz") / "router.json"
    _fitted(policy=ThresholdPolicy(min_p_good=0.4)).save(path)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data(), value=junk)
def test_saved_router_json(saved: dict[str, Any], tmp_path: Path, data: st.DataObject,
                           value: Any) -> None:
    doc = json.loads(json.dumps(saved))
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if path[0] == "payload":  # re-sign as a forger would: the checks behind the checksum run
        target = _forge(tmp_path / "mutated.json", doc)
    else:
        target = tmp_path / "mutated.json"
        target.write_text(json.dumps(doc))
    _outcome(lambda: Router.load(target), "Router.load")


# ------------------------------------------------------------------ server (schemathesis)
@pytest.fixture(scope="module")
def served(tiny_llama: Any) -> Iterator[str]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from confroute.models.hf import HFLanguageModel
    from confroute.serve import create_app, serve_in_thread
    from tests.test_serve import EchoCloud, calibrated_router

    edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
    router = calibrated_router(edge, EchoCloud(), ThresholdPolicy(min_p_good=0.0))
    with serve_in_thread(create_app(router, max_prompt_chars=400)) as srv:
        yield srv.base_url.rsplit("/v1", 1)[0]


def test_served_openapi_schema_never_gives_a_5xx(served: str) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(served + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    for op in operations:
        _fuzz_operation(op, served)


def _fuzz_operation(op: Any, base_url: str) -> None:
    label = f"{op.method.upper()} {op.path}"

    @FUZZ
    @given(case=op.as_strategy())
    def call(case: Any) -> None:
        r = case.call(base_url=base_url, timeout=120)
        COUNTS[f"{label}: {r.status_code}"] += 1
        assert r.status_code < 500, (r.status_code, r.text[:300], case.body)

    call()
