"""A cascade served: ``confroute serve --config`` with a ``[cascade]`` section.

Three tiers: two tiny random causal LMs saved to disk (each with a saved,
calibrated router) and a loopback OpenAI-compatible cloud (tests/fault_server.py),
served by the real app and called with the official openai client.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confroute import ConfigError, GenerationConfig, Router, load_config
from confroute.errors import InvalidParameterError
from confroute.estimators.logprob import SequenceLogProb
from tests.fault_server import FaultServer

pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

CAL = [f"Calibration question {w}?" for w in ("one", "two", "three", "four", "five", "six")]
QUESTIONS = [f"What is {i} times {i + 3}? Say it briefly." for i in range(12)]
KEY_ENV = "CONFROUTE_TEST_CASCADE_KEY"


def _prompt(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: Any) -> Path:
    """Two tiny model folders, each with a saved router (sequence log-prob + Platt)."""
    from confroute.models.hf import HFLanguageModel
    from tests.tiny_models import save_causal_lm

    root = tmp_path_factory.mktemp("cascade")
    for name, arch in (("small", "llama"), ("medium", "gpt2")):
        edge = HFLanguageModel(str(save_causal_lm(root / name, arch=arch)),
                               use_chat_template=False)
        est = SequenceLogProb(max_new_tokens=4)
        prompts = [_prompt(q) for q in CAL]
        got = est.estimate(prompts, edge)
        router = Router(est, "platt", "threshold", edge=edge, edge_max_new_tokens=4,
                        cloud_config=GenerationConfig(max_new_tokens=8))
        scores = np.asarray(got.scores)
        labels = (scores <= np.median(scores)).astype(int)
        router.calibrate(prompts, labels, samples=got.samples)
        router.save(root / f"{name}_router.json")
    return root


def _config(root: Path, cloud_url: str, thresholds: str = "[0.5, 0.5]", **edits: str) -> Path:
    tiers = {
        "small": 'path = "small"\noptions = { use_chat_template = false }\n'
                 'router = "small_router.json"\ncost_per_call = 0.0',
        "medium": 'path = "medium"\noptions = { use_chat_template = false }\n'
                  'router = "medium_router.json"\nprice_in = 1.0\nprice_out = 2.0',
        "cloud": f'cloud = {{ model = "big", base_url = "{cloud_url}", api_key_env = '
                 f'"{KEY_ENV}", max_retries = 0, logprobs = false }}\ncost_per_call = 0.01',
    }
    tiers.update(edits)
    body = [f"[cascade]\nthresholds = {thresholds}\n"]
    body += [f'[[cascade.tiers]]\nname = "{n}"\n{t}\n' for n, t in tiers.items() if t]
    path = root / "confroute.toml"
    path.write_text("\n".join(body), encoding="utf-8")
    return path


def _expected_tiers(cascade: Any, prompts: list[Any]) -> tuple[list[int], list[float]]:
    """Thresholds that send about a third of the prompts to each tier, and the tiers."""
    p0 = cascade.tiers[0].router.predict_proba(prompts)
    p1 = cascade.tiers[1].router.predict_proba(prompts)
    t0 = float(np.quantile(p0, 2 / 3))
    rest = p1[p0 < t0]
    t1 = float(np.quantile(rest, 0.5))
    tiers = [0 if a >= t0 else 1 if b >= t1 else 2 for a, b in zip(p0, p1)]
    return tiers, [t0, t1]


def test_a_three_tier_cascade_from_the_config_served_with_the_openai_client(
        deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    openai = pytest.importorskip("openai")
    import httpx

    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args
    from confroute.serve import serve_in_thread

    monkeypatch.setenv(KEY_ENV, "local")
    prompts = [_prompt(q) for q in QUESTIONS]
    with FaultServer(model_id="big") as cloud:
        cascade = load_config(_config(deployment, cloud.base_url)).build_cascade()
        expected, thresholds = _expected_tiers(cascade, prompts)
        assert set(expected) == {0, 1, 2}  # every tier answers some of the questions
        path = _config(deployment, cloud.base_url, json.dumps(thresholds))
        # the Python API: the same config, the same decisions
        api = load_config(path).build_cascade()
        assert api.thresholds == pytest.approx(thresholds)
        assert [r.tier for r in api(prompts)] == expected
        app = app_from_args(build_parser().parse_args(["serve", "--config", str(path)]))
        with serve_in_thread(app) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
            for q, tier in zip(QUESTIONS, expected):
                raw = client.chat.completions.with_raw_response.create(
                    model="confroute", messages=[{"role": "user", "content": q}])
                completion = raw.parse()
                rec = completion.model_extra["confroute"]
                assert rec["tier"] == tier and rec["tier_name"] == ("small", "medium",
                                                                    "cloud")[tier]
                assert raw.headers["x-confroute-tier"] == str(tier)
                assert raw.headers["x-confroute-tier-name"] == rec["tier_name"]
                assert float(raw.headers["x-confroute-cost"]) == pytest.approx(rec["cost"])
                assert len(rec["tier_costs"]) == tier + 1
                assert rec["cost"] == pytest.approx(sum(rec["tier_costs"]))
                assert rec["tier_costs"][0] == 0.0
                if tier == 2:  # the loopback cloud answered, at its price
                    assert rec["tier_costs"][2] == pytest.approx(0.01)
                    assert completion.choices[0].message.content.startswith("The answer is")
                    assert completion.model == "big"
                elif tier == 1:  # per-token price of what the medium tier read and wrote
                    assert rec["tier_costs"][1] > 0
            streamed = "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model="confroute", stream=True,
                    messages=[{"role": "user", "content": QUESTIONS[0]}]) if c.choices)
            again = client.chat.completions.create(
                model="confroute", messages=[{"role": "user", "content": QUESTIONS[0]}])
            assert streamed == again.choices[0].message.content
            health = httpx.get(srv.url + "/health", timeout=10).json()
            metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    assert health["router"] == "cascade" and health["served"] == len(QUESTIONS) + 2
    counts = [expected.count(j) + 2 * (j == expected[0]) for j in range(3)]
    for j, (name, tier) in enumerate(zip(("small", "medium", "cloud"), health["tiers"])):
        assert tier["name"] == name and tier["answered"] == counts[j]
        assert tier["share"] == health["tier_shares"][name] == pytest.approx(
            counts[j] / health["served"])
        assert f'confroute_cascade_requests_total{{tier="{name}"}} {float(counts[j])}' in metrics
    assert [t["threshold"] for t in health["tiers"][:2]] == pytest.approx(thresholds)
    assert health["tiers"][2]["threshold"] is None and health["tiers"][2]["model"] == "big"


@pytest.mark.parametrize(("edits", "thresholds", "key"), [
    ({"medium": 'path = "medium"\nrouter = "medium_router.json"\ncost_per_call = 1.0'}, None,
     r"'cascade\.tiers'.*non-decreasing cost.*\[0\.0, 1\.0, 0\.01\]"),
    ({"small": 'path = "small"\nrouter = "small_router.json"\ncost_per_call = -1.0'}, None,
     r"'cascade\.tiers\[0\]\.cost_per_call'.*greater than or equal to 0"),
    ({}, "[0.5]", r"'cascade\.thresholds'.*a list of 2 numbers.*\[0\.5\]"),
    ({}, "[0.5, 1.5]", r"'cascade\.thresholds'"),
    ({"medium": 'path = "medium"\nprice_in = 1.0\nprice_out = 2.0'}, None,
     r"'cascade\.tiers\[1\]\.router'.*every tier but the last"),
    ({"small": 'path = "small"\nrouter = "small_router.json"\ncost_per_call = 0.0\n'
               'price_in = 1.0'}, None, r"'cascade\.tiers\[0\]\.cost_per_call'.*one kind"),
    ({"small": 'router = "small_router.json"\ncost_per_call = 0.0'}, None,
     r"'cascade\.tiers\[0\]\.path'.*exactly one of 'path'"),
    ({"medium": "", "cloud": ""}, "[]", r"'cascade\.tiers'.*at least 2"),
    ({"small": 'path = "small"\nrouter = "small_router.json"\ncost_per_call = 0.0\n'
               'max_share = 0.5'}, None, r"'cascade\.tiers\[0\]\.max_share'.*first tier"),
    ({"cloud": 'cloud = { model = "big" }\ncost_per_call = 1.0\nledger = "redis://h:1/0"'},
     None, r"'cascade\.tiers\[2\]\.ledger'.*only with 'max_share'"),
    ({"cloud": 'cloud = { model = "big" }\ncost_per_call = 1.0\nmax_share = 0.2\n'
               'ledger = "http://127.0.0.1:6379"'}, None,
     r"'cascade\.tiers\[2\]\.ledger'.*Redis URL"),
    ({"cloud": 'cloud = { model = "big" }\ncost_per_call = 1.0\nmax_share = 1.5'}, None,
     r"'cascade\.tiers\[2\]\.max_share'"),
])
def test_bad_cascade_configs_name_the_key_before_loading_anything(
        tmp_path: Path, edits: dict[str, str], thresholds: str | None, key: str) -> None:
    path = _config(tmp_path, "http://127.0.0.1:9/v1", thresholds or "[0.5, 0.5]", **edits)
    with pytest.raises(ConfigError, match=key):
        load_config(path)  # no model folder exists here: nothing was loaded


def test_router_options_are_refused_with_a_cascade_config(
        deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from confroute.cli import build_parser
    from confroute.cli.serve import app_from_args

    monkeypatch.setenv(KEY_ENV, "local")
    path = _config(deployment, "http://127.0.0.1:9/v1")
    for extra in (["--max-cloud-fraction", "0.3"], ["--ledger", "redis://127.0.0.1:1/0"],
                  ["--edge", str(deployment / "small")]):
        args = build_parser().parse_args(["serve", "--config", str(path), *extra])
        with pytest.raises(InvalidParameterError, match=f"'{extra[0]}'.*cascade"):
            app_from_args(args)
    with pytest.raises(ConfigError, match=r"no \[cascade\]"):
        load_config(_write_plain(deployment)).build_cascade()


CLOUD_BUDGET = ("cloud = {{ model = \"big\", base_url = \"{url}\", api_key_env = \"" + KEY_ENV
                + "\", max_retries = 0, logprobs = false }}\ncost_per_call = 0.01\n"
                "max_share = 0.25\n{ledger}")


def test_a_tier_budget_caps_who_enters_it_and_is_shown_in_health(
        deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """thresholds inf: every query wants to move on; the cloud tier's budget decides."""
    import httpx

    from confroute.serve import serve_in_thread
    from confroute.serve_cascade import create_cascade_app

    monkeypatch.setenv(KEY_ENV, "local")
    with FaultServer(model_id="big") as cloud:
        path = _config(deployment, cloud.base_url, "[inf, inf]",
                       cloud=CLOUD_BUDGET.format(url=cloud.base_url, ledger=""))
        app = create_cascade_app(load_config(path).build_cascade())
        with serve_in_thread(app) as srv:
            tiers = [httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "m", "messages": [{"role": "user", "content": q}]}).json()[
                    "confroute"] for q in QUESTIONS[:8]]
            health = httpx.get(srv.url + "/health", timeout=10).json()
    assert [r["tier"] for r in tiers].count(2) == 2  # floor(0.25 * 8)
    assert all("budget refused" in r["reason"] for r in tiers if r["tier"] == 1)
    ledger = health["tiers"][2]["ledger"]
    assert (ledger["requests"], ledger["cloud"], ledger["budget"]) == (8, 2, 0.25)
    assert health["tiers"][0]["ledger"] is None and health["tiers"][1]["ledger"] is None


