"""confroute.config: a TOML file with environment expansion, validated, built into a
working router (a tiny real edge model saved to disk, loopback OpenAI-compatible
clouds), and ``confroute serve --config`` with command-line overrides."""

from __future__ import annotations

import textwrap

import pytest

from confroute import ConfigError, GenerationConfig, Router, load_config
from confroute.estimators.logprob import SequenceLogProb
from confroute.policies import ThresholdPolicy
from tests.fault_server import FaultServer

pytest.importorskip("pydantic")

CAL = ["What is 2 + 2?", "Who wrote Hamlet?", "Say yes or no.", "hello world"]


def _write(tmp_path, text: str, name: str = "confroute.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A tiny edge model folder and a saved router that escalates every prompt."""
    from confroute.models.hf import HFLanguageModel
    from tests.tiny_models import save_causal_lm

    root = tmp_path_factory.mktemp("deploy")
    model_dir = save_causal_lm(root / "edge")
    edge = HFLanguageModel(str(model_dir), use_chat_template=False)
    est = SequenceLogProb(max_new_tokens=4)
    got = est.estimate(CAL, edge)
    router = Router(est, "isotonic", ThresholdPolicy(min_p_good=1.0), edge=edge,
                    edge_max_new_tokens=4, cloud_config=GenerationConfig(max_new_tokens=8))
    router.calibrate(CAL * 2, [1] * 4 + [0] * 4, samples=got.samples * 2)
    router.save(root / "router.json")
    return root


CONFIG = """\
    [edge]
    path = "edge"
    [edge.options]
    use_chat_template = false
    name = "${EDGE_NAME:-tiny-edge}"

    [[clouds]]
    model = "big"
    name = "primary"
    base_url = "${PRIMARY_URL}"
    api_key_env = "CONFROUTE_TEST_KEY"
    headers = { X-Team = "${TEAM:-research}" }
    timeout = 5
    max_retries = 0
    max_retry_time = 2.5
    logprobs = false
    max_concurrency = 4
    price_table = { prompt = 1.0, completion = 2.0 }

    [[clouds]]
    model = "backup"
    name = "fallback"
    base_url = "${FALLBACK_URL}"
    api_key_env = "CONFROUTE_TEST_KEY"

    [router]
    path = "router.json"
    on_cloud_error = "error"

    [budget]
    max_cloud_cost = 5.0
    period = "1d"

    [server]
    host = "127.0.0.2"
    port = 8123
    model_name = "cr"
"""


def test_file_with_env_expansion_builds_a_working_router(deployment, monkeypatch):
    path = _write(deployment, CONFIG)
    with FaultServer() as primary, FaultServer() as fallback:
        monkeypatch.setenv("PRIMARY_URL", primary.base_url)
        monkeypatch.setenv("FALLBACK_URL", fallback.base_url)
        monkeypatch.setenv("CONFROUTE_TEST_KEY", "sk-test-123")
        monkeypatch.delenv("TEAM", raising=False)
        cfg = load_config(path)
        router, serve = cfg.build()
        assert [c.name for c in router.clouds] == ["primary", "fallback"]
        p = router.clouds[0]
        assert (p.base_url, p.timeout, p.max_retries, p.max_retry_time, p.logprobs,
                p.max_concurrency, p.price_table) == (
            primary.base_url, 5.0, 0, 2.5, False, 4, {"prompt": 1.0, "completion": 2.0})
        assert router.edge.name == "tiny-edge" and router.on_cloud_error == "error"
        (resp,) = router(["What is the capital of France?"])
        sent = primary.requests[0]
    assert (resp.source, resp.answered_by, resp.error) == ("cloud", "primary", None)
    assert resp.cost > 0  # priced by the primary's price table
    assert sent.headers["X-Team"] == "research"  # the ${TEAM:-research} default
    assert sent.headers["Authorization"] == "Bearer sk-test-123"
    assert "logprobs" not in sent.body  # logprobs = false: not requested
    assert (serve.host, serve.port, serve.model_name) == ("127.0.0.2", 8123, "cr")
    assert serve.app_kwargs() == {"model_name": "cr", "max_cloud_fraction": None,
                                  "max_cloud_cost": 5.0, "period": "1d", "prices": None}
    assert "sk-test" not in repr(cfg)


def test_defaults_and_dollar_escape(tmp_path, monkeypatch):
    monkeypatch.setenv("M", "gpt-x")
    cfg = load_config(_write(tmp_path, """\
        [[clouds]]
        model = "${M}"
        system_prompt = "cost: $${NOT_A_VAR}"
    """))
    assert cfg.edge == {"path": "embedded", "options": {}}
    assert cfg.router == {"path": None, "on_cloud_error": None}
    (cloud,) = cfg.build_clouds()
    assert cloud.model == "gpt-x" and cloud.system_prompt == "cost: ${NOT_A_VAR}"
    assert (cloud.timeout, cloud.max_retries, cloud.logprobs) == (30.0, 4, True)


@pytest.mark.parametrize(("body", "where", "got"), [
    ('[[clouds]]\nmodel = "a"\n[[clouds]]\nmodel = "b"\ntimeout = -1\n',
     r"clouds\[1\]\.timeout", "Got -1"),
    ('[[clouds]]\nmodel = "a"\ntimout = 3\n', r"clouds\[0\]\.timout", "unknown key"),
    ('[[clouds]]\nbase_url = "http://x/v1"\n', r"clouds\[0\]\.model", "required"),
    ('[[clouds]]\nmodel = "a"\nmax_concurrency = "8"\n', r"clouds\[0\]\.max_concurrency",
     "'8'"),
    ('[[clouds]]\nmodel = "a"\nlogprobs = "off"\n', r"clouds\[0\]\.logprobs", "'off'"),
    ('[[clouds]]\nmodel = "a"\nprice_table = { prompt = 1 }\n',
     r"clouds\[0\]\.price_table\.completion", "required"),
    ('[[clouds]]\nmodel = "a"\nendpoint = "responses"\n', r"clouds\[0\]\.endpoint",
     "'responses'"),
    ('[budget]\nmax_cloud_fraction = 1.5\n', r"budget\.max_cloud_fraction", "1.5"),
    ('[server]\nport = 70000\n', r"server\.port", "70000"),
    ('[router]\non_cloud_error = "ignore"\n', r"router\.on_cloud_error", "'ignore'"),
    ('[edgy]\npath = "x"\n', r"'edgy'", "unknown key"),
])
def test_each_bad_key_is_a_typed_error_naming_its_path(tmp_path, body, where, got):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError, match=where) as info:
        load_config(path)
    assert got in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unset_variable_without_default_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CONFROUTE_UNSET_URL", raising=False)
    path = _write(tmp_path, '[[clouds]]\nmodel = "a"\nbase_url = "${CONFROUTE_UNSET_URL}"\n')
    with pytest.raises(ConfigError, match=r"'clouds\[0\]\.base_url'.*'CONFROUTE_UNSET_URL'"):
        load_config(path)


