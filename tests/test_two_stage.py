"""TwoStageRouter: a query-only gate in front of a post-generation Router."""

from __future__ import annotations

import math

import numpy as np
import pytest

from confroute.errors import (
    CloudError,
    InvalidParameterError,
    InvalidTypeError,
    NotFittedError,
    SerializationError,
)
from confroute.predictive import KNNRouter, QueryRouterEstimator
from confroute.predictive.two_stage import TwoStageRouter, TwoStageStats
from confroute.router import Router
from confroute.types import GenerationConfig, Sample


class HashEmbedder:
    """Deterministic tiny encoder: character codes hashed into a unit vector."""

    def __init__(self, dim: int = 16, name: str = "hash16") -> None:
        self.dim = dim
        self.name = name

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for j, ch in enumerate(t):
                out[i, (ord(ch) * 31 + j) % self.dim] += 1.0
            out[i, 0] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class CountingModel:
    """A fake edge model: answers 'a <prompt>' with a logprob that depends on the prompt,
    and records every prompt it was asked to generate for."""

    def __init__(self, name: str = "edge") -> None:
        self.name = name
        self.seen: list[str] = []
        self.calls = 0

    def generate(self, prompts, config: GenerationConfig):
        self.calls += 1
        out = []
        for p in prompts:
            self.seen.append(p)
            lp = -0.05 if "easy" in p else -2.0
            n = config.n
            out.append([Sample(text=f"a {p}", token_ids=(1, 2),
                               token_logprobs=np.array([lp, lp], dtype=np.float32))] * n)
        return out


class FakeCloud:
    name = "cloud"

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.seen: list[str] = []

    def generate(self, prompts, config):
        self.seen.extend(prompts)
        if self.fail_on is not None and any(self.fail_on in p for p in prompts):
            if len(prompts) == 1:
                raise CloudError("boom", reason="http_500", status=500)
            raise CloudError("batch failed", reason="http_500", status=500)
        return [[Sample(text=f"cloud answer to {p}", token_ids=(1,))] for p in prompts]


HARD = [f"prove theorem {i} about {w}" for i, w in enumerate("abcdefghij")]
EASY = [f"easy hi {w}{w}" for w in "abcdefghij"]
MID = [f"hard but fine {w}" for w in "abcdefghij"]


@pytest.fixture()
def gate():
    enc = HashEmbedder()
    X = enc.encode(HARD + EASY + MID)
    return KNNRouter(k=1).fit(X, ["strong"] * 10 + ["weak"] * 20)


@pytest.fixture()
def post():
    edge = CountingModel()
    router = Router("sequence_logprob", "isotonic", "threshold", edge=edge, cloud=FakeCloud())
    prompts = EASY[:5] + MID[:5]
    router.calibrate(prompts, [1] * 5 + [0] * 5)
    edge.seen.clear()
    edge.calls = 0
    return router


def test_gate_escalated_prompts_never_reach_the_edge(gate, post):
    ts = TwoStageRouter(gate, post, gate_threshold=0.5, embedder=HashEmbedder())
    prompts = [HARD[0], EASY[1], HARD[2], MID[3], EASY[4]]
    decisions = ts.route(prompts)
    edge = post.edge
    assert all(p not in edge.seen for p in (HARD[0], HARD[2]))
    assert sorted(set(edge.seen)) == sorted({EASY[1], MID[3], EASY[4]})
    assert [d.source for d in decisions] == ["cloud", "edge", "cloud", "cloud", "edge"]
    for i in (0, 2):
        d = decisions[i]
        assert d.reason.startswith("stage 1 (gate)") and d.edge_answer is None
        assert math.isnan(d.p_good) and d.scores["gate"] == 1.0
    for i in (1, 3, 4):
        d = decisions[i]
        assert d.reason.startswith("stage 2 (post-generation)")
        assert d.edge_answer == f"a {prompts[i]}" and "sequence_logprob" in d.scores
    # stage 2 matches the post-generation router on its own
    alone = post.route([EASY[1], MID[3], EASY[4]])
    assert [d.source for d in alone] == [decisions[i].source for i in (1, 3, 4)]
    assert [d.p_good for d in alone] == [decisions[i].p_good for i in (1, 3, 4)]
    s = ts.last_stats
    assert s is not None
    assert (s.n_prompts, s.n_gate_escalated, s.n_stage2_escalated, s.n_edge_served) == (5, 2, 1, 2)
    assert s.edge_generations_avoided == 2 and s.cloud_calls == 0
    assert s.gate_seconds > 0 and s.edge_seconds > 0