def test_a_tier_budget_shared_by_two_replicas_on_redis(
        deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from confroute.errors import LedgerUnavailableError
    from tests.redis_server import REDIS_SERVER, RedisServer, free_port

    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found (apt-get install redis-server)")
    pytest.importorskip("redis")
    monkeypatch.setenv(KEY_ENV, "local")
    with FaultServer(model_id="big") as cloud, RedisServer() as server:
        ledger = f'ledger = "{server.url}"\nledger_key = "test:cascade:{free_port()}"'
        path = _config(deployment, cloud.base_url, "[inf, inf]",
                       cloud=CLOUD_BUDGET.format(url=cloud.base_url, ledger=ledger))
        replicas = [load_config(path).build_cascade() for _ in range(2)]
        got = [replicas[i % 2]([_prompt(q)])[0].tier for i, q in enumerate(QUESTIONS[:8])]
        assert got.count(2) == 2  # one budget across both: floor(0.25 * 8)
        assert replicas[0].tiers[2].policy.snapshot()[:2] == (8, 2)
        down = f'ledger = "redis://127.0.0.1:{free_port()}/0"'
        path = _config(deployment, cloud.base_url, "[inf, inf]",
                       cloud=CLOUD_BUDGET.format(url=cloud.base_url, ledger=down))
        with pytest.raises(LedgerUnavailableError, match=r"'ledger'.*unreachable"):
            load_config(path).build_cascade()


def _write_plain(root: Path) -> Path:
    path = root / "plain.toml"
    path.write_text(textwrap.dedent("""\
        [edge]
        path = "small"
        """), encoding="utf-8")
    return path
