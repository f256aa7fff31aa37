"""Hidden-state probes: capture in the decoding passes, training, persistence, routing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from confroute import Router
from confroute.errors import InvalidParameterError, NotFittedError
from confroute.estimators import (
    HiddenStateProbe,
    PromptProbe,
    SemanticEntropyProbe,
    shared_probe_fits,
)
from confroute.models import HFLanguageModel
from confroute.policies import ThresholdPolicy
from confroute.types import GenerationConfig, Prompt, Sample, Samples
from tests.tiny_models import make_causal_lm

HIDDEN = 16


def _hf(arch: str = "llama", decoding: str = "auto") -> HFLanguageModel:
    model, tok = make_causal_lm(arch, seed=0)
    return HFLanguageModel(model, tok, device="cpu", decoding=decoding)


@pytest.mark.parametrize("decoding", ["confroute", "transformers"])
def test_captured_states_equal_a_teacher_forced_pass(decoding: str) -> None:
    import torch

    lm = _hf(decoding=decoding)
    prompts = ["capital of France?", "what is two plus two, and why is it four"]
    cfg = GenerationConfig(max_new_tokens=6, hidden_layers=(0, 1, 2))
    out = lm.generate(prompts, cfg)
    plain = lm.generate(prompts, GenerationConfig(max_new_tokens=6))
    for p, got, ref_sample in zip(prompts, out, plain):
        g = got[0]
        assert g.token_ids == ref_sample[0].token_ids  # capture changes nothing
        ids = lm.tokenizer(lm.render_prompt(p), add_special_tokens=False)["input_ids"]
        full = torch.tensor([list(ids) + list(g.token_ids)])
        with torch.no_grad():
            hs = lm.model(input_ids=full, output_hidden_states=True).hidden_states
        n, start = len(g.token_ids), len(ids) - 1
        ref = np.stack([hs[j][0, start:start + n].numpy() for j in (0, 1, 2)])
        assert g.hidden_states is not None and g.hidden_states.shape == (3, n, 32)
        assert g.hidden_layers == (0, 1, 2)
        np.testing.assert_allclose(g.hidden_states, ref, atol=1e-4)
    # the prompt prefill gives the state that predicted each answer's first token
    pre = lm.prompt_hidden_states(prompts, [2])
    first = np.stack([s[0].hidden_states[2, 0] for s in out])  # type: ignore[index]
    np.testing.assert_allclose(pre[:, 0], first, atol=1e-4)


def test_layer_out_of_range_is_refused_before_decoding() -> None:
    lm = _hf()
    with pytest.raises(InvalidParameterError, match=r"config\.hidden_layers"):
        lm.generate(["a"], GenerationConfig(max_new_tokens=2, hidden_layers=(3,)))
    with pytest.raises(InvalidParameterError, match="'layers'"):
        lm.prompt_hidden_states(["a"], [])


def _planted(n: int, seed: int) -> tuple[list[Samples], np.ndarray]:
    """Greedy answers whose layer-2 mean state carries the label on a direction;
    layer 1 is noise. Returns samples and labels (1 = good)."""
    rng = np.random.default_rng(seed)
    direction = np.linspace(-1.0, 1.0, HIDDEN)
    y = rng.integers(0, 2, n)
    out = []
    for i in range(n):
        t = int(rng.integers(1, 5))
        noise = rng.normal(size=(2, t, HIDDEN))
        noise[1] += (2 * y[i] - 1) * 0.8 * direction
        g = Sample(f"a{i}", token_ids=tuple(range(t)), token_logprobs=np.zeros(t),
                   token_entropies=np.zeros(t), hidden_states=noise.astype(np.float32),
                   hidden_layers=(1, 2))
        out.append(Samples(prompt=f"q{i}", greedy=g))
    return out, y


def test_planted_signal_is_learned_on_the_right_layer() -> None:
    train, y = _planted(200, seed=0)
    test, y_test = _planted(200, seed=1)
    probe = HiddenStateProbe(layers=(1, 2), C=(0.1, 1.0)).fit(
        [s.prompt for s in train], train, y)
    assert probe.layer_ == 2 and probe.C_ in (0.1, 1.0)
    scores = probe.estimate([s.prompt for s in test], samples=test).scores
    assert roc_auc_score(1 - y_test, scores) > 0.9  # higher = more uncertain
    # out-of-fold scores are honest: also separate, but are not the in-sample ones
    oof, _ = HiddenStateProbe(layers=(1, 2), C=1.0, n_folds=4).cross_fit(
        [s.prompt for s in train], train, y)
    assert roc_auc_score(1 - y, oof) > 0.85
    mlp = HiddenStateProbe(layers=2, C=1.0, kind="mlp").fit([s.prompt for s in train], train, y)
    assert roc_auc_score(1 - y_test, mlp.estimate(
        [s.prompt for s in test], samples=test).scores) > 0.85


def test_shared_probe_fits_runs_each_search_once_with_identical_results() -> None:
    train, y = _planted(120, seed=0)
    prompts = [s.prompt for s in train]
    alone = HiddenStateProbe(layers=(1, 2), C=(0.1, 1.0), n_folds=3)
    oof_alone, _ = alone.cross_fit(prompts, train, y)
    with shared_probe_fits() as memo:
        first = HiddenStateProbe(layers=(1, 2), C=(0.1, 1.0), n_folds=3)
        oof_first, _ = first.cross_fit(prompts, train, y)
        searches = len(memo)
        assert searches == 1 + 3  # the final fit and one per fold
        second = HiddenStateProbe(layers=(1, 2), C=(0.1, 1.0), n_folds=3)
        oof_second, _ = second.cross_fit(prompts, train, y)
        assert len(memo) == searches  # nothing searched again
        HiddenStateProbe(layers=(1, 2), C=1.0, n_folds=3).fit(prompts, train, y)
        assert len(memo) == searches + 1  # other parameters: a search of its own
        HiddenStateProbe(layers=(1, 2), C=(0.1, 1.0), n_folds=3).fit(
            prompts, train, 1 - y)
        assert len(memo) == searches + 2  # other targets: a search of its own
    for got in (oof_first, oof_second):
        np.testing.assert_array_equal(got, oof_alone)
    for probe in (first, second):
        assert (probe.layer_, probe.C_, probe.cv_auroc_) == (
            alone.layer_, alone.C_, alone.cv_auroc_)
        np.testing.assert_array_equal(probe.weights_[0], alone.weights_[0])
    # outside the block a fit searches again, with the same result
    again = HiddenStateProbe(layers=(1, 2), C=(0.1, 1.0), n_folds=3)
    np.testing.assert_array_equal(again.cross_fit(prompts, train, y)[0], oof_alone)


def test_unfitted_and_bad_parameters() -> None:
    train, _ = _planted(20, seed=0)
    with pytest.raises(NotFittedError, match="fit"):
        HiddenStateProbe(layers=(1,)).estimate(["q0"], samples=train[:1])
    with pytest.raises(InvalidParameterError, match="'layers' parameter of HiddenStateProbe"):
        HiddenStateProbe().fit(["q0"], train[:1], [1])
    with pytest.raises(InvalidParameterError, match="'C' parameter"):
        HiddenStateProbe(layers=1, C=-1.0).fit(["q0"], train[:1], [1])
    with pytest.raises(InvalidParameterError, match="at least 2"):
        HiddenStateProbe(layers=1).fit(["a", "b", "c"], train[:3], [1, 1, 0])


class CountingHF(HFLanguageModel):
    """The real tiny model, recording which prompts it decoded."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.decoded: list[Prompt] = []

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig,
                 **kw: object) -> list[list[Sample]]:
        self.decoded.extend(prompts)
        return super().generate(prompts, config, **kw)  # type: ignore[arg-type]


