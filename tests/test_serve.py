"""The routing server over real loopback HTTP: uvicorn in a background thread, the
official ``openai`` client, a tiny real edge model, and clouds that answer or fail
(a scripted in-process cloud, or ``OpenAIModel`` talking to the fault-injecting
HTTP server)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from confroute import GenerationConfig, MissingDependencyError, Router, Sample
from confroute.estimators.logprob import SequenceLogProb
from confroute.policies import BudgetPolicy, ThresholdPolicy
from tests.fault_server import FaultServer, Step

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from confroute.serve import RunningServer, create_app, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAULT_DOC = ROOT / "docs" / "fault-table.md"
CAL_PROMPTS = [
    "What is the capital of France?", "What is 2 + 2?", "Who wrote Hamlet?",
    "What is the capital of Italy?", "Say yes or no.", "What is the answer?",
    "Count from 1 to 5.", "hello world",
]


class RecordingEdge:
    """The tiny real edge model, recording every prompt and concurrent use."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = "recording-edge"
        self.prompts: list[object] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def generate(self, prompts, config):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.prompts.extend(prompts)
        try:
            return self.inner.generate(prompts, config)
        finally:
            with self.lock:
                self.in_flight -= 1


class EchoCloud:
    """A local cloud (sync ``generate`` only) that echoes the last user turn."""

    name = "echo-cloud"

    def __init__(self) -> None:
        self.prompts: list[object] = []
        self.configs: list[GenerationConfig] = []

    def generate(self, prompts, config):
        self.prompts.extend(prompts)
        self.configs.append(config)
        return [[Sample(text=f"cloud: {p[-1]['content']}", token_ids=(1, 2, 3), prompt_tokens=5)]
                for p in prompts]


def calibrated_router(edge, cloud, policy, **kw) -> Router:
    """Calibrate on the tiny edge's real generations with labels that carry no information
    (each prompt once good, once bad), so the calibrator gives p_good = 0.5 to every
    request and the policy decides deterministically (threshold 0 keeps everything on
    the edge, threshold 1 escalates everything)."""
    est = SequenceLogProb(max_new_tokens=6)
    got = est.estimate(CAL_PROMPTS, edge)
    router = Router(est, "isotonic", policy, edge=edge, cloud=cloud, edge_max_new_tokens=6,
                    cloud_config=GenerationConfig(max_new_tokens=16), **kw)
    n = len(CAL_PROMPTS)
    router.calibrate(CAL_PROMPTS * 2, [1] * n + [0] * n, samples=got.samples * 2)
    return router


def set_mode(router: Router, mode: str) -> None:
    pol = router.policy
    assert isinstance(pol, ThresholdPolicy)
    pol.min_p_good = 0.0 if mode == "edge" else 1.0
    pol.nan_policy = "edge" if mode == "edge" else "escalate"


@dataclass
class Served:
    srv: RunningServer
    client: openai.OpenAI
    router: Router
    edge: RecordingEdge
    cloud: EchoCloud


@pytest.fixture(scope="module")
def served(tiny_llama):
    from confroute.models.hf import HFLanguageModel

    # Without the chat template the tiny random model answers with visible text (with
    # it, it repeats the special <|assistant|> token, which decodes to '').
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