def test_call_answers_and_accounts(gate, post):
    ts = TwoStageRouter(QueryRouterEstimator(gate, embedder=HashEmbedder()), post,
                        gate_threshold=0.5)
    prompts = [HARD[0], EASY[1], MID[3]]
    resp = ts(prompts)
    assert [r.source for r in resp] == ["cloud", "edge", "cloud"]
    assert resp[0].text == f"cloud answer to {HARD[0]}" and resp[1].text == f"a {EASY[1]}"
    assert post.cloud.seen == [HARD[0], MID[3]]
    assert HARD[0] not in post.edge.seen
    s = ts.last_stats
    assert s is not None and s.cloud_calls == 2 and s.cloud_failures == 0
    assert s.cloud_seconds >= 0
    ts(prompts)
    assert ts.stats.n_prompts == 6 and ts.stats.cloud_calls == 4
    assert ts.stats.edge_generations_avoided == 2


def test_cloud_failure_handling(gate, post):
    post.cloud = FakeCloud(fail_on="theorem")
    ts = TwoStageRouter(gate, post, gate_threshold=0.5, embedder=HashEmbedder())
    resp = ts([HARD[0], MID[3], EASY[1]])
    # the gate-escalated prompt has no edge answer to fall back to
    assert resp[0].text is None and resp[0].error and "http_500" in resp[0].error
    assert resp[1].source == "cloud" and resp[1].text == f"cloud answer to {MID[3]}"
    assert ts.last_stats is not None and ts.last_stats.cloud_failures == 1
    post.on_cloud_error = "raise"
    with pytest.raises(CloudError):
        ts([HARD[0], EASY[1]])


def test_gate_share_calibration(gate, post):
    ts = TwoStageRouter(gate, post, gate_share=0.3, embedder=HashEmbedder())
    with pytest.raises(NotFittedError, match="calibrate_gate"):
        ts.route([EASY[0]])
    ts.calibrate_gate(HARD[:3] + EASY + MID)
    assert ts.gate_threshold_ is not None and ts.gate_share_interval_ is not None
    decisions = ts.route(HARD[:3] + EASY[:7])
    assert sum(d.reason.startswith("stage 1") for d in decisions) <= 3
    fixed = TwoStageRouter(gate, post, gate_threshold=0.5, embedder=HashEmbedder())
    with pytest.raises(InvalidParameterError, match="gate_share"):
        fixed.calibrate_gate(EASY)


def test_save_load_identical_decisions(gate, post, tmp_path):
    ts = TwoStageRouter(gate, post, gate_share=0.2, embedder=HashEmbedder())
    ts.calibrate_gate(HARD[:4] + EASY + MID)
    prompts = [HARD[0], EASY[1], MID[2], HARD[5], EASY[6], MID[7]]
    before = ts.route(prompts)
    path = tmp_path / "ts.json"
    ts.save(path)
    edge = CountingModel()
    loaded = TwoStageRouter.load(path, edge=edge, cloud=FakeCloud(), embedder=HashEmbedder())
    after = loaded.route(prompts)
    assert [(d.source, d.reason, d.edge_answer) for d in before] == [
        (d.source, d.reason, d.edge_answer) for d in after
    ]
    np.testing.assert_array_equal([d.p_good for d in before], [d.p_good for d in after])
    assert loaded.gate_threshold_ == ts.gate_threshold_
    assert loaded.gate_share_interval_ == ts.gate_share_interval_
    # the embedder must be passed again, and be the same one
    with pytest.raises(InvalidParameterError, match="'embedder' parameter"):
        TwoStageRouter.load(path, edge=edge)
    with pytest.raises(InvalidParameterError, match="hash16"):
        TwoStageRouter.load(path, edge=edge, embedder=HashEmbedder(name="other"))
    # tampering is detected
    text = path.read_text().replace('"gate_share": 0.2', '"gate_share": 0.9')
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(SerializationError, match="checksum"):
        TwoStageRouter.load(bad, edge=edge, embedder=HashEmbedder())