def _prompt_set(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    good = ["capital of France is", "capital of Italy is", "The capital of"]
    bad = ["2 + 2 = 4 ####", "#### 10 0 1 2", "9 8 7 6 5 ####"]
    prompts, y = [], []
    for _ in range(n):
        k = int(rng.integers(0, 2))
        pool = good if k else bad
        prompts.append(f"{pool[int(rng.integers(0, 3))]} {int(rng.integers(0, 100))}")
        y.append(k)
    return prompts, np.array(y)


def test_router_with_prompt_probe_decides_before_decoding(tmp_path: Path) -> None:
    model, tok = make_causal_lm("llama", seed=0)
    edge = CountingHF(model, tok, device="cpu")
    prompts, y = _prompt_set(60, seed=0)
    router = Router(PromptProbe(layers=(1, 2), C=(0.1, 1.0), n_folds=3), "platt",
                    ThresholdPolicy(min_p_good=0.5), edge=edge, edge_max_new_tokens=3)
    router.calibrate(prompts, y)
    assert edge.decoded == []  # labels given and a pre-generation probe: nothing decoded
    test, y_test = _prompt_set(40, seed=1)
    decisions = router.decide(test)
    p = np.array([d.p_good for d in decisions])
    assert roc_auc_score(y_test, p) > 0.9
    kept = [d.prompt for d in decisions if d.source == "edge"]
    assert 0 < len(kept) < len(test)
    assert edge.decoded == kept  # escalated prompts were never decoded
    assert all((d.edge_answer is None) == (d.source == "cloud") for d in decisions)
    # saved as JSON with inlined arrays, loaded, decides the same
    path = tmp_path / "router.json"
    router.save(path)
    assert b"pickle" not in path.read_bytes() and b'"signature"' in path.read_bytes()
    again = Router.load(path, edge=_hf())
    np.testing.assert_allclose([d.p_good for d in again.decide(test)], p, atol=1e-9)
    # a probe applied to another model is refused, naming the model
    with pytest.raises(InvalidParameterError, match="'model' parameter of PromptProbe"):
        Router.load(path, edge=_hf("gpt2")).decide(test[:2])


def test_router_cross_fits_post_generation_probe() -> None:
    edge = _hf()
    prompts, y = _prompt_set(40, seed=2)
    probe = HiddenStateProbe(layers=(2,), C=1.0, n_folds=3, max_new_tokens=3)
    router = Router([probe, "sequence_logprob"], "platt", "threshold", edge=edge,
                    edge_max_new_tokens=3)
    router.calibrate(prompts, y)
    assert probe.layer_ == 2 and probe.signature_["architecture"] == "LlamaForCausalLM"
    d = router.decide(prompts[:4])
    assert all(set(x.scores) == {"hidden_state_probe", "sequence_logprob"} for x in d)


def test_post_generation_probe_refuses_another_model_before_decoding(tmp_path: Path) -> None:
    prompts, y = _prompt_set(40, seed=2)
    probe = HiddenStateProbe(layers=(2,), C=1.0, n_folds=3, max_new_tokens=3)
    router = Router(probe, "isotonic", "threshold", edge=_hf(), edge_max_new_tokens=3)
    router.calibrate(prompts, y)
    router.save(tmp_path / "router.json")
    model, tok = make_causal_lm("gpt2", seed=0)
    other = CountingHF(model, tok, device="cpu")
    loaded = Router.load(tmp_path / "router.json", edge=other)
    for call in (lambda: probe.estimate(prompts[:2], other),
                 lambda: loaded.decide(prompts[:2])):
        with pytest.raises(InvalidParameterError, match="'model' parameter of HiddenStateProbe"):
            call()
    assert other.decoded == []  # refused before any decoding


def test_semantic_entropy_probe_needs_no_labels() -> None:
    from confroute.estimators import SemanticEntropy

    se = SemanticEntropy(n_samples=4, equivalence="exact", max_new_tokens=3, seed=0)
    probe = SemanticEntropyProbe(layers=(1, 2), semantic=se, n_folds=3, max_new_tokens=3)
    assert len(probe.sample_requests()) == 2  # greedy + the sampling for its target
    train, y = _planted(120, seed=4)
    key = se.sample_requests()[0].sampling.sampling_key()  # type: ignore[union-attr]

    def with_draws(samples: list[Samples], y: np.ndarray) -> list[Samples]:
        # answers the model is sure of agree; the others scatter (high semantic entropy)
        return [Samples(prompt=s.prompt, greedy=s.greedy, draws={key: tuple(
            Sample("Paris" if y[i] else f"city {i} {k}") for k in range(4))})
            for i, s in enumerate(samples)]

    probe.fit([s.prompt for s in train], with_draws(train, y))  # no labels at all
    assert len(probe.sample_requests()) == 1  # serving: the greedy answer only
    assert probe.layer_ == 2
    test, y_test = _planted(100, seed=5)
    scores = probe.estimate([s.prompt for s in test], samples=test).scores
    assert roc_auc_score(1 - y_test, scores) > 0.9


def test_option_entropy_on_a_real_model() -> None:
    from confroute.estimators import OptionEntropy, parse_options

    q = "Which is a capital?\nA. Paris\nB) Rome\n(C) 42\nD: four\nAnswer:"
    assert parse_options(q, "ABCDE") == ["A", "B", "C", "D"]
    assert parse_options("no options here", "ABCDE") == []
    lm = _hf()
    out = OptionEntropy().estimate([q, "no options"], lm)
    assert 0.0 <= out.scores[0] <= np.log(4) + 1e-9 and np.isnan(out.scores[1])
    assert out.n_unscored == 1 and out.details["n_options"].tolist() == [4.0, 0.0]
    ll = np.array([float(np.sum(lm.score([q], [" " + c])[0])) for c in "ABCD"])
    assert out.details["choice"][0] == float(np.argmax(ll))  # the most likely option
    p = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
    assert out.scores[0] == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-5)


def test_semantic_entropy_target_survives_ties_at_the_top() -> None:
    from confroute.estimators.probes import _balanced_cut

    se = np.array([np.log(5)] * 70 + [0.0] * 20 + [np.log(2)] * 10)  # median ties the maximum
    cut = _balanced_cut(se)
    assert 0 < np.mean(se > cut) < 1 and cut == pytest.approx(np.log(2))
    assert _balanced_cut(np.array([0.1, 0.5, 0.9])) == 0.5  # no ties: the median
    assert np.isnan(_balanced_cut(np.array([np.nan])))