# ------------------------------------------------------------------ light import
def test_import_and_help_do_not_load_fastapi_or_uvicorn():
    code = (
        "import sys, confroute, confroute.serve, confroute.cli\n"
        "confroute.cli.build_parser()\n"
        "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_fastapi_names_the_extra(monkeypatch, served):
    router = served.router
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "confroute\[serve\]"'):
        create_app(router)


def test_create_app_validates_its_arguments(served):
    router = served.router
    with pytest.raises(TypeError, match="'router' parameter of create_app"):
        create_app("router.json")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'max_n' parameter of create_app"):
        create_app(router, max_n=2)
    with pytest.raises(ValueError, match="'max_messages' parameter of create_app"):
        create_app(router, max_messages=0)
    with pytest.raises(ValueError, match=r"calibrate"):
        create_app(Router())


# ------------------------------------------------------------------ round trips
def test_chat_completion_round_trip(server):
    client, router, cloud = server.client, server.router, server.cloud
    raw = client.chat.completions.with_raw_response.create(
        model="anything", messages=[{"role": "user", "content": "What is 2 + 2?"}]
    )
    completion = raw.parse()
    expected = router.route([[{"role": "user", "content": "What is 2 + 2?"}]])[0]
    assert completion.model == "recording-edge"  # the model that answered (the alias: routed)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected.edge_answer
    # the edge sample's own reason (the tiny model runs into edge_max_new_tokens=6)
    assert expected.edge_sample is not None
    assert completion.choices[0].finish_reason == expected.edge_sample.finish_reason
    info = completion.model_extra["confroute"]
    assert info["source"] == info["routed_to"] == "edge"
    assert info["p_good"] == pytest.approx(expected.p_good)
    assert set(info["scores"]) == {"sequence_logprob"}
    assert info["reason"] == expected.reason and info["reason"].startswith("p_good")
    assert info["degraded"] is False and info["error"] is None and info["cost"] == 0.0
    sent = json.dumps([{"role": "user", "content": "What is 2 + 2?"}], ensure_ascii=False)
    assert info["prompt_hash"] == hashlib.sha256(sent.encode()).hexdigest()[:16]
    assert info["ledger_seq"] is None  # a threshold policy keeps no ledger
    assert raw.headers["x-confroute-source"] == "edge"
    assert float(raw.headers["x-confroute-p-good"]) == pytest.approx(expected.p_good, abs=1e-6)
    assert raw.headers["x-confroute-degraded"] == "false"
    assert cloud.prompts == []


def test_streaming_round_trip(server):
    srv, client = server.srv, server.client
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="routed", messages=messages)
    chunks = list(client.chat.completions.create(model="routed", messages=messages,
                                                 stream=True))
    assert whole.choices[0].message.content  # the tiny edge model says something
    assert len(chunks) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["confroute"] == whole.model_extra["confroute"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    # the wire format: SSE events ending with data: [DONE]
    with httpx.stream("POST", srv.base_url + "/chat/completions", timeout=60,
                      json={"messages": messages, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-confroute-source"] == "edge"
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["confroute"]["source"] == "edge"


@pytest.mark.parametrize("mode", ["edge", "cloud"])
def test_multi_turn_is_routed_on_the_whole_conversation(server, mode):
    client, router, edge, cloud = server.client, server.router, server.edge, server.cloud
    set_mode(router, mode)
    conv = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of France?"},
    ]
    completion = client.chat.completions.create(model="routed", messages=conv)
    # the edge model generated for exactly this conversation, every turn included
    assert edge.prompts == [tuple(conv)]
    info = completion.model_extra["confroute"]
    assert info["routed_to"] == info["source"] == mode
    if mode == "cloud":
        assert cloud.prompts == [tuple(conv)]
        assert completion.choices[0].message.content == "cloud: And of France?"
    else:
        assert cloud.prompts == []
        assert completion.choices[0].message.content == router.route([conv])[0].edge_answer


def test_escalated_request_is_answered_by_the_cloud(server):
    client, router, cloud = server.client, server.router, server.cloud
    set_mode(router, "cloud")
    raw = client.chat.completions.with_raw_response.create(
        model="routed", messages=[{"role": "user", "content": "Who wrote Hamlet?"}],
        temperature=0.7, max_tokens=4, seed=3,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "cloud: Who wrote Hamlet?"
    assert raw.headers["x-confroute-source"] == "cloud"
    info = completion.model_extra["confroute"]
    assert info["source"] == "cloud" and info["reason"].startswith("p_good")
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 3
    # request sampling fields reach the cloud call (never a longer answer than configured)
    cfg = cloud.configs[-1]
    assert (cfg.temperature, cfg.max_new_tokens, cfg.seed) == (0.7, 4, 3)


def test_models_and_health(server):
    srv, client = server.srv, server.client
    models = client.models.list()
    assert [m.id for m in models.data] == ["routed"]
    health = httpx.get(srv.url + "/health", timeout=10).json()
    assert health["status"] == "ok"
    assert health["edge"] == "recording-edge" and health["cloud"] == "echo-cloud"
    assert health["policy"] == "ThresholdPolicy" and health["ledger"] is None
    assert health["routed"] >= 1


# -------------------------------------------------------------------- validation
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("body", "param", "code", "match"),
    [
        ({}, "messages", "missing_required_parameter", "Missing required parameter"),
        ({"messages": []}, "messages", "empty_array", "at least one message"),
        ({"messages": "hi"}, "messages", "invalid_type", "must be a list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role",
         "invalid_value",
         "must be one of 'developer', 'system', 'user', 'assistant', 'tool'. Got 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content",
         "invalid_type", "must be a string"),
        # media parts are escalated (tests/test_openai_surface.py); unknown kinds are refused
        ({"messages": [{"role": "user", "content": [{"type": "video",
                                                     "video": {"url": "x"}}]}]},
         "messages[0].content", "unsupported_content", "'video'.*accepts the part types"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "messages[0].content", "invalid_type", "element 0 is not a valid part"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "invalid_type",
         "Got NoneType"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type", "must be an object"),
        ({"messages": [{"role": "user", "content": "x" * 201}]}, "messages",
         "prompt_too_long", "201 characters.*at most 200"),
        ({"messages": [USER] * 6}, "messages", "too_many_messages", "at most 5"),
        ({"messages": [{"role": "system", "content": "be nice"}]}, "messages",
         "invalid_value", "at least one 'user' message"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages", "invalid_value",
         "non-empty content"),
        ({"messages": [USER], "n": 2}, "n", "invalid_value", "at most 1"),
        ({"messages": [USER], "n": 0}, "n", "invalid_value", "integer >= 1"),
        ({"messages": [USER], "temperature": 2.5}, "temperature", "invalid_value", r"\[0, 2\]"),
        ({"messages": [USER], "temperature": "hot"}, "temperature", "invalid_value",
         "Got 'hot'"),
        ({"messages": [USER], "top_p": 0}, "top_p", "invalid_value", r"\(0, 1\]"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens", "invalid_value", ">= 1"),
        ({"messages": [USER], "stop": [""]}, "stop", "invalid_value", "non-empty string"),
        ({"messages": [USER], "stream": "yes"}, "stream", "invalid_type", "boolean"),
        ({"messages": [USER], "model": 7}, "model", "invalid_type", "string"),
        ([USER], None, "invalid_body", "JSON object"),
    ],
)
def test_invalid_requests_get_openai_shaped_400(server, body, param, code, match):
    srv = server.srv
    r = httpx.post(srv.base_url + "/chat/completions", json=body, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    import re

    assert re.search(match, err["message"]), err["message"]


def test_invalid_json_and_unknown_routes(server):
    srv = server.srv
    r = httpx.post(srv.base_url + "/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(srv.base_url + "/completions", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(srv.base_url + "/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_surfaces_validation_errors(server):
    client = server.client
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="routed", messages=[USER], n=2)
    assert info.value.status_code == 400 and info.value.code == "invalid_value"
    assert info.value.param == "n"


# ------------------------------------------------------------------- concurrency
def test_concurrent_requests_are_micro_batched_and_edge_is_serialised(server):
    srv, edge = server.srv, server.edge
    edge.max_in_flight = 0
    before = httpx.get(srv.url + "/health", timeout=10).json()

    async def run() -> list[object]:
        async with openai.AsyncOpenAI(base_url=srv.base_url, api_key="unused",
                                      max_retries=0, timeout=60) as aclient:
            return await asyncio.gather(*(
                aclient.chat.completions.create(
                    model="routed", messages=[{"role": "user", "content": f"id-{i}: hello"}])
                for i in range(16)
            ))

    results = asyncio.run(run())
    after = httpx.get(srv.url + "/health", timeout=10).json()
    assert len(results) == 16
    assert sorted(tuple(p)[-1]["content"] for p in edge.prompts) == sorted(
        f"id-{i}: hello" for i in range(16))
    assert edge.max_in_flight == 1  # the edge model was never called concurrently
    assert after["routed"] - before["routed"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a batch
    assert after["largest_batch"] > 1


# ------------------------------------------------------------------ CLI app path
def test_cli_serve_app_round_trip(tmp_path, tiny_llama):
    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args
    from confroute.models.hf import HFLanguageModel
    from tests.tiny_models import save_causal_lm

    model_dir = save_causal_lm(tmp_path / "edge")
    router = calibrated_router(HFLanguageModel(str(model_dir)), None,
                               ThresholdPolicy(min_p_good=1.0))
    router.save(tmp_path / "router.json")
    with FaultServer() as cloud_srv:
        args = build_parser().parse_args([
            "serve", "--router", str(tmp_path / "router.json"), "--edge", str(model_dir),
            "--cloud", f"openai:test-model@{cloud_srv.base_url}", "--model-name", "cr",
            "--port", "0",
        ])
        assert (args.host, args.func.__name__) == ("127.0.0.1", "cmd_serve")
        with serve_in_thread(app_from_args(args), port=args.port) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
            completion = client.chat.completions.create(
                model="cr", messages=[{"role": "user", "content": "What is 2 + 2?"}])
            client.close()
        assert completion.model_extra["confroute"]["source"] == "cloud", completion.model_extra
        assert completion.choices[0].message.content == "The answer is 0"
        assert completion.model_extra["confroute"]["source"] == "cloud"
        sent = cloud_srv.requests[0].body["messages"]
        assert sent == [{"role": "user", "content": "What is 2 + 2?"}]


# -------------------------------------------------------------------- fault table
# (row name, the fault the server returns on every attempt, attempts the client makes)
FAULTS: list[tuple[str, list[object] | None, int]] = [
    ("none (control)", [], 1),
    ("timeout", [Step("sleep", sleep=1.0)], 2),
    ("HTTP 500", ["500"], 2),
    ("HTTP 503", ["503"], 2),
    ("HTTP 429, no Retry-After", ["429"], 2),
    ("HTTP 400 (not retried)", ["400"], 1),
    ("connection reset", ["reset"], 2),
    ("malformed body", ["malformed"], 2),
    ("truncated JSON", ["truncated"], 2),
    ("no cloud configured", None, 0),
]
PER_FAULT = 3


def _fault_rows(tiny_llama) -> list[dict[str, object]]:
    from confroute.models.hf import HFLanguageModel
    from confroute.models.openai import OpenAIModel

    rows = []
    with FaultServer() as fsrv:
        cloud = OpenAIModel("test-model", base_url=fsrv.base_url, api_key="k", timeout=0.3,
                            max_retries=1, backoff_base=0.01, backoff_max=0.02,
                            max_retry_time=5.0, seed=0)
        policy = BudgetPolicy(max_cloud_fraction=1.0, enforce="total")
        router = calibrated_router(HFLanguageModel(*tiny_llama, use_chat_template=False),
                                   cloud, policy)
        assert policy.threshold_ == 1.0  # every request escalates
        with serve_in_thread(create_app(router)) as srv:
            for name, steps, attempts in FAULTS:
                row: dict[str, object] = {"fault": name}
                router.cloud = None if steps is None else cloud
                for mode in ("degrade", "error", "raise"):
                    router.on_cloud_error = mode
                    if steps:
                        fsrv.push(*(steps * attempts * PER_FAULT))
                    sent = len(fsrv.requests)
                    led0 = policy.snapshot()
                    msgs = [[{"role": "user", "content": f"{name} {mode} #{i}"}]
                            for i in range(PER_FAULT)]

                    async def fire(msgs=msgs) -> list[httpx.Response]:
                        async with httpx.AsyncClient(timeout=60) as ac:
                            return await asyncio.gather(*(
                                ac.post(srv.base_url + "/chat/completions",
                                        json={"messages": m}) for m in msgs))

                    responses = asyncio.run(fire())
                    assert fsrv.remaining_steps == 0
                    led1 = policy.snapshot()
                    bodies = [r.json() for r in responses]
                    # zero lost: every request got an answer or an explicit error record
                    assert len(responses) == PER_FAULT
                    statuses = {r.status_code for r in responses}
                    assert len(statuses) == 1
                    status = statuses.pop()
                    infos = [b["confroute"] for b in bodies]
                    assert all(i["routed_to"] == "cloud" for i in infos)
                    if status == 200:
                        texts = [b["choices"][0]["message"]["content"] for b in bodies]
                        assert all(isinstance(t, str) for t in texts)
                    else:
                        assert status == 502
                        assert all(b["error"]["type"] == "cloud_error" for b in bodies)
                        assert all(b["error"]["message"] == i["error"]
                                   for b, i in zip(bodies, infos))
                    srcs = {(i["source"], i["degraded"]) for i in infos}
                    assert len(srcs) == 1
                    source, degraded = srcs.pop()
                    errors = {i["error"] for i in infos}
                    reason = "-"
                    if errors != {None}:
                        reasons = {e.split("(", 1)[1].split(")", 1)[0] for e in errors}
                        assert len(reasons) == 1
                        reason = reasons.pop()
                    if status == 502:
                        assert all(b["error"]["code"] == reason for b in bodies)
                    # the ledger counts only cloud calls that happened
                    spent = led1.cloud - led0.cloud
                    assert led1.requests - led0.requests == PER_FAULT
                    answered_by_cloud = status == 200 and source == "cloud"
                    assert spent == (PER_FAULT if answered_by_cloud else 0)
                    assert len(fsrv.requests) - sent == attempts * PER_FAULT
                    row["attempts"] = attempts
                    row["reason"] = reason
                    row[mode] = (status, source, degraded)
                    row[f"{mode}_charged"] = spent
                rows.append(row)
    return rows


def _fault_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "# Fault table: what the routing server returns when the cloud fails",
        "",
        "<!-- Generated by tests/test_serve.py::test_fault_table; do not edit by hand. -->",
        "<!-- Regenerate: CONFROUTE_WRITE_DOCS=1 pytest tests/test_serve.py -k fault_table -->",
        "",
        "Every request is escalated (a `BudgetPolicy` with `max_cloud_fraction=1.0`,",
        "`enforce=\"total\"`) to an `OpenAIModel` cloud (`timeout=0.3`, `max_retries=1`)",
        "talking real HTTP to the fault-injecting server in `tests/fault_server.py`, which",
        f"returns the fault on every attempt. {PER_FAULT} concurrent requests per row and",
        "mode through `confroute serve`; the test asserts that none is lost (each gets",
        "its answer, a degraded edge answer or an error record) and that the budget",
        "ledger counts only cloud calls that succeeded.",
        "",
        "| cloud fault | cloud attempts per request | `reason` in `confroute.error` "
        "| `on_cloud_error=\"degrade\"` | `on_cloud_error=\"error\"` | budget charged |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        def cell(v: object) -> str:
            status, source, degraded = v  # type: ignore[misc]
            if status != 200:
                return f"{status}, error record, no answer"
            extra = ", degraded" if degraded else ""
            return f"{status}, answer from {source}{extra}"

        att = str(r["attempts"])
        charged = f"{r['degrade_charged']} / {r['error_charged']} of {PER_FAULT}"
        lines.append(f"| {r['fault']} | {att} | `{r['reason']}` | {cell(r['degrade'])} | "
                     f"{cell(r['error'])} | {charged} |")
    lines += [
        "",
        "`200, answer from edge, degraded`: the response is the edge model's answer with",
        "`confroute.degraded = true` and the cloud error in `confroute.error`.",
        "`502`: the body is an OpenAI-shaped error (`type: \"cloud_error\"`, `code` = the",
        "reason) plus the `confroute` decision record. With `on_cloud_error=\"raise\"` the",
        "server behaves as with `\"error\"` (it never drops a request).",
        "",
    ]
    return "\n".join(lines)


def test_fault_table(tiny_llama):
    rows = _fault_rows(tiny_llama)
    by = {r["fault"]: r for r in rows}
    assert by["none (control)"]["degrade"] == (200, "cloud", False)
    assert by["none (control)"]["attempts"] == 1
    for name, _, _ in FAULTS[1:]:
        assert by[name]["degrade"] == (200, "edge", True), name
        assert by[name]["error"][0] == 502, name
    assert by["HTTP 400 (not retried)"]["attempts"] == 1
    assert all(r["raise"] == r["error"] for r in rows)  # the server never raises
    assert by["timeout"]["reason"] == "timeout"
    assert by["connection reset"]["reason"] == "connection"
    assert by["no cloud configured"]["reason"] == "no_cloud"
    text = _fault_markdown(rows)
    if os.environ.get("CONFROUTE_WRITE_DOCS") == "1":
        FAULT_DOC.write_text(text, encoding="utf-8")
    assert FAULT_DOC.exists(), "run CONFROUTE_WRITE_DOCS=1 pytest tests/test_serve.py -k fault"
    assert FAULT_DOC.read_text(encoding="utf-8") == text, (
        "docs/fault-table.md is out of date: regenerate it with "
        "CONFROUTE_WRITE_DOCS=1 pytest tests/test_serve.py -k fault_table"
    )
