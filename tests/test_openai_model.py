"""OpenAIModel against a real fault-injecting HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confroute.errors import CloudError, InvalidParameterError, InvalidTypeError
from confroute.models.base import LanguageModel
from confroute.models.openai import OpenAIModel, approximate_entropy
from confroute.models.openai.retry import retry_after
from confroute.types import GenerationConfig, Sample
from tests.fault_server import DEFAULT_PROBS, FaultServer, Step

KEY = "sk-test-0123456789abcdefSECRET"
GREEDY = GenerationConfig(max_new_tokens=16)
SAMPLING = GenerationConfig(max_new_tokens=16, temperature=0.8, n=3, seed=11)


def fast_model(srv: FaultServer, **kw: object) -> OpenAIModel:
    params: dict[str, object] = dict(
        base_url=srv.base_url,
        api_key=KEY,
        timeout=0.3,
        max_retries=4,
        backoff_base=0.01,
        backoff_max=0.05,
        max_retry_time=5.0,
        seed=0,
    )
    params.update(kw)
    return OpenAIModel("test-model", **params)  # type: ignore[arg-type]


def expected_entropy(k: int) -> float:
    p = np.array(DEFAULT_PROBS[:k])
    tail = 1.0 - p.sum()
    return float(-(p * np.log(p)).sum() - tail * math.log(tail))


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("top_logprobs", [1, 3, 5])
def test_chat_success_parses_logprobs_and_approximates_entropy(
    server: FaultServer, top_logprobs: int
) -> None:
    with fast_model(server, top_logprobs=top_logprobs) as model:
        [[sample]] = model.generate(["What is the answer?"], GREEDY)
    assert sample.text == "The answer is 0"
    assert sample.finish_reason == "stop"
    assert sample.prompt_tokens == 4
    assert sample.token_logprobs is not None and sample.token_entropies is not None
    np.testing.assert_allclose(sample.token_logprobs, np.full(4, math.log(0.6)))
    np.testing.assert_allclose(sample.token_entropies, np.full(4, expected_entropy(top_logprobs)))
    body = server.requests[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == top_logprobs


def test_logprobs_off_leaves_statistics_empty(server: FaultServer) -> None:
    with fast_model(server, logprobs=False) as model:
        [[sample]] = model.generate(["hi"], GREEDY)
    assert sample.token_logprobs is None and sample.token_entropies is None
    assert "logprobs" not in server.requests[0].body


def test_top_logprobs_zero_gives_logprobs_without_entropies(server: FaultServer) -> None:
    with fast_model(server, top_logprobs=0) as model:
        [[sample]] = model.generate(["hi"], GREEDY)
    assert sample.token_logprobs is not None and sample.token_entropies is None


def test_approximate_entropy_is_exact_for_a_full_distribution() -> None:
    p = np.array([0.5, 0.25, 0.125, 0.125])
    assert approximate_entropy(np.log(p)) == pytest.approx(float(-(p * np.log(p)).sum()))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.01, 10.0), min_size=2, max_size=30),
    st.integers(1, 30),
)
def test_approximate_entropy_is_a_lower_bound_of_the_true_entropy(
    weights: list[float], k: int
) -> None:
    p = np.sort(np.array(weights) / np.sum(weights))[::-1]
    true_h = float(-(p * np.log(p)).sum())
    approx = approximate_entropy(np.log(p[:k]))
    assert 0.0 <= approx <= true_h + 1e-9


def test_n_samples_come_from_one_request(server: FaultServer) -> None:
    with fast_model(server) as model:
        [samples] = model.generate(["q"], SAMPLING)
    assert [s.text for s in samples] == ["The answer is 0", "The answer is 1", "The answer is 2"]
    assert len(server.requests) == 1 and server.requests[0].body["n"] == 3


def test_string_prompt_gets_system_prompt_and_conversation_is_sent_as_is(
    server: FaultServer,
) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    with fast_model(server, system_prompt="You are terse.") as model:
        out = model.generate(["hello", conversation], GREEDY)
    assert len(out) == 2
    bodies = sorted((r.body for r in server.requests), key=lambda b: len(b["messages"]))
    assert bodies[0]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"},
    ]
    assert bodies[1]["messages"] == conversation


def test_generation_parameters_are_sent(server: FaultServer) -> None:
    config = GenerationConfig(
        max_new_tokens=7, temperature=0.7, top_p=0.9, n=2, seed=5, stop=("\n\n", "###")
    )
    with fast_model(server, extra_body={"top_k": 20, "repetition_penalty": 1.1}) as model:
        model.generate(["q"], config)
    body = server.requests[0].body
    assert body["model"] == "test-model"
    assert body["max_tokens"] == 7
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["n"] == 2 and body["seed"] == 5
    assert body["stop"] == ["\n\n", "###"]
    assert body["top_k"] == 20 and body["repetition_penalty"] == 1.1


def test_top_k_without_extra_body_warns_and_is_not_sent(server: FaultServer) -> None:
    with fast_model(server) as model, pytest.warns(UserWarning, match="extra_body"):
        model.generate(["q"], GenerationConfig(temperature=1.0, top_k=5))
    assert "top_k" not in server.requests[0].body


def test_length_finish_reason(server: FaultServer) -> None:
    with fast_model(server) as model:
        [[sample]] = model.generate(["q"], GenerationConfig(max_new_tokens=2))
    assert sample.text == "The answer"
    assert sample.finish_reason == "length"
    assert sample.n_tokens == 2


def test_completions_endpoint(server: FaultServer) -> None:
    with fast_model(server, endpoint="completions", system_prompt="Sys.") as model:
        [samples] = model.generate(["Complete this"], SAMPLING)
    assert [s.text for s in samples] == ["The answer is 0", "The answer is 1", "The answer is 2"]
    assert samples[0].token_entropies is not None
    np.testing.assert_allclose(samples[0].token_entropies, np.full(4, expected_entropy(5)))
    req = server.requests[0]
    assert req.path == "/v1/completions"
    assert req.body["prompt"] == "Sys.\n\nComplete this"
    assert req.body["logprobs"] == 5 and "messages" not in req.body


def test_completions_endpoint_refuses_conversations(server: FaultServer) -> None:
    with (
        fast_model(server, endpoint="completions") as model,
        pytest.raises(InvalidParameterError, match="endpoint='chat'"),
    ):
        model.generate([[{"role": "user", "content": "hi"}]], GREEDY)
    assert server.requests == []


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("script", "attempts"),
    [
        (["500", "503"], 3),
        (["500", "503", "500"], 4),
        (["reset"], 2),
        (["partial"], 2),
        (["truncated"], 2),
        (["malformed", "truncated"], 3),
        ([Step("sleep", sleep=0.6)], 2),
        (["429"], 2),
    ],
)
def test_scripted_faults_recover(script: list[str | Step], attempts: int) -> None:
    with FaultServer(script) as srv, fast_model(srv) as model:
        [[sample]] = model.generate(["q"], GREEDY)
        assert sample.text == "The answer is 0"
        assert len(srv.requests) == attempts
        assert model.usage["requests"] == attempts
        assert model.usage["retries"] == attempts - 1
        assert model.usage["failures"] == 0


def test_retry_after_is_honoured() -> None:
    with (
        FaultServer([Step("429", retry_after="0.25")]) as srv,
        fast_model(srv, backoff_base=0.0, backoff_max=1.0) as model,
    ):
        t0 = time.monotonic()
        model.generate(["q"], GREEDY)
        elapsed = time.monotonic() - t0
        gap = srv.requests[1].time - srv.requests[0].time
    assert elapsed >= 0.25 and gap >= 0.25


def test_retry_after_is_capped_by_backoff_max() -> None:
    with (
        FaultServer([Step("429", retry_after="30")]) as srv,
        fast_model(srv, backoff_max=0.1) as model,
    ):
        t0 = time.monotonic()
        model.generate(["q"], GREEDY)
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"retry-after": "1.5"}, 1.5, 1.5),
        ({"retry-after-ms": "250"}, 0.25, 0.25),
        ({"retry-after": "garbage"}, None, None),
        ({}, None, None),
    ],
)
def test_retry_after_header_forms(
    headers: dict[str, str], low: float | None, high: float | None
) -> None:
    value = retry_after(headers)
    if low is None or high is None:
        assert value is None
    else:
        assert value is not None and low <= value <= high


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    value = retry_after({"retry-after": when})
    assert value is not None and 1.0 <= value <= 3.5


@pytest.mark.parametrize(
    ("step", "reason", "status"),
    [
        ("500", "http_500", 500),
        ("503", "http_503", 503),
        ("429", "http_429", 429),
        ("reset", "connection", None),
        ("malformed", "malformed_response", 200),
        ("truncated", "malformed_response", 200),
        (Step("sleep", sleep=0.5), "timeout", None),
    ],
)
def test_exhausted_retries_raise_cloud_error(
    step: str | Step, reason: str, status: int | None
) -> None:
    with FaultServer([step] * 3) as srv, fast_model(srv, max_retries=2) as model:
        with pytest.raises(CloudError, match=r"after 3 attempt") as info:
            model.generate(["q"], GREEDY)
        assert info.value.reason == reason
        assert info.value.status == status
        assert info.value.attempts == 3
        assert len(srv.requests) == 3
        assert model.usage["failures"] == 1 and model.usage["retries"] == 2


def test_client_error_is_not_retried() -> None:
    with FaultServer(["400"]) as srv, fast_model(srv) as model:
        with pytest.raises(CloudError, match=r"not retryable\): scripted 400") as info:
            model.generate(["q"], GREEDY)
        assert (info.value.reason, info.value.status, info.value.attempts) == ("http_400", 400, 1)
        assert len(srv.requests) == 1


@pytest.mark.parametrize("step", ["500", Step("sleep", sleep=1.0)])
def test_max_retry_time_bounds_total_time(step: str | Step) -> None:
    with (
        FaultServer([step] * 200) as srv,
        fast_model(
            srv, max_retries=1000, backoff_base=0.05, backoff_max=0.1, max_retry_time=0.8
        ) as model,
    ):
        t0 = time.monotonic()
        with pytest.raises(CloudError, match=r"max_retry_time=0\.8s exhausted"):
            model.generate(["q"], GREEDY)
        elapsed = time.monotonic() - t0
    # First attempt gets the full timeout (0.3 s); retries never run past 0.8 s after it.
    assert elapsed < 0.8 + 0.3 + 0.3


def test_server_ignoring_n_is_topped_up() -> None:
    with FaultServer(ignore_n=True) as srv, fast_model(srv) as model:
        [samples] = model.generate(["q"], SAMPLING)
        assert len(samples) == 3
        bodies = [r.body for r in srv.requests]
    assert [b["n"] for b in bodies] == [3, 2, 1]
    # Distinct seeds, so the top-up draws are not copies of the first one.
    assert [b["seed"] for b in bodies] == [11, 12, 13]


def test_single_ignore_n_step_is_topped_up() -> None:
    with FaultServer(["ignore_n"]) as srv, fast_model(srv) as model:
        [samples] = model.generate(["q"], SAMPLING)
        assert [r.body["n"] for r in srv.requests] == [3, 2]
    assert [s.text for s in samples] == ["The answer is 0", "The answer is 0", "The answer is 1"]


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_is_bounded(limit: int) -> None:
    with FaultServer(latency=0.08) as srv, fast_model(srv, max_concurrency=limit) as model:
        out = model.generate([f"prompt {i}" for i in range(8)], GREEDY)
        assert len(out) == 8
        assert srv.max_in_flight <= limit
        assert srv.max_in_flight >= min(limit, 2)


def test_concurrency_is_bounded_across_threads() -> None:
    with FaultServer(latency=0.08) as srv, fast_model(srv, max_concurrency=2) as model:
        threads = [
            threading.Thread(target=model.generate, args=([f"p{i}{j}" for j in range(3)], GREEDY))
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(srv.requests) == 9
        assert srv.max_in_flight <= 2


def test_results_keep_prompt_order(server: FaultServer) -> None:
    with fast_model(server) as model:
        prompts = [f"prompt number {i}" + " word" * i for i in range(6)]
        out = model.generate(prompts, GREEDY)
    assert [o[0].prompt_tokens for o in out] == [3 + i for i in range(6)]


# --------------------------------------------------------------------------- async


def test_async_matches_sync(server: FaultServer) -> None:
    prompts = ["a b", "c d e"]
    with fast_model(server) as model:
        sync_out = model.generate(prompts, SAMPLING)

    async def run() -> list[list[Sample]]:
        async with fast_model(server) as amodel:
            return await amodel.agenerate(prompts, SAMPLING)

    async_out = asyncio.run(run())
    for s_list, a_list in zip(sync_out, async_out):
        assert [s.text for s in s_list] == [a.text for a in a_list]
        for s, a in zip(s_list, a_list):
            np.testing.assert_array_equal(s.token_logprobs, a.token_logprobs)
            np.testing.assert_array_equal(s.token_entropies, a.token_entropies)
            assert s.prompt_tokens == a.prompt_tokens


def test_async_retries_and_bounds_concurrency() -> None:
    with FaultServer(["500", "reset"], latency=0.05) as srv:
        model = fast_model(srv, max_concurrency=2)
        out = asyncio.run(model.agenerate([f"p{i}" for i in range(6)], GREEDY))
        assert len(out) == 6
        assert srv.max_in_flight <= 2
        assert model.usage["retries"] == 2 and model.usage["requests"] == 8
        # A second event loop gets its own client.
        assert len(asyncio.run(model.agenerate(["again"], GREEDY))) == 1
        model.close()


def test_async_exhausted_retries_raise_cloud_error() -> None:
    with FaultServer(["503"] * 3) as srv:
        model = fast_model(srv, max_retries=2)
        with pytest.raises(CloudError, match="503") as info:
            asyncio.run(model.agenerate(["q"], GREEDY))
        assert (info.value.reason, info.value.attempts) == ("http_503", 3)


# --------------------------------------------------------------------------- API key


def test_api_key_is_sent_but_never_exposed(
    server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.push("500", "ok", "400")
    model = fast_model(server)
    model.generate(["q"], GREEDY)
    with pytest.raises(CloudError) as info:
        model.generate(["q"], GREEDY)
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(model)
    assert KEY not in str(model.get_params())
    assert model.get_params()["api_key"] is None
    assert KEY not in str(pickle.dumps(model))
    assert KEY not in str(info.value)
    assert caplog.records, "expected debug logs from the retry"
    assert KEY not in caplog.text
    assert all(KEY not in str(r.__dict__) for r in caplog.records)
    # A pickled copy has no key; it falls back to the environment (unset here).
    copy = pickle.loads(pickle.dumps(model))
    copy.api_key_env = None
    copy.generate(["q"], GREEDY)
    assert "Authorization" not in server.requests[-1].headers
    model.close()


def test_api_key_from_environment(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFROUTE_TEST_KEY", "sk-from-env")
    model = fast_model(server, api_key=None, api_key_env="CONFROUTE_TEST_KEY")
    model.generate(["q"], GREEDY)
    assert server.requests[0].headers["Authorization"] == "Bearer sk-from-env"
    assert "sk-from-env" not in repr(model) + str(model.get_params())
    model.close()


def test_sklearn_clone_keeps_key_in_memory_only(server: FaultServer) -> None:
    sklearn_base = pytest.importorskip("sklearn.base")
    model = fast_model(server, api_key_env=None)
    twin = sklearn_base.clone(model)
    assert twin is not model and twin.get_params() == model.get_params()
    twin.generate(["q"], GREEDY)
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    twin.close()


def test_wrong_key_type_error_does_not_echo_the_value(server: FaultServer) -> None:
    model = fast_model(server, api_key=12345678901)
    with pytest.raises(InvalidTypeError, match="type int") as info:
        model.generate(["q"], GREEDY)
    assert "12345678901" not in str(info.value)


# --------------------------------------------------------------------------- usage and cost


def test_usage_and_cost(server: FaultServer) -> None:
    server.push("500")
    table = {"prompt": 2.0, "completion": 10.0}
    with fast_model(server, price_table=table) as model:
        out = model.generate(["one two three", "four five"], SAMPLING)
        usage = model.usage
        assert usage == {
            "requests": 3,
            "prompt_tokens": 5,
            "completion_tokens": 24,
            "failures": 0,
            "retries": 1,
        }
        expected = (5 * 2.0 + 24 * 10.0) / 1e6
        assert model.cost_of(out) == pytest.approx(expected)
        # The prompt is billed once per request, split over its choices.
        assert model.cost_of(out[0][0]) == pytest.approx((3 / 3 * 2.0 + 4 * 10.0) / 1e6)
        model.reset_usage()
        assert set(model.usage.values()) == {0}


def test_cost_without_logprobs_uses_reported_usage(server: FaultServer) -> None:
    with fast_model(
        server, logprobs=False, price_table={"prompt": 1.0, "completion": 1.0}
    ) as model:
        out = model.generate(["a b c"], SAMPLING)
        assert all(s.token_logprobs is None for s in out[0])
        assert model.cost_of(out) == pytest.approx((3 + 12) / 1e6)


def test_cost_is_zero_without_price_table(server: FaultServer) -> None:
    with fast_model(server) as model:
        assert model.cost_of(model.generate(["q"], GREEDY)) == 0.0


# --------------------------------------------------------------------------- validation, lifecycle


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"timeout": 0.0}, r"'timeout' parameter of OpenAIModel must be a float in \(0"),
        ({"endpoint": "embeddings"}, "'endpoint' parameter of OpenAIModel must be one of"),
        ({"top_logprobs": 25}, "'top_logprobs' parameter of OpenAIModel must be an int"),
        ({"max_concurrency": 0}, "'max_concurrency' parameter"),
        ({"max_retries": -1}, "'max_retries' parameter"),
        ({"base_url": "localhost:8000"}, "'base_url' parameter of OpenAIModel must be an http"),
        ({"price_table": {"prompt": 1.0}}, "'price_table' parameter"),
        ({"price_table": {"prompt": -1.0, "completion": 1.0}}, "'price_table' parameter"),
    ],
)
def test_invalid_parameters_fail_at_first_use(
    server: FaultServer, params: dict[str, Any], match: str
) -> None:
    model = fast_model(server, **params)  # construction only stores
    with pytest.raises(InvalidParameterError, match=match):
        model.generate(["q"], GREEDY)
    assert server.requests == []


def test_bad_inputs(server: FaultServer) -> None:
    with fast_model(server) as model:
        with pytest.raises(InvalidTypeError, match="wrap a single prompt in a list"):
            model.generate("q", GREEDY)
        with pytest.raises(InvalidTypeError, match="'config' parameter"):
            model.generate(["q"], {"n": 1})  # type: ignore[arg-type]


def test_protocol_name_and_lifecycle(server: FaultServer) -> None:
    model = fast_model(server, name="cloud")
    assert isinstance(model, LanguageModel)
    assert model.name == "cloud" and fast_model(server).name == "test-model"
    assert server.requests == []  # nothing sent at construction
    model.generate(["q"], GREEDY)
    model.close()
    model.generate(["q"], GREEDY)  # reconnects on demand
    model.close()
    assert len(server.requests) == 2


def test_client_pool_opens_lazily_and_closes(server: FaultServer) -> None:
    from confroute.models.openai.client import ClientPool
    from confroute.models.openai.retry import RetryState
    from confroute.models.openai.wire import Settings

    s = Settings(
        model="test-model", url=server.base_url + "/chat/completions", endpoint="chat",
        timeout=5.0, max_retries=0, backoff_base=0.0, backoff_max=0.0, max_retry_time=5.0,
        max_concurrency=2, logprobs=False, top_logprobs=0, system_prompt=None, extra_body={},
        api_key=None,
    )
    pool = ClientPool()
    assert not pool.is_open
    counts: list[dict[str, int]] = []
    state = RetryState(s, jitter=lambda cap: 0.0, count=lambda **c: counts.append(c),
                       redact=str)
    body = {"model": s.model, "messages": [{"role": "user", "content": "q"}], "max_tokens": 2}
    parsed = pool.post(s, body, state, lambda **c: counts.append(c))
    assert pool.is_open and len(parsed.choices) == 1 and counts == [{"requests": 1}]
    client, _ = pool.sync_client(s)
    assert pool.sync_client(s)[0] is client  # one client, reused
    pool.close()
    assert not pool.is_open and client.is_closed


def test_import_is_light_and_missing_httpx_is_reported() -> None:
    code = (
        "import sys\n"
        "from confroute.models.openai import OpenAIModel\n"
        "from confroute.types import GenerationConfig, Sample\n"
        "assert 'httpx' not in sys.modules, 'httpx imported eagerly'\n"
        "m = OpenAIModel('x', base_url='http://127.0.0.1:9/v1')\n"
        "assert 'httpx' not in sys.modules\n"
        "sys.modules['httpx'] = None\n"
        "try:\n"
        "    m.generate(['q'], GenerationConfig())\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MissingDependencyError")
    assert 'pip install "confroute[http]"' in proc.stdout


def test_extra_body_n_one_splits_draws_over_requests(server: FaultServer) -> None:
    # The workaround for servers that reject n > 1 (llama.cpp's llama-server).
    with fast_model(server, extra_body={"n": 1}) as model:
        [samples] = model.generate(["q"], SAMPLING)
    assert len(samples) == 3
    assert [(r.body["n"], r.body["seed"]) for r in server.requests] == [(1, 11), (1, 12), (1, 13)]


def test_changed_max_concurrency_takes_effect() -> None:
    with FaultServer(latency=0.05) as srv:
        model = fast_model(srv, max_concurrency=4)
        model.generate(["warm up"], GREEDY)
        model.set_params(max_concurrency=1)
        model.generate([f"p{i}" for i in range(4)], GREEDY)
        assert srv.max_in_flight == 1
        model.close()
