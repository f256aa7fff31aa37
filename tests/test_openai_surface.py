"""Acceptance test of the OpenAI surface of ``confroute serve`` (issue 14, item 3).

A real routing app on 127.0.0.1 (uvicorn in a thread) with a tiny real edge model,
driven by the official ``openai`` client, escalating over real HTTP
(``OpenAIModel``) to a loopback cloud: a ThreadingHTTPServer that records every
body it receives and answers a tool call when given tools, a JSON object for a
JSON ``response_format``, and honours ``max_tokens`` with ``finish_reason:
"length"``. Also: the forced-escalation rule under a budget that refuses, and the
entropy provenance of samples from both back-ends.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest

from confroute import GenerationConfig, Router
from confroute.estimators.logprob import MeanTokenEntropy
from confroute.models import OpenAIModel
from confroute.policies import ThresholdPolicy

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from confroute.serve import RunningServer, create_app, serve_in_thread  # noqa: E402
from tests.test_serve import calibrated_router, set_mode  # noqa: E402

WORDS = ["The", " cloud", " answers", " in", " six", " words"]
TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}},
          "required": ["answer"], "additionalProperties": False}
JSON_FORMAT = {"type": "json_schema",
               "json_schema": {"name": "sum", "schema": SCHEMA, "strict": True}}
USER = {"role": "user", "content": "What is 2 + 2?"}


# ------------------------------------------------------------------ loopback cloud
def _logprobs(tokens: list[str], top: int) -> dict[str, Any]:
    """The chosen token at -0.25 and ``top - 1`` alternatives (none when ``top`` is 0)."""
    def alternatives(t: str) -> list[dict[str, Any]]:
        if top == 0:
            return []
        return [{"token": t, "logprob": -0.25, "bytes": list(t.encode())}] + [
            {"token": f"alt{j}", "logprob": -2.0 - j, "bytes": None} for j in range(top - 1)]

    return {"content": [{"token": t, "logprob": -0.25, "bytes": list(t.encode()),
                         "top_logprobs": alternatives(t)} for t in tokens], "refusal": None}


def cloud_reply(body: dict[str, Any]) -> dict[str, Any]:
    """What the loopback cloud answers to one chat-completion body."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    tokens: list[str] = []
    finish = "stop"
    fmt = body.get("response_format") or {}
    last = body["messages"][-1].get("content")
    if isinstance(last, str) and "refuse" in last:
        message["refusal"] = "I cannot help with that."
    elif body.get("tools") and body.get("tool_choice") != "none":
        message["tool_calls"] = [TOOL_CALL]
        finish = "tool_calls"
    elif fmt.get("type") in ("json_object", "json_schema"):
        tokens = ['{"answer"', ": 4}"]
    else:
        limit = int(body.get("max_tokens") or len(WORDS))
        tokens = WORDS[:limit]
        finish = "length" if limit < len(WORDS) else "stop"
    if tokens:
        message["content"] = "".join(tokens)
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    if body.get("logprobs") and tokens:
        choice["logprobs"] = _logprobs(tokens, int(body.get("top_logprobs") or 0))
    return {"id": "chatcmpl-loop", "object": "chat.completion", "created": 0,
            "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": 11, "completion_tokens": max(len(tokens), 1),
                      "total_tokens": 11 + max(len(tokens), 1)}}


