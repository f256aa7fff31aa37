"""Early escalation stops the edge answer early without changing any decision."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from confroute import Router
from confroute.early import EarlyEscalation
from confroute.errors import InvalidParameterError, NotFittedError
from confroute.estimators import MeanTokenEntropy, SemanticEntropy, SequenceLogProb
from confroute.models.hf import HFLanguageModel
from confroute.policies import BudgetPolicy, ThresholdPolicy
from confroute.types import GenerationConfig

CALIBRATION = [
    "The capital of France is", "hi", "Question: who wrote Hamlet? Answer:", "Two plus two",
    "The capital of Italy is", "hello world", "What is the answer?", "A B C D",
    "I am confident", "user assistant", "yes no maybe", "0 1 2 3",
]
TEST = ["The capital of", "Two plus", "Who wrote Hamlet?", "hello", "What is 2 + 2?",
        "true false", "Confidence: 75%", "this is a tiny model"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def edge(tiny_llama):
    """A peaked copy of the tiny Llama: confident steps mixed with uncertain ones
    and EOS at varying steps, so total NLLs spread out."""
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
        model.get_input_embeddings().weight[tok.eos_token_id].mul_(3.0)
    return HFLanguageModel(model, tok, device="cpu", use_chat_template=False)


def _router(edge, estimator, min_p_good=0.5, policy=None, quantile=0.5):
    router = Router(estimator, "isotonic", policy or ThresholdPolicy(min_p_good=min_p_good),
                    edge=edge, edge_max_new_tokens=MAX_NEW)
    scores = estimator.estimate(CALIBRATION, edge).scores
    # Label the answers with a below-quantile score good: P(good) falls with the score.
    labels = (scores <= np.quantile(scores, quantile)).astype(int)
    return router.calibrate(CALIBRATION, labels)


@pytest.fixture(scope="module")
def nll_router(edge):
    return _router(edge, SequenceLogProb(MAX_NEW, normalize=False))


def _full_and_early(router, prompts, **kwargs):
    full = router.route(prompts)
    early = EarlyEscalation(router, **kwargs)
    samples = early.generate(prompts)
    stopped = router.route(prompts, samples=samples)
    return full, stopped, samples, early


def test_stop_score_separates_the_decision(nll_router):
    early = EarlyEscalation(nll_router)
    s = early.stop_score()
    assert np.isfinite(s)
    p = nll_router.calibrator.p_good(np.array([s, s + 1.0, s * (1 - 1e-6)]))
    assert p[0] < 0.5 and p[1] < 0.5
    assert p[2] >= 0.5


def test_decisions_equal_full_generation_and_stop_earlier(nll_router):
    full, stopped, samples, early = _full_and_early(nll_router, TEST + CALIBRATION)
    assert [d.source for d in stopped] == [d.source for d in full]
    assert early.n_early_stopped_ > 0
    greedy = nll_router.edge.generate(TEST + CALIBRATION, GenerationConfig(max_new_tokens=MAX_NEW))
    for d, s, g in zip(full, samples, greedy):
        if s.greedy.finish_reason == "early_stop":
            assert d.source == "cloud"
            assert s.greedy.n_tokens < g[0].n_tokens
            assert s.greedy.token_ids == g[0].token_ids[: s.greedy.n_tokens]
        else:
            assert s.greedy.token_ids == g[0].token_ids


def test_everything_escalating_stops_after_the_first_tokens(edge):
    router = _router(edge, SequenceLogProb(MAX_NEW, normalize=False), min_p_good=0.99,
                     quantile=0.05)
    full, stopped, samples, _ = _full_and_early(router, TEST)
    assert all(d.source == "cloud" for d in full)
    assert [d.source for d in stopped] == [d.source for d in full]
    lengths = [s.greedy.n_tokens for s in samples]
    full_lengths = [n.greedy.n_tokens for n in router._estimate(TEST, None, need_greedy=True)[1]]
    assert sum(lengths) < sum(full_lengths)


def test_nothing_settled_means_no_early_stop(edge):
    router = _router(edge, SequenceLogProb(MAX_NEW, normalize=False), min_p_good=0.0)
    early = EarlyEscalation(router)
    assert early.stop_score() == np.inf
    samples = early.generate(TEST)
    assert all(s.greedy.finish_reason != "early_stop" for s in samples)


@pytest.mark.parametrize("estimator", [SequenceLogProb(MAX_NEW), MeanTokenEntropy(MAX_NEW)])
def test_sound_bound_for_normalised_scores(edge, estimator):
    router = _router(edge, estimator, quantile=0.25)
    full, stopped, _, _ = _full_and_early(router, TEST + CALIBRATION, mode="sound")
    assert [d.source for d in stopped] == [d.source for d in full]


def test_heuristic_mode_stops_at_least_as_early(edge):
    router = _router(edge, SequenceLogProb(MAX_NEW), quantile=0.25)
    sound = EarlyEscalation(router, mode="sound").generate(TEST + CALIBRATION)
    heur = EarlyEscalation(router, mode="heuristic", min_tokens=2).generate(TEST + CALIBRATION)
    assert sum(s.greedy.n_tokens for s in heur) <= sum(s.greedy.n_tokens for s in sound)
    # A stopped answer always escalates on its own (prefix) score.
    decisions = router.route(TEST + CALIBRATION, samples=heur)
    for d, s in zip(decisions, heur):
        if s.greedy.finish_reason == "early_stop":
            assert d.source == "cloud"


def test_refuses_online_budget_policy(edge):
    router = _router(edge, SequenceLogProb(MAX_NEW, normalize=False),
                     policy=BudgetPolicy(max_cloud_fraction=0.5))
    with pytest.raises(InvalidParameterError, match="fixed threshold"):
        EarlyEscalation(router).stop_score()


def test_refuses_estimators_without_running_bound(edge):
    router = Router(SemanticEntropy(n_samples=2, equivalence="exact"), edge=edge)
    with pytest.raises(InvalidParameterError, match="no running bound"):
        EarlyEscalation(router).rule()


def test_refuses_increasing_calibrator(edge):
    est = SequenceLogProb(MAX_NEW, normalize=False)
    router = Router(est, "isotonic", ThresholdPolicy(), edge=edge)
    scores = est.estimate(CALIBRATION, edge).scores
    router.calibrate(CALIBRATION, (scores >= np.median(scores)).astype(int))
    with pytest.raises(InvalidParameterError, match="does not increase"):
        EarlyEscalation(router).stop_score()


def test_needs_a_calibrated_router(edge):
    with pytest.raises(NotFittedError, match="calibrate"):
        EarlyEscalation(Router(SequenceLogProb(), edge=edge)).stop_score()


def test_early_stop_only_for_greedy_without_stop_strings(edge):
    def rule(n, nll, ent):
        return nll > 0

    with pytest.raises(InvalidParameterError, match="early_stop"):
        edge.generate(["hi"], GenerationConfig(temperature=1.0, n=2), early_stop=rule)
    with pytest.raises(InvalidParameterError, match="early_stop"):
        edge.generate(["hi"], GenerationConfig(stop=("x",)), early_stop=rule)


def test_early_stopped_sample_records_running_statistics(edge):
    seen: list[tuple[int, float]] = []

    def rule(n, nll, ent):
        seen.append((n, float(nll[0])))
        return np.array([n >= 3])

    out = edge.generate(["The capital of"], GenerationConfig(max_new_tokens=MAX_NEW),
                        early_stop=rule)[0][0]
    full = edge.generate(["The capital of"], GenerationConfig(max_new_tokens=MAX_NEW))[0][0]
    if full.n_tokens > 3 and out.finish_reason == "early_stop":
        assert out.n_tokens == 3
        np.testing.assert_allclose(-out.sum_logprob, seen[2][1], rtol=1e-6)
        np.testing.assert_allclose(out.token_logprobs, full.token_logprobs[:3], atol=1e-6)
    else:  # EOS came first: a natural stop is never relabelled
        assert out.finish_reason == full.finish_reason


def test_early_stop_when_padding_is_the_eos_token(tiny_llama):
    model, tok = tiny_llama
    tok = copy.deepcopy(tok)
    tok.pad_token = tok.eos_token
    lm = HFLanguageModel(model, tok, device="cpu", use_chat_template=False)
    prompts = ["The capital of", "hello"]
    out = lm.generate(prompts, GenerationConfig(max_new_tokens=MAX_NEW),
                      early_stop=lambda n, nll, ent: np.full(nll.shape, n >= 2))
    full = lm.generate(prompts, GenerationConfig(max_new_tokens=MAX_NEW))
    for o, f in zip(out, full):
        if f[0].n_tokens > 2:
            assert o[0].finish_reason == "early_stop" and o[0].n_tokens == 2
            assert o[0].token_ids == f[0].token_ids[:2]