def test_secrets_are_never_echoed(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFROUTE_SECRET_PORT", "hunter2-secret")
    with pytest.raises(ConfigError, match=r"server\.port") as info:
        load_config(_write(tmp_path, '[server]\nport = "${CONFROUTE_SECRET_PORT}"\n'))
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match=r"clouds\[0\]\.headers\.Authorization") as info:
        load_config(_write(tmp_path, '[[clouds]]\nmodel = "a"\n'
                                     'headers = { Authorization = 12345678 }\n'))
    assert "12345678" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[clouds\nmodel = \n"))


def test_cli_serve_config_with_overrides(deployment, monkeypatch):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args
    from confroute.serve import serve_in_thread

    path = _write(deployment, CONFIG)
    with FaultServer() as primary, FaultServer() as fallback:
        monkeypatch.setenv("PRIMARY_URL", primary.base_url)
        monkeypatch.setenv("FALLBACK_URL", fallback.base_url)
        args = build_parser().parse_args(["serve", "--config", str(path),
                                          "--model-name", "override"])
        app = app_from_args(args)
        assert (args.host, args.port) == ("127.0.0.2", 8123)  # from the file
        with serve_in_thread(app) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
            completion = client.chat.completions.create(
                model="override", messages=[{"role": "user", "content": "What is 2 + 2?"}])
            client.close()
    info = completion.model_extra["confroute"]
    assert (info["source"], info["answered_by"]) == ("cloud", "primary")
    assert completion.choices[0].message.content.startswith("The answer is")