class _CloudHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LoopbackCloud

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
        payload = json.dumps(cloud_reply(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class LoopbackCloud(ThreadingHTTPServer):
    """A real OpenAI-compatible chat server on 127.0.0.1 that records the bodies it gets."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CloudHandler)
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


# ------------------------------------------------------------------ the served app
@dataclass
class Surface:
    srv: RunningServer
    client: Any
    router: Router
    cloud: LoopbackCloud


def _cloud_model(cloud: LoopbackCloud) -> OpenAIModel:
    return OpenAIModel("big-model", base_url=cloud.base_url, api_key="k", max_retries=0,
                       timeout=30)


@pytest.fixture(scope="module")
def loopback() -> Iterator[LoopbackCloud]:
    cloud = LoopbackCloud()
    yield cloud
    cloud.close()


def _serve(tiny_llama: Any, cloud: LoopbackCloud, min_p_good: float = 0.0, **app_kw: Any
           ) -> Iterator[Surface]:
    from confroute.models.hf import HFLanguageModel

    edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
    router = calibrated_router(edge, _cloud_model(cloud), ThresholdPolicy(min_p_good=min_p_good))
    with serve_in_thread(create_app(router, max_prompt_chars=2000, **app_kw)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0,
                               timeout=60)
        yield Surface(srv, client, router, cloud)
        client.close()


@pytest.fixture(scope="module")
def served(tiny_llama: Any, loopback: LoopbackCloud) -> Iterator[Surface]:
    yield from _serve(tiny_llama, loopback)


@pytest.fixture()
def surface(served: Surface) -> Surface:
    set_mode(served.router, "edge")
    served.cloud.bodies.clear()
    return served


def _info(completion: Any) -> dict[str, Any]:
    return dict(completion.model_extra["confroute"])


# ------------------------------------------------------------------ forwarding
def test_tools_come_back_as_the_sdks_tool_calls_and_every_field_is_forwarded(surface):
    completion = surface.client.chat.completions.create(
        model="confroute",
        messages=[{"role": "developer", "content": "Use the tools."}, USER],
        tools=TOOLS, tool_choice="auto", parallel_tool_calls=False, seed=7, user="u-1",
        metadata={"team": "a"}, stop=["\n\n"], logit_bias={"50": -1}, presence_penalty=0.5,
        extra_body={"my_vendor_field": {"x": 1}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name) == ("call_1", "add")
    assert json.loads(call.function.arguments) == {"a": 2, "b": 2}
    assert choice.message.content is None
    # the cloud's own usage (no logprobs to count tokens from a tool call)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 1)
    info = _info(completion)
    assert info["forced"] == "tools" and info["budget_denied"] is False
    assert info["source"] == "cloud" and info["p_good"] is None  # no edge generation
    assert info["reason"].startswith("escalated by rule: the request carries tools")
    assert completion.model == "big-model"
    (body,) = surface.cloud.bodies
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
    assert body["parallel_tool_calls"] is False and body["seed"] == 7
    assert body["user"] == "u-1" and body["metadata"] == {"team": "a"}
    assert body["stop"] == ["\n\n"] and body["logit_bias"] == {"50": -1}
    assert body["presence_penalty"] == 0.5 and body["my_vendor_field"] == {"x": 1}
    assert body["messages"][0] == {"role": "system", "content": "Use the tools."}
    assert "stream" not in body and body["model"] == "big-model" and body["n"] == 1


def test_tool_choice_none_is_not_forced(surface):
    completion = surface.client.chat.completions.create(
        model="confroute", messages=[USER], tools=TOOLS, tool_choice="none")
    assert _info(completion)["forced"] is None
    assert _info(completion)["source"] == "edge" and surface.cloud.bodies == []


def test_a_tool_conversation_reaches_the_cloud_as_written(surface):
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4"}]
    surface.client.chat.completions.create(model="confroute", messages=messages, tools=TOOLS)
    (body,) = surface.cloud.bodies
    assert body["messages"][1]["tool_calls"] == [TOOL_CALL]
    assert body["messages"][2]["tool_call_id"] == "call_1"


def test_json_schema_response_format_validates(surface):
    jsonschema = pytest.importorskip("jsonschema")
    completion = surface.client.chat.completions.create(
        model="confroute", messages=[USER], response_format=JSON_FORMAT)
    value = json.loads(completion.choices[0].message.content)
    jsonschema.validate(value, SCHEMA)
    assert _info(completion)["forced"] == "json"
    assert surface.cloud.bodies[0]["response_format"] == JSON_FORMAT


def test_content_parts_with_an_image_escalate_with_the_parts(surface):
    parts = [{"type": "text", "text": "What is in this image?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    completion = surface.client.chat.completions.create(
        model="confroute", messages=[{"role": "user", "content": parts}])
    assert _info(completion)["forced"] == "media"
    assert completion.choices[0].message.content == "".join(WORDS)
    assert surface.cloud.bodies[0]["messages"] == [{"role": "user", "content": parts}]


def test_text_content_parts_and_developer_role_stay_on_the_edge(surface):
    completion = surface.client.chat.completions.create(model="confroute", messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}])
    assert _info(completion)["source"] == "edge" and _info(completion)["forced"] is None
    assert surface.cloud.bodies == []


# ------------------------------------------------------------------ finish_reason, usage
def test_max_tokens_gives_length_on_the_edge(surface):
    full = surface.client.chat.completions.create(model="confroute", messages=[USER])
    cut = surface.client.chat.completions.create(model="confroute", messages=[USER],
                                                 max_tokens=1)
    assert _info(cut)["source"] == "edge"
    assert cut.choices[0].finish_reason == "length"
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert len(cut.choices[0].message.content) < len(full.choices[0].message.content)


def test_max_tokens_gives_length_on_the_cloud(surface):
    set_mode(surface.router, "cloud")
    cut = surface.client.chat.completions.create(model="confroute", messages=[USER],
                                                 max_tokens=1)
    assert _info(cut)["source"] == "cloud"
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == WORDS[0]
    assert surface.cloud.bodies[0]["max_tokens"] == 1
    assert cut.usage is not None and cut.usage.prompt_tokens == 11


def test_streaming_cloud_answer_with_usage_chunk_and_finish_reason(surface):
    set_mode(surface.router, "cloud")
    chunks = list(surface.client.chat.completions.create(
        model="confroute", messages=[USER], max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(WORDS[:3])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_streaming_tool_call(surface):
    chunks = list(surface.client.chat.completions.create(
        model="confroute", messages=[USER], tools=TOOLS, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "add")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_streaming_edge_answer_keeps_the_edges_finish_reason(surface):
    chunks = list(surface.client.chat.completions.create(
        model="confroute", messages=[USER], max_tokens=1, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


# ------------------------------------------------------------------ logprobs
def test_edge_logprobs_through_the_sdk(surface):
    completion = surface.client.chat.completions.create(
        model="confroute", messages=[USER], logprobs=True, top_logprobs=2)
    assert _info(completion)["source"] == "edge"
    content = completion.choices[0].logprobs.content
    assert content
    assert all(math.isfinite(t.logprob) and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == completion.choices[0].message.content
    assert all(t.top_logprobs == [] and t.bytes == list(t.token.encode()) for t in content)
    plain = surface.client.chat.completions.create(model="confroute", messages=[USER])
    assert plain.choices[0].logprobs is None


def test_cloud_logprobs_are_passed_through_and_asked_for(surface):
    set_mode(surface.router, "cloud")
    completion = surface.client.chat.completions.create(
        model="confroute", messages=[USER], logprobs=True, top_logprobs=2)
    content = completion.choices[0].logprobs.content
    assert [t.token for t in content] == WORDS
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert surface.cloud.bodies[0]["logprobs"] is True
    assert surface.cloud.bodies[0]["top_logprobs"] == 2


def test_top_logprobs_without_logprobs_is_a_400(surface):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        surface.client.chat.completions.create(model="confroute", messages=[USER],
                                               top_logprobs=2)


def test_models_retrieve(surface):
    model = surface.client.models.retrieve("confroute")
    assert model.id == "confroute" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        surface.client.models.retrieve("other")


# ------------------------------------------------------------------ budget-denied rule
@pytest.fixture(scope="module")
def broke(tiny_llama: Any, loopback: LoopbackCloud) -> Iterator[Surface]:
    """The same app under a budget that allows no cloud call at all (the policy alone
    would escalate everything: only the budget refuses)."""
    yield from _serve(tiny_llama, loopback, min_p_good=1.0, max_cloud_fraction=0.0)


def _ledger(surface: Surface) -> dict[str, Any]:
    return dict(httpx.get(surface.srv.url + "/health", timeout=10).json()["ledger"])


def test_denied_media_is_a_429_naming_the_budget(broke):
    broke.cloud.bodies.clear()
    before = _ledger(broke)
    parts = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
    with pytest.raises(openai.RateLimitError, match=r"'cloud_fraction' budget") as err:
        broke.client.chat.completions.create(model="confroute",
                                             messages=[{"role": "user", "content": parts}])
    info = err.value.response.json()["confroute"]
    assert info["forced"] == "media" and info["budget_denied"] is True
    after = _ledger(broke)
    assert (after["requests"], after["cloud"]) == (before["requests"] + 1, before["cloud"])
    assert broke.cloud.bodies == []


def test_denied_tools_get_the_edges_plain_text(broke):
    broke.cloud.bodies.clear()
    before = _ledger(broke)
    completion = broke.client.chat.completions.create(model="confroute", messages=[USER],
                                                      tools=TOOLS)
    info = _info(completion)
    assert info["forced"] == "tools" and info["budget_denied"] is True
    assert info["source"] == "edge" and info["reason"].startswith("budget_denied")
    assert completion.choices[0].message.tool_calls is None
    assert isinstance(completion.choices[0].message.content, str)
    assert _ledger(broke)["requests"] == before["requests"] + 1
    assert _ledger(broke)["cloud"] == before["cloud"] == 0
    assert broke.cloud.bodies == []


def test_denied_json_with_a_non_json_edge_answer_is_a_429(broke):
    with pytest.raises(openai.RateLimitError, match="not valid JSON") as err:
        broke.client.chat.completions.create(model="confroute", messages=[USER],
                                             response_format={"type": "json_object"})
    assert err.value.response.json()["confroute"]["budget_denied"] is True


@pytest.fixture(scope="module")
def rich(tiny_llama: Any, loopback: LoopbackCloud) -> Iterator[Surface]:
    """Every escalation allowed: forced ones are admitted and settled by the ledger."""
    yield from _serve(tiny_llama, loopback, min_p_good=0.5, max_cloud_fraction=1.0)


def test_forced_escalations_are_admitted_and_settled_by_the_ledger(rich):
    before = _ledger(rich)
    completion = rich.client.chat.completions.create(model="confroute", messages=[USER],
                                                     tools=TOOLS)
    info = _info(completion)
    assert info["forced"] == "tools" and info["budget_denied"] is False
    assert info["ledger_seq"] is not None
    after = _ledger(rich)
    assert (after["requests"], after["cloud"]) == (before["requests"] + 1, before["cloud"] + 1)


# ------------------------------------------------------------------ entropy provenance
def test_local_model_entropies_are_exact(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
    (sample,) = edge.generate(["What is 2 + 2?"], GenerationConfig(max_new_tokens=4))[0]
    assert sample.entropy_kind == "exact" and sample.token_entropies is not None
    got = MeanTokenEntropy(max_new_tokens=4).estimate(["What is 2 + 2?"], edge)
    assert got.details["entropy_exact"].tolist() == [1.0]


def test_remote_entropies_are_a_top_k_bound(loopback):
    model = OpenAIModel("big-model", base_url=loopback.base_url, api_key="k", max_retries=0,
                        top_logprobs=3)
    (sample,) = model.generate(["Say something"], GenerationConfig(max_new_tokens=6))[0]
    assert sample.entropy_kind == "top_k_bound"
    assert sample.token_entropies is not None and np.all(sample.token_entropies > 0)
    got = MeanTokenEntropy(max_new_tokens=6).estimate(["Say something"], model)
    assert got.details["entropy_exact"].tolist() == [0.0]
    no_top = OpenAIModel("big-model", base_url=loopback.base_url, api_key="k",
                         max_retries=0, top_logprobs=0)
    (plain,) = no_top.generate(["Say something"], GenerationConfig(max_new_tokens=6))[0]
    assert plain.entropy_kind == "none" and plain.token_entropies is None


def test_entropy_kind_defaults_checks_and_survives_the_cache():
    from confroute.cache import decode_samples, encode_samples
    from confroute.errors import InvalidParameterError
    from confroute.types import Sample, Samples

    ent = np.array([0.5, 1.5])
    assert Sample("a").entropy_kind == "none"
    assert Sample("a", token_ids=(1, 2), token_entropies=ent).entropy_kind == "exact"
    with pytest.raises(InvalidParameterError, match="'entropy_kind' parameter of Sample"):
        Sample("a", entropy_kind="top_k_bound")
    with pytest.raises(InvalidParameterError, match="'entropy_kind'"):
        Sample("a", token_ids=(1, 2), token_entropies=ent, entropy_kind="none")
    bound = Sample("a", token_ids=(1, 2), token_logprobs=-ent, token_entropies=ent,
                   entropy_kind="top_k_bound")
    (back,) = decode_samples(encode_samples([bound]))
    assert back.entropy_kind == "top_k_bound"
    exact = Sample("b", token_ids=(1, 2), token_logprobs=-ent, token_entropies=ent)
    got = MeanTokenEntropy().estimate(
        ["x", "y"], samples=[Samples("x", greedy=exact), Samples("y", greedy=bound)])
    assert got.details["entropy_exact"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------ smaller parts
def test_edge_stop_cuts_the_answer(surface):
    full = surface.client.chat.completions.create(model="confroute", messages=[USER])
    text = full.choices[0].message.content
    assert len(text) >= 2
    stop = text[1:3] if text[1:3].strip() else text[1]
    cut = surface.client.chat.completions.create(model="confroute", messages=[USER],
                                                 stop=stop, logprobs=True)
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    tokens = "".join(t.token for t in cut.choices[0].logprobs.content)
    assert text.startswith(tokens) and len(tokens) <= text.find(stop)


def test_streamed_edge_logprobs(surface):
    chunks = list(surface.client.chat.completions.create(
        model="confroute", messages=[USER], logprobs=True, stream=True))
    whole = surface.client.chat.completions.create(model="confroute", messages=[USER],
                                                   logprobs=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [
        (t.token, t.logprob) for t in whole.choices[0].logprobs.content]


def test_check_json_rule():
    from confroute.serve_surface import check_json

    pytest.importorskip("jsonschema")
    assert check_json('{"answer": 4}', JSON_FORMAT) is None
    assert check_json('{"answer": 4}', {"type": "json_object"}) is None
    assert "not valid JSON" in str(check_json("four", {"type": "json_object"}))
    assert "does not meet the JSON schema" in str(check_json('{"answer": "4"}', JSON_FORMAT))


def test_request_fields_are_scoped_and_never_override_the_transport(loopback):
    from confroute.models.openai import current_request_fields, request_fields

    model = _cloud_model(loopback)
    loopback.bodies.clear()
    with request_fields({"user": "u-9", "n": 5, "stream": True, "model": "x"}):
        assert current_request_fields() == {"user": "u-9"}
        model.generate(["hi"], GenerationConfig(max_new_tokens=2))
    model.generate(["hi"], GenerationConfig(max_new_tokens=2))
    first, second = loopback.bodies
    assert first["user"] == "u-9" and first["n"] == 1 and first["model"] == "big-model"
    assert "stream" not in first and "user" not in second
    assert current_request_fields() == {}


def test_a_cloud_refusal_comes_back(surface):
    set_mode(surface.router, "cloud")
    messages = [{"role": "user", "content": "Please refuse this."}]
    completion = surface.client.chat.completions.create(model="confroute", messages=messages)
    message = completion.choices[0].message
    assert message.refusal == "I cannot help with that." and message.content is None
    chunks = list(surface.client.chat.completions.create(model="confroute", messages=messages,
                                                         stream=True))
    assert [c.choices[0].delta.refusal for c in chunks if c.choices[0].delta.refusal] == [
        "I cannot help with that."]


def test_decisions_and_responses_carry_the_sample_they_serve(surface):
    router = surface.router
    prompt = [USER]
    (d,) = router.decide([prompt])
    assert d.source == "edge" and d.edge_sample is not None
    assert d.edge_sample.text == d.edge_answer and d.edge_sample.token_logprobs is not None
    (resp,) = router.answer([d])
    assert resp.sample is d.edge_sample
    set_mode(router, "cloud")
    (up,) = router.answer(router.decide([prompt]))
    assert up.source == "cloud" and up.sample is not None and up.sample.text == up.text
    assert up.sample.extra["finish_reason"] == "stop"
    assert up.sample.extra["message"]["content"] == up.text
