"""The routing server's request model and observability endpoints over real loopback
HTTP: the pydantic ``ChatCompletionRequest`` (developer role, text content parts,
unknown fields, OpenAI-shaped 400s and never a 422), ``/openapi.json``,
``/metrics`` parsed as Prometheus text, ``/v1/models/{id}`` and the usage chunk."""

from __future__ import annotations

import hashlib
import json
import math

import httpx
import pytest

from confroute.policies import ThresholdPolicy

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prom_parser = pytest.importorskip("prometheus_client.parser")

from confroute.serve import create_app, serve_in_thread  # noqa: E402
from confroute.serve_schema import ChatCompletionRequest  # noqa: E402
from tests.test_serve import EchoCloud, RecordingEdge, Served, calibrated_router, set_mode  # noqa: E402

USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def served(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    edge = RecordingEdge(HFLanguageModel(*tiny_llama, use_chat_template=False))
    cloud = EchoCloud()
    router = calibrated_router(edge, cloud, ThresholdPolicy(min_p_good=0.0))
    app = create_app(router, model_name="routed", max_prompt_chars=200, max_messages=5)
    with serve_in_thread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0,
                               timeout=60)
        yield Served(srv, client, router, edge, cloud)
        client.close()


@pytest.fixture()
def server(served):
    set_mode(served.router, "edge")
    served.edge.prompts.clear()
    served.cloud.prompts.clear()
    return served


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in prom_parser.text_string_to_metric_families(text) for s in fam.samples}


def test_developer_role_text_parts_and_unknown_fields_are_accepted(server):
    srv, edge = server.srv, server.edge
    body = {
        "model": "routed",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "},
                                              {"type": "text", "text": "terse."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}],
             "name": "ann"},
        ],
        "max_completion_tokens": 8, "top_p": 0.9, "stop": "\n", "seed": 1, "user": "u-1",
        "metadata": {"team": "a"}, "stream": False, "stream_options": None,
        "response_format": {"type": "text"}, "logit_bias": {"50256": -100},  # unknown: kept
    }
    r = httpx.post(srv.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    routed = ({"role": "system", "content": "Be terse."},
              {"role": "user", "content": "What is 2 + 2?"})
    assert edge.prompts == [routed]  # parts concatenated, developer routed as system
    info = r.json()["confroute"]
    sent = json.dumps(list(routed), ensure_ascii=False)
    assert info["prompt_hash"] == hashlib.sha256(sent.encode()).hexdigest()[:16]
    parsed = ChatCompletionRequest.model_validate(body)
    assert parsed.model_extra == {"logit_bias": {"50256": -100}}  # unknown: forwarded
    assert parsed.response_format == {"type": "text"} and parsed.forced is None


def test_tool_messages_reach_the_router(server):
    client, edge = server.client, server.edge
    conv = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "Let me check."},
            {"role": "tool", "content": "4", "tool_call_id": "call-1"}]
    client.chat.completions.create(model="routed", messages=conv)  # type: ignore[arg-type]
    assert edge.prompts == [tuple({"role": m["role"], "content": m["content"]} for m in conv)]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [USER], "stream_options": 3}, "stream_options", "invalid_type"),
        ({"messages": [USER], "stream_options": {"include_usage": "y"}},
         "stream_options.include_usage", "invalid_type"),
        ({"messages": [USER], "metadata": {"a": 1}}, "metadata.a", "invalid_value"),
        ({"messages": [USER], "temperature": True}, "temperature", "invalid_value"),
        ({"messages": [USER], "max_tokens": 1.5}, "max_tokens", "invalid_value"),
        ({"messages": [USER], "seed": -1}, "seed", "invalid_value"),
        ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"messages": [USER], "user": 5}, "user", "invalid_type"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content", "invalid_type"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content",
         "invalid_type"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
         "messages[0].content", "unsupported_content"),
        ({"messages": [USER], "top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"messages": [USER], "top_logprobs": 21, "logprobs": True}, "top_logprobs",
         "invalid_value"),
        ({"messages": [USER], "tool_choice": "sometimes"}, "tool_choice", "invalid_type"),
        ({"messages": [USER], "response_format": {"schema": {}}}, "response_format",
         "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 150},
                                                    {"type": "text", "text": "y" * 51}]}]},
         "messages", "prompt_too_long"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
        (None, None, "invalid_body"),
        ("hi", None, "invalid_body"),
    ],
)
def test_every_invalid_body_is_an_openai_400_never_a_422(server, body, param, code):
    r = httpx.post(server.srv.base_url + "/chat/completions", json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert param is None or f"'{param}'" in err["message"]


def test_openapi_shows_the_request_model(server):
    schema = httpx.get(server.srv.url + "/openapi.json", timeout=10).json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ChatCompletionRequest")
    comps = schema["components"]["schemas"]
    request = comps["ChatCompletionRequest"]
    assert request["required"] == ["messages"]
    assert {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "n", "stream", "stream_options", "stop", "seed", "user", "metadata"} <= set(
        request["properties"])
    assert set(comps["ChatMessage"]["properties"]["role"]["enum"]) == {
        "developer", "system", "user", "assistant", "tool"}


def test_metrics_count_requests_by_source_and_time_them(server):
    srv, client, router = server.srv, server.client, server.router
    before = _metrics(srv.url)
    client.chat.completions.create(model="routed", messages=[USER])  # type: ignore[list-item]
    set_mode(router, "cloud")
    client.chat.completions.create(model="routed", messages=[USER])  # type: ignore[list-item]
    httpx.post(srv.base_url + "/chat/completions", json={"messages": []}, timeout=10)
    after = _metrics(srv.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("confroute_requests_total", source="edge") == 1
    assert delta("confroute_requests_total", source="cloud") == 1
    assert delta("confroute_requests_total", source="degraded") == 0
    assert delta("confroute_requests_total", source="error") == 0
    assert delta("confroute_invalid_requests_total") == 1
    assert delta("confroute_request_latency_seconds_count", source="cloud") == 1
    assert delta("confroute_request_latency_seconds_sum", source="edge") > 0
    # a threshold policy keeps no ledger: its gauges are NaN, /health says so too
    assert all(math.isnan(after[(f"confroute_ledger_{k}", ())])
               for k in ("requests", "cloud", "spent", "budget", "allowance"))
    health = httpx.get(srv.url + "/health", timeout=10).json()
    assert health["enforced"] is False and health["ledger"] is None


def test_metrics_registries_are_per_app(server):
    from prometheus_client import REGISTRY

    first, second = create_app(server.router), create_app(server.router)
    assert first.state.registry is not second.state.registry

    assert "confroute_requests" not in {m.name for m in REGISTRY.collect()}


def test_model_by_id(server):
    srv, client = server.srv, server.client
    assert client.models.retrieve("routed").id == "routed"
    r = httpx.get(srv.base_url + "/models/gpt-4o", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "'routed'" in r.json()["error"]["message"]


def test_stream_include_usage_ends_with_a_usage_chunk(server):
    client, router = server.client, server.router
    set_mode(router, "cloud")
    chunks = list(client.chat.completions.create(
        model="routed", messages=[USER], stream=True,  # type: ignore[list-item]
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.total_tokens) == (5, 3, 8)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "cloud: hi"
    plain = list(client.chat.completions.create(
        model="routed", messages=[USER], stream=True))  # type: ignore[list-item]
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "stop"