def test_constructor_errors(gate, post):
    with pytest.raises(InvalidParameterError, match="exactly one"):
        TwoStageRouter(gate, post)
    with pytest.raises(InvalidParameterError, match="exactly one"):
        TwoStageRouter(gate, post, gate_threshold=0.5, gate_share=0.2)
    with pytest.raises(InvalidTypeError, match="'gate' parameter"):
        TwoStageRouter("gate", post, gate_threshold=0.5)
    with pytest.raises(InvalidTypeError, match="'router' parameter"):
        TwoStageRouter(gate, object(), gate_threshold=0.5)
    with pytest.raises(InvalidParameterError, match="'gate_share' parameter"):
        TwoStageRouter(gate, post, gate_share=1.5)
    uncalibrated = Router("sequence_logprob", edge=CountingModel())
    ts = TwoStageRouter(gate, uncalibrated, gate_threshold=0.5, embedder=HashEmbedder())
    with pytest.raises(NotFittedError, match=r"router\.calibrate"):
        ts.route([EASY[0]])


def test_stats_add():
    a = TwoStageStats(n_prompts=2, gate_seconds=0.5)
    a.add(TwoStageStats(n_prompts=3, cloud_calls=1, gate_seconds=0.25))
    assert a.as_dict()["n_prompts"] == 5 and a.cloud_calls == 1 and a.gate_seconds == 0.75


def test_tiny_hf_edge_never_generates_for_gated(gate, tmp_path):
    """End to end on a real (tiny, random) transformers edge model."""
    from confroute.models.hf import HFLanguageModel
    from tests.tiny_models import save_causal_lm

    path = save_causal_lm(tmp_path / "lm")
    hf = HFLanguageModel(path, device="cpu")
    seen: list[str] = []
    orig = hf.generate

    def spy(prompts, config):
        seen.extend(prompts)
        return orig(prompts, config)

    hf.generate = spy  # type: ignore[method-assign]
    router = Router("sequence_logprob", "isotonic", "threshold", edge=hf, cloud=FakeCloud(),
                    edge_max_new_tokens=4)
    router.calibrate(EASY[:4] + MID[:4], [1, 0, 1, 0, 1, 0, 1, 0])
    seen.clear()
    ts = TwoStageRouter(gate, router, gate_threshold=0.5, embedder=HashEmbedder())
    resp = ts([HARD[1], EASY[2], HARD[3]])
    assert seen == [EASY[2]]
    assert resp[0].source == "cloud" and resp[2].source == "cloud"
    assert resp[0].decision.reason.startswith("stage 1")


def test_stage2_budget_tickets_are_settled_through_the_two_stage_call(gate):
    from confroute.policies import BudgetPolicy

    edge = CountingModel()
    policy = BudgetPolicy(max_cloud_fraction=1.0)  # enforced: every admission gets a ticket
    post = Router("sequence_logprob", "isotonic", policy, edge=edge,
                  cloud=FakeCloud(fail_on="hard"))
    post.calibrate(EASY[:5] + MID[:5], [1] * 5 + [0] * 5)
    ts = TwoStageRouter(gate, post, gate_threshold=0.5, embedder=HashEmbedder())
    decisions = ts.route([HARD[0], EASY[1], MID[3]])
    assert decisions[0].ticket is None  # the gate admits nothing to the stage-2 ledger
    assert decisions[2].ticket is not None and decisions[2].ticket.escalate
    assert policy.snapshot().cloud == 1
    resp = ts([HARD[1], EASY[2], MID[4]])  # MID[4] escalates at stage 2 and its call fails
    assert resp[2].cloud_error is not None and resp[2].degraded
    assert resp[0].cloud_error is None and resp[0].source == "cloud"
    assert ts.last_stats is not None and ts.last_stats.cloud_failures == 1
    assert policy.snapshot().cloud == 1  # the failed call's ticket was given back


def test_saved_file_embeds_the_router_dict(gate, post, tmp_path):
    from confroute._serialization import read_file

    ts = TwoStageRouter(gate, post, gate_threshold=0.5, embedder=HashEmbedder())
    path = tmp_path / "ts.json"
    ts.save(path)
    saved = read_file(path, "two_stage_router")["router"]
    expected = post.to_dict()
    assert saved["policy"] == expected["policy"] and saved["calibration"] == expected["calibration"]
    assert list(tmp_path.iterdir()) == [path]
