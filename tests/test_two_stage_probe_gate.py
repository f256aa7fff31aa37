"""TwoStageRouter with a PromptProbe gate: escalate after one prefill, never decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confroute.errors import NotFittedError
from confroute.estimators import PromptProbe
from confroute.models import HFLanguageModel
from confroute.predictive import TwoStageRouter
from tests.tiny_models import make_causal_lm, split_router

WORDS = ["apple", "river", "stone", "cloud", "paris", "seven", "green", "music", "table",
         "horse", "light", "north", "winter", "bread", "glass", "money"]


class RecordingLM(HFLanguageModel):
    """The tiny model, recording every prompt it decodes."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.decoded: list[str] = []

    def generate(self, prompts, config):  # type: ignore[no-untyped-def]
        self.decoded += list(prompts)
        return super().generate(prompts, config)


@pytest.fixture(scope="module")
def lm() -> RecordingLM:
    model, tok = make_causal_lm("llama", seed=0)
    return RecordingLM(model, tok, device="cpu", use_chat_template=False)


def _prompts(n: int, start: int = 0) -> list[str]:
    return [f"tell me {i} about the {WORDS[i % 16]} {WORDS[(i * 7) % 16]}"
            for i in range(start, start + n)]


def test_prompt_probe_gate_escalates_without_decoding(lm: RecordingLM, tmp_path: Path) -> None:
    train = _prompts(40)
    y = (np.random.default_rng(0).random(40) < 0.5).astype(int)
    probe = PromptProbe(layers=(1, 2), n_folds=3).fit(train, labels=y, model=lm)
    router, _, _ = split_router(lm, _prompts(12, 100))
    ts = TwoStageRouter(probe, router, gate_share=0.3).calibrate_gate(train)
    queries = _prompts(20, 200)
    lm.decoded.clear()
    decisions = ts.route(queries)
    g = ts.gate_scores(queries)
    gated = [d for d in decisions if d.reason.startswith("stage 1 (gate)")]
    assert len(gated) == int((g > ts.gate_threshold_).sum()) > 0
    assert ts.last_stats is not None and ts.last_stats.n_gate_escalated == len(gated)
    for d in gated:
        assert d.source == "cloud" and d.edge_answer is None and "one prefill" in d.reason
        assert d.prompt not in lm.decoded  # escalated before any token was decoded
    stage2 = [d for d in decisions if d not in gated]
    assert stage2 and all(d.prompt in lm.decoded for d in stage2)
    assert all(d.reason.startswith("stage 2") and "gate" in d.scores for d in stage2)

    path = tmp_path / "two_stage.json"
    ts.save(path)
    loaded = TwoStageRouter.load(path, edge=lm)
    assert [d.source for d in loaded.route(queries)] == [d.source for d in decisions]
    np.testing.assert_allclose(loaded.gate_scores(queries), g)


def test_unfitted_prompt_probe_gate_is_refused(lm: RecordingLM) -> None:
    router, _, _ = split_router(lm, _prompts(12, 100))
    with pytest.raises(NotFittedError, match="PromptProbe is not fitted"):
        TwoStageRouter(PromptProbe(layers=(1,)), router, gate_threshold=0.5)
