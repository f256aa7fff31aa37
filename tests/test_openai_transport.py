"""OpenAIModel's transport is the official openai SDK, under confroute's retry policy.

Every test talks real HTTP to the fault-injecting loopback server; the SDK is
recognised by the headers it adds to each request (``User-Agent: OpenAI/Python``,
``X-Stainless-*``), which a direct httpx call never sends.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from confroute.errors import CloudError
from confroute.models.openai import OpenAIModel
from confroute.types import GenerationConfig
from tests.fault_server import FaultServer, Step

openai = pytest.importorskip("openai")

KEY = "sk-transport-test-SECRET"
GREEDY = GenerationConfig(max_new_tokens=16)


def model_for(srv: FaultServer, **kw: object) -> OpenAIModel:
    params: dict[str, object] = dict(
        base_url=srv.base_url, api_key=KEY, timeout=2.0, max_retries=3,
        backoff_base=0.0, backoff_max=5.0, max_retry_time=10.0, seed=0,
    )
    params.update(kw)
    return OpenAIModel("test-model", **params)  # type: ignore[arg-type]


def test_the_sdk_sends_the_request_with_the_body_built_by_confroute() -> None:
    extra = {"top_k": 20, "vendor_field": {"nested": [1, 2]}}
    with FaultServer() as srv, model_for(srv, extra_body=extra,
                                         headers={"X-Team": "research"}) as model:
        [[sample]] = model.generate(["q"], GREEDY)
    [req] = srv.requests
    assert req.headers["User-Agent"] == f"OpenAI/Python {openai.__version__}"
    assert req.headers["X-Stainless-Lang"] == "python"
    assert req.headers["X-Stainless-Async"] == "false"
    assert req.headers["X-Stainless-Retry-Count"] == "0"
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["X-Team"] == "research"
    # Unknown fields reach the server untouched; logprobs are still parsed here.
    assert req.body["top_k"] == 20 and req.body["vendor_field"] == {"nested": [1, 2]}
    assert req.body["logprobs"] is True and req.body["top_logprobs"] == 5
    assert sample.text == "The answer is 0" and sample.token_entropies is not None


def test_async_requests_go_through_the_async_sdk_client() -> None:
    async def run(model: OpenAIModel) -> None:
        async with model:
            await model.agenerate(["a", "b"], GREEDY)

    with FaultServer([Step("429", retry_after_ms="200")]) as srv:
        model = model_for(srv)
        asyncio.run(run(model))
    assert len(srv.requests) == 3  # one 429, retried by confroute, and one more prompt
    assert all(r.headers["X-Stainless-Async"].startswith("async:") for r in srv.requests)
    assert {r.headers["X-Stainless-Retry-Count"] for r in srv.requests} == {"0"}
    assert model.usage["retries"] == 1 and model.usage["requests"] == 3


def test_retry_after_ms_is_honoured_by_confroute_not_the_sdk() -> None:
    with FaultServer([Step("429", retry_after_ms="400")]) as srv, model_for(srv) as model:
        model.generate(["q"], GREEDY)
        first, second = srv.requests
    assert len(srv.requests) == 2
    assert second.time - first.time >= 0.4
    # Both attempts are first attempts for the SDK: its own retries are off.
    assert [r.headers["X-Stainless-Retry-Count"] for r in srv.requests] == ["0", "0"]
    assert model.usage == {"requests": 2, "prompt_tokens": 1, "completion_tokens": 4,
                           "failures": 0, "retries": 1}


@pytest.mark.parametrize(("step", "reason"), [("400", "http_400"), ("503", "http_503")])
def test_the_sdk_never_retries_on_its_own(step: str, reason: str) -> None:
    # max_retries=0 here: the SDK's default (2 retries) would send 3 requests for a 503.
    with (
        FaultServer([step]) as srv,
        model_for(srv, max_retries=0) as model,
        pytest.raises(CloudError) as info,
    ):
        model.generate(["q"], GREEDY)
    assert len(srv.requests) == 1
    assert info.value.reason == reason and info.value.attempts == 1


def test_a_400_is_not_retried() -> None:
    with (
        FaultServer(["400"]) as srv,
        model_for(srv) as model,
        pytest.raises(CloudError, match="not retryable") as info,
    ):
        model.generate(["q"], GREEDY)
    assert len(srv.requests) == 1 and srv.remaining_steps == 0
    assert info.value.status == 400 and "scripted 400" in str(info.value)
    assert KEY not in str(info.value)


def test_a_deadline_shorter_than_retry_after_gives_up_at_once() -> None:
    with (
        FaultServer([Step("429", retry_after="5")]) as srv,
        model_for(srv, backoff_max=10.0, max_retry_time=1.0) as model,
    ):
        start = time.monotonic()
        with pytest.raises(CloudError, match=r"max_retry_time=1s exhausted") as info:
            model.generate(["q"], GREEDY)
        elapsed = time.monotonic() - start
    assert len(srv.requests) == 1 and elapsed < 1.0  # no sleep that could not pay off
    assert info.value.reason == "http_429" and info.value.status == 429


def test_a_retry_after_beyond_the_sdk_cap_is_honoured_up_to_backoff_max() -> None:
    # The SDK would not retry at all after "Retry-After: 600"; confroute waits
    # backoff_max (here 0.3 s) and tries again within its deadline.
    with (
        FaultServer([Step("429", retry_after="600")]) as srv,
        model_for(srv, backoff_max=0.3, max_retry_time=5.0) as model,
    ):
        model.generate(["q"], GREEDY)
        first, second = srv.requests
    assert second.time - first.time >= 0.3


def test_a_timeout_stays_a_timeout() -> None:
    with (
        FaultServer([Step("sleep", sleep=1.5)]) as srv,
        model_for(srv, timeout=0.2, max_retries=0) as model,
        pytest.raises(CloudError) as info,
    ):
        model.generate(["q"], GREEDY)
    assert info.value.reason == "timeout" and info.value.status is None


def test_a_refused_connection_stays_a_connection_failure() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = OpenAIModel("m", base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                        max_retries=1, backoff_base=0.0, timeout=2.0)
    with pytest.raises(CloudError) as info:
        model.generate(["q"], GREEDY)
    model.close()
    assert info.value.reason == "connection" and info.value.attempts == 2
    assert "ConnectError" in str(info.value)


@pytest.mark.parametrize(("step", "reason"), [("reset", "connection"),
                                              ("malformed", "malformed_response")])
def test_broken_responses_keep_their_reasons(step: str, reason: str) -> None:
    with (
        FaultServer([step]) as srv,
        model_for(srv, max_retries=0) as model,
        pytest.raises(CloudError) as info,
    ):
        model.generate(["q"], GREEDY)
    assert info.value.reason == reason


def test_no_key_means_no_authorization_and_no_sdk_environment_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-from-environment")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-from-environment")
    # The SDK reads these too; with api_key_env=None confroute sends no key at all.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-environment-SECRET")
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-environment-SECRET")
    with FaultServer() as srv:
        with model_for(srv, api_key=None, api_key_env=None) as model:
            model.generate(["q"], GREEDY)
        with model_for(srv, headers={"OpenAI-Organization": "org-chosen"}) as model:
            model.generate(["q"], GREEDY)
    keyless, chosen = srv.requests
    assert "Authorization" not in keyless.headers
    assert not any("SECRET" in v for v in keyless.headers.values())
    assert "OpenAI-Organization" not in keyless.headers
    assert "OpenAI-Project" not in keyless.headers
    assert chosen.headers["OpenAI-Organization"] == "org-chosen"


def test_credentials_in_the_url_travel_as_basic_auth() -> None:
    with FaultServer() as srv:
        url = srv.base_url.replace("http://", "http://user:pa%40ss@")
        with model_for(srv, base_url=url) as model:
            model.generate(["q"], GREEDY)
    [req] = srv.requests
    assert req.headers["Authorization"] == "Basic dXNlcjpwYUBzcw=="  # user:pa@ss
    assert "pa@ss" not in repr(model)


def test_the_pool_keeps_one_sdk_client_without_retries_per_settings() -> None:
    import dataclasses

    import httpx

    from confroute.models.openai.client import ClientPool
    from confroute.models.openai.wire import Settings

    s = Settings(
        model="m", url="http://127.0.0.1:9/v1/chat/completions", endpoint="chat",
        timeout=7.0, max_retries=0, backoff_base=0.0, backoff_max=0.0, max_retry_time=1.0,
        max_concurrency=3, logprobs=False, top_logprobs=0, system_prompt=None,
        extra_body={}, api_key=None,
    )
    pool = ClientPool()
    conn, _ = pool.sync_client(s)
    assert isinstance(conn.sdk, openai.OpenAI) and isinstance(conn.http, httpx.Client)
    assert conn.sdk.max_retries == 0 and conn.sdk.timeout == 7.0
    assert str(conn.sdk.base_url) == "http://127.0.0.1:9/v1/"
    assert pool.sync_client(s)[0] is conn
    moved = dataclasses.replace(s, url="http://127.0.0.1:8/v1/chat/completions")
    fresh, _ = pool.sync_client(moved)
    assert fresh is not conn and str(fresh.sdk.base_url) == "http://127.0.0.1:8/v1/"
    pool.close()
    assert fresh.is_closed and not pool.is_open


def test_missing_openai_package_names_the_extra() -> None:
    code = (
        "import sys\n"
        "from confroute.models.openai import OpenAIModel\n"
        "from confroute.types import GenerationConfig\n"
        "assert 'openai' not in sys.modules, 'openai imported eagerly'\n"
        "sys.modules['openai'] = None\n"
        "try:\n"
        "    m = OpenAIModel('x', base_url='http://127.0.0.1:9/v1')\n"
        "    m.generate(['q'], GenerationConfig())\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MissingDependencyError")
    assert "openai" in proc.stdout and 'pip install "confroute[http]"' in proc.stdout
