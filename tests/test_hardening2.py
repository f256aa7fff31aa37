"""Hardening, part 2 (issue 13): the remaining raw exceptions are typed errors naming
the parameter, no secret leaves the process, and the server refuses oversized, deeply
nested, invalid-Unicode and half-sent bodies without a 5xx or a traceback."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from confroute import (
    CloudError,
    InvalidParameterError,
    InvalidTypeError,
    Router,
    Sample,
    Samples,
)
from confroute.errors import ModelLoadError, redact, url_secrets
from confroute.policies import BudgetPolicy, RiskControlPolicy, ThresholdPolicy
from tests.fault_server import FaultServer
from tests.test_hardening import _fitted

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from confroute.serve import create_app, serve_in_thread
from confroute.serve_guard import json_depth

USER = {"role": "user", "content": "hi"}


# ------------------------------------------------------------------ typed errors
def test_a_name_missing_its_required_argument_names_it_and_the_fix() -> None:
    with pytest.raises(InvalidParameterError,
                       match=r"'policy'.*'max_cloud_fraction'.*BudgetPolicy\(max_cloud_fraction"):
        Router(policy="budget")
    with pytest.raises(InvalidParameterError, match=r"'policy'.*'max_edge_error'"):
        Router(policy="risk_control")


def test_a_name_with_defaults_still_resolves() -> None:
    assert isinstance(Router(policy="threshold").policy, ThresholdPolicy)


@pytest.mark.parametrize("junk", [["junk"], [None], [{"prompt": "question 0"}]])
@pytest.mark.parametrize("method", ["decide", "route", "predict_proba"])
def test_samples_elements_are_checked(junk: list[Any], method: str) -> None:
    router = _fitted()
    with pytest.raises(InvalidTypeError, match=r"'samples' parameter of Router\.\w+ must be "
                                               r"a sequence of Samples.*samples\[0\]"):
        getattr(router, method)(["question 0"], samples=junk)


def test_samples_of_another_prompt_are_refused() -> None:
    router = _fitted()
    other = Samples(prompt="another question", greedy=Sample(text="a", token_logprobs=np.zeros(2)))
    with pytest.raises(InvalidParameterError, match=r"'samples'.*samples\[0\]\.prompt"):
        router.decide(["question 0"], samples=[other])
    same = Samples(prompt="question 0", greedy=Sample(text="a", token_logprobs=np.zeros(2)))
    assert router.decide(["question 0"], samples=[same])[0].source in ("edge", "cloud")


def test_conversation_samples_match_in_any_sequence_type() -> None:
    router = _fitted()
    conv = [{"role": "user", "content": "question 0"}]
    s = Samples(prompt=conv, greedy=Sample(text="a", token_logprobs=np.zeros(2)))
    assert len(router.decide([tuple(conv)], samples=[s])) == 1


@pytest.mark.parametrize(("kwargs", "name"), [({"edge": "not a model"}, "edge"),
                                              ({"cloud": 42}, "cloud")])
def test_models_are_checked_against_the_protocol(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidTypeError, match=rf"'{name}' parameter of Router must be a "
                                               r"LanguageModel"):
        Router(**kwargs)


def test_window_is_bounded() -> None:
    p = np.linspace(0.0, 1.0, 50)
    with pytest.raises(InvalidParameterError, match=r"'window' parameter of BudgetPolicy must "
                                                    r"be an int in \[1, 10000000\]"):
        BudgetPolicy(max_cloud_fraction=0.3, enforce="window", window=10**12).fit(p)
    BudgetPolicy(max_cloud_fraction=0.3, enforce="window", window=10**4).fit(p)


def test_grid_size_is_bounded() -> None:
    p = np.linspace(0.0, 1.0, 50)
    y = (np.arange(50) % 2).astype(int)
    with pytest.raises(InvalidParameterError, match=r"'grid_size' parameter of "
                                                    r"RiskControlPolicy must be an int in"):
        RiskControlPolicy(max_edge_error=0.2, grid_size=10**11).fit(p, y)


@pytest.mark.parametrize("cut", [0.5, 0.0001])
def test_truncated_safetensors_is_a_model_load_error(tmp_path: Path, tiny_llama: Any,
                                                     cut: float) -> None:
    from confroute.models import HFLanguageModel

    model, tok = tiny_llama
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * cut))])
    with pytest.raises(ModelLoadError, match=r"'model' parameter of HFLanguageModel.*"
                                             + str(tmp_path).replace("\\", "\\\\")):
        HFLanguageModel(str(tmp_path))


@pytest.mark.parametrize("url", ["http://host/v1\r\nX-Evil: 1", "http://host/v1\n",
                                 "http://ho st/v1", "http://host/\x00v1"])
def test_base_url_with_control_characters_is_refused_at_construction(url: str) -> None:
    from confroute.models import OpenAIModel

    with pytest.raises(InvalidParameterError, match="'base_url' parameter of OpenAIModel"):
        OpenAIModel("m", base_url=url)


def test_base_url_error_does_not_echo_a_key() -> None:
    from confroute.models import OpenAIModel

    with pytest.raises(InvalidParameterError, match="'base_url'") as info:
        OpenAIModel("m", base_url="http://u:sk-TOPSECRET@host/v1\r\n")
    assert "sk-TOPSECRET" not in str(info.value)


# ------------------------------------------------------------------ redaction
def test_redact_removes_keys_userinfo_and_secret_query_values() -> None:
    text = "POST http://bob:sk-1234@h:1/v1?api_key=abcd&x=1 failed (sk-9999)"
    out = redact(text, ["sk-9999", None, ""])
    assert "sk-1234" not in out and "abcd" not in out and "sk-9999" not in out
    assert "bob" not in out and "h:1/v1" in out and "x=1" in out
    assert "sk-1234" in url_secrets("http://bob:sk-1234@h/v1")


KEY_ENV, KEY_ARG, KEY_URL = "sk-envKEY7f3a91", "sk-argKEY5c2e77", "sk-urlKEY0d9b44"
ENV_NAME = "CONFROUTE_TEST_SECRET_KEY"


def _cloud(srv: FaultServer, where: str) -> Any:
    from confroute.models import OpenAIModel

    url = srv.base_url
    kw: dict[str, Any] = {"api_key_env": ENV_NAME}
    if where == "arg":
        kw["api_key"] = KEY_ARG
    if where == "url":
        url = url.replace("http://", f"http://user:{KEY_URL}@")
    return OpenAIModel("cloud-model", base_url=url, timeout=2.0, max_retries=1,
                       backoff_base=0.01, backoff_max=0.02, max_retry_time=5.0, seed=0, **kw)


@pytest.mark.parametrize("where", ["env", "arg", "url"])
def test_no_artifact_shows_a_key(where: str, tmp_path: Path, tiny_llama: Any,
                                 monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    from confroute.cache import CachedModel, GenerationCache
    from confroute.models.hf import HFLanguageModel
    from tests.test_serve import calibrated_router

    monkeypatch.setenv(ENV_NAME, KEY_ENV)
    caplog.set_level(logging.DEBUG)
    artifacts: list[str] = []
    with FaultServer(["ok"] + ["500"] * 40) as srv:
        model = _cloud(srv, where)
        cache_path = tmp_path / "generations.sqlite"
        cloud = CachedModel(model, GenerationCache(cache_path))
        edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
        router = calibrated_router(edge, cloud, ThresholdPolicy(min_p_good=1.0))
        assert router(["first prompt"])[0].source == "cloud"  # the one 'ok' (cached)
        degraded = router(["second prompt"])[0]
        assert degraded.degraded and degraded.error
        artifacts += [degraded.error, str(degraded.cloud_error), repr(model), repr(router)]
        router.on_cloud_error = "raise"
        with pytest.raises(CloudError) as info:
            router(["third prompt"])
        artifacts.append(str(info.value))
        router.on_cloud_error = "error"
        router.save(tmp_path / "router.json")
        artifacts.append((tmp_path / "router.json").read_text())
        with serve_in_thread(create_app(router)) as running:
            r = httpx.post(running.base_url + "/chat/completions", timeout=60,
                           json={"model": "x", "messages": [USER]})
        assert r.status_code == 502
        assert srv.base_url.split("//")[1] not in r.text  # no internal URL for clients
        artifacts += [r.text, json.dumps(dict(r.headers))]
        artifacts.append(cache_path.read_bytes().decode("latin-1"))
    artifacts += [rec.getMessage() + (rec.exc_text or "") for rec in caplog.records]
    assert any("failed" in a for a in artifacts)  # the artifacts do describe the failure
    for key in (KEY_ENV, KEY_ARG, KEY_URL):
        leaks = [a[max(0, a.find(key) - 200):a.find(key) + 50] for a in artifacts if key in a]
        assert leaks == [], key


# ------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def guarded(tiny_llama: Any) -> Any:
    from confroute.models.hf import HFLanguageModel
    from tests.test_serve import EchoCloud, calibrated_router

    edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
    router = calibrated_router(edge, EchoCloud(), ThresholdPolicy(min_p_good=0.0))
    app = create_app(router, max_body_bytes=4096, max_json_depth=16)
    with serve_in_thread(app) as srv:
        yield srv


def _post(srv: Any, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(srv.base_url + "/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json", **headers})


def test_oversized_body_is_a_413(guarded: Any) -> None:
    body = json.dumps({"messages": [USER], "junk": "x" * 10_000}).encode()
    r = _post(guarded, body)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"

    def chunks() -> Any:  # no Content-Length: counted while reading
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = httpx.post(guarded.base_url + "/chat/completions", content=chunks(), timeout=60)
    assert r.status_code == 413


def test_create_app_checks_the_guard_bounds(tiny_llama: Any) -> None:
    router = _fitted()
    with pytest.raises(InvalidParameterError, match="'max_body_bytes' parameter of create_app"):
        create_app(router, max_body_bytes=0)
    with pytest.raises(InvalidParameterError, match="'max_json_depth' parameter of create_app"):
        create_app(router, max_json_depth=10**6)


@pytest.mark.parametrize("depth", [17, 3000])
def test_deep_json_is_a_400_not_a_500(guarded: Any, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "x": {nested}}}'.encode()
    r = _post(guarded, body[:4000] if len(body) > 4096 else body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "too_deeply_nested"


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b'{"a": "[[[[{{{{", "b": [1, [2]]}', 10) == 3
    assert json_depth(b'{"a": "\\"[[["}', 10) == 1
    assert json_depth(b"[" * 50, 10) == 11


@pytest.mark.parametrize("message", [
    {"role": "user", "content": "a\ud800b"},
    {"role": "user", "content": [{"type": "text", "text": "\udfff"}]},
])
def test_lone_surrogate_is_a_400(guarded: Any, message: dict[str, Any]) -> None:
    r = _post(guarded, json.dumps({"messages": [message]}).encode())  # ASCII \ud800 escapes
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"].startswith("messages[0].content") and "surrogate" in err["message"]


def test_valid_surrogate_pairs_are_accepted(guarded: Any) -> None:
    r = _post(guarded, json.dumps({"messages": [{"role": "user", "content": "hi \U0001F600"}],
                                   "max_tokens": 2}).encode())
    assert r.status_code == 200, r.text


def test_client_that_disconnects_mid_body_leaves_no_traceback(
    guarded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host, port = guarded.base_url.split("//")[1].split("/")[0].split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 2000\r\n\r\n"
                         b'{"messages": [')
    time.sleep(0.5)
    r = _post(guarded, json.dumps({"messages": [USER], "max_tokens": 2}).encode())
    assert r.status_code == 200  # still serving
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


def test_client_that_gives_up_during_its_cloud_call_is_still_charged(tiny_llama: Any) -> None:
    """The documented policy (docs/security.md): the call completes, is charged, and the
    ledger counts it, so the ledger agrees with what the cloud bills."""
    from confroute.models.hf import HFLanguageModel
    from confroute.serve import ledger_report
    from tests.test_serve import EchoCloud, calibrated_router

    class SlowCloud(EchoCloud):
        def generate(self, prompts: Any, config: Any) -> Any:
            time.sleep(1.0)
            return super().generate(prompts, config)

    cloud = SlowCloud()
    edge = HFLanguageModel(*tiny_llama, use_chat_template=False)
    router = calibrated_router(edge, cloud, ThresholdPolicy(min_p_good=1.0))
    app = create_app(router, max_cloud_fraction=1.0)
    with serve_in_thread(app) as srv:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.base_url + "/chat/completions", timeout=0.4,
                       json={"model": "x", "messages": [USER]})
        deadline = time.monotonic() + 10
        while not cloud.prompts and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        report = ledger_report(app.state.router.policy)
    assert len(cloud.prompts) == 1
    assert report is not None and report["requests"] == 1 and report["cloud"] == 1


def test_openai_model_repr_hides_header_values() -> None:
    """Extra headers (e.g. from a config file) may carry credentials: repr shows names only."""
    from confroute.models.openai import OpenAIModel

    m = OpenAIModel("m", base_url="http://127.0.0.1:9/v1",
                    headers={"X-Api-Key": "hdr-secret-123", "X-Team": "a"})
    text = repr(m)
    assert "hdr-secret-123" not in text and "X-Api-Key" in text


@pytest.mark.parametrize(("kwargs", "param"), [({"n": 10**9, "temperature": 0.7}, "'n'"),
                                               ({"max_new_tokens": 10**12}, "'max_new_tokens'")])
def test_generation_config_sizes_are_bounded(kwargs: dict, param: str) -> None:
    from confroute.types import GenerationConfig

    with pytest.raises(InvalidParameterError, match=param):
        GenerationConfig(**kwargs)
