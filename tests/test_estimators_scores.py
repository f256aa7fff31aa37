"""Exact scores of each estimator on hand-built samples, and their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confroute.errors import EstimationError, InvalidParameterError, InvalidTypeError
from confroute.estimators import (
    EmbeddingEquivalence,
    EnsembleEstimator,
    ExactMatchEquivalence,
    MeanTokenEntropy,
    SelfConsistency,
    SemanticEntropy,
    SequenceLogProb,
    VerbalizedConfidence,
    answer_agreement,
    estimate_many,
    parse_confidence,
    semantic_entropy_from_clusters,
)
from confroute.types import Sample, Samples
from tests.test_estimators_support import TrigramEmbedder, sample


def _greedy_only(*greedy: Sample) -> list[Samples]:
    return [Samples(prompt=f"q{i}", greedy=g) for i, g in enumerate(greedy)]


def _with_draws(est: SemanticEntropy | SelfConsistency, texts: list[str],
                logprobs: list[float] | None = None, prompt: str = "q") -> Samples:
    cfg = est._sampling_config()
    lps = logprobs or [-0.5] * len(texts)
    draws = {cfg.sampling_key(): tuple(sample(t, logprob=lp) for t, lp in zip(texts, lps))}
    return Samples(prompt=prompt, greedy=sample(texts[0]), draws=draws)


# ------------------------------------------------------------------ logprob


def test_mean_token_entropy_exact() -> None:
    g1 = Sample("a", token_ids=(1, 2), token_logprobs=np.array([-1.0, -3.0]),
                token_entropies=np.array([0.5, 1.5]))
    g2 = Sample("", token_ids=(), token_logprobs=np.zeros(0), token_entropies=np.zeros(0))
    est = MeanTokenEntropy().estimate(["x", "y"], samples=_greedy_only(g1, g2))
    assert est.scores[0] == pytest.approx(1.0)
    assert math.isnan(est.scores[1]) and est.n_unscored == 1  # empty answer: documented NaN
    assert est.details["n_tokens"].tolist() == [2.0, 0.0]


@pytest.mark.parametrize(("normalize", "expected"), [(True, 2.0), (False, 4.0)])
def test_sequence_logprob_exact(normalize: bool, expected: float) -> None:
    g = Sample("a", token_ids=(1, 2), token_logprobs=np.array([-1.0, -3.0]))
    est = SequenceLogProb(normalize=normalize).estimate(["x"], samples=_greedy_only(g))
    assert est.scores[0] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("est", "match"),
    [(MeanTokenEntropy(), "token entropies"), (SequenceLogProb(), "log-probabilities")],
)
def test_logprob_estimators_need_statistics(est: MeanTokenEntropy | SequenceLogProb,
                                            match: str) -> None:
    with pytest.raises(EstimationError, match=match):
        est.estimate(["x"], samples=_greedy_only(Sample("remote answer")))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=30))
def test_mean_token_entropy_nonnegative(ent: list[float]) -> None:
    g = Sample("a", token_ids=tuple(range(len(ent))), token_entropies=np.array(ent))
    score = MeanTokenEntropy().estimate(["x"], samples=_greedy_only(g)).scores[0]
    assert score >= 0.0
    assert score == pytest.approx(float(np.mean(ent)))


# ------------------------------------------------------------------ semantic entropy

VARIANTS = ["discrete", "weighted", "paper"]


def test_semantic_entropy_formulas() -> None:
    labels = [0, 0, 1, 2]
    assert semantic_entropy_from_clusters(labels) == pytest.approx(
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    )
    ll = [math.log(0.4), math.log(0.4), math.log(0.1), math.log(0.1)]
    p = np.array([0.8, 0.1, 0.1])
    assert semantic_entropy_from_clusters(labels, ll, "weighted") == pytest.approx(
        float(-(p * np.log(p)).sum())
    )
    assert semantic_entropy_from_clusters(labels, ll, "paper") == pytest.approx(
        float(-np.log(p).mean())
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_semantic_entropy_estimator_exact(variant: str) -> None:
    se = SemanticEntropy(n_samples=4, equivalence=ExactMatchEquivalence(), variant=variant)
    lps = [math.log(0.4), math.log(0.4), math.log(0.1), math.log(0.1)]
    s = _with_draws(se, ["Paris", "paris.", "Rome", "Lyon"], lps)
    est = se.estimate(["q"], samples=[s])
    expected = semantic_entropy_from_clusters([0, 0, 1, 2], lps, variant)
    assert est.scores[0] == pytest.approx(expected)
    assert est.details["n_clusters"].tolist() == [3.0]


def test_semantic_entropy_include_greedy() -> None:
    se = SemanticEntropy(n_samples=2, equivalence="exact", include_greedy=True)
    cfg = se._sampling_config()
    s = Samples(prompt="q", greedy=sample("Rome"),
                draws={cfg.sampling_key(): (sample("Paris"), sample("Paris"))})
    score = se.estimate(["q"], samples=[s]).scores[0]
    p = np.array([1 / 3, 2 / 3])
    assert score == pytest.approx(float(-(p * np.log(p)).sum()))


_answer = st.text(alphabet="abcdefgh .!", min_size=0, max_size=12)


@settings(max_examples=25, deadline=None)
@given(
    text=_answer,
    n=st.integers(min_value=1, max_value=8),
    lps=st.lists(st.floats(min_value=-30, max_value=0), min_size=8, max_size=8),
    variant=st.sampled_from(VARIANTS),
    backend=st.sampled_from(["exact", "embedding"]),
)
def test_semantic_entropy_identical_answers_is_zero(
    text: str, n: int, lps: list[float], variant: str, backend: str
) -> None:
    eq = (ExactMatchEquivalence() if backend == "exact"
          else EmbeddingEquivalence(embedder=TrigramEmbedder()))
    se = SemanticEntropy(n_samples=n, equivalence=eq, variant=variant)
    s = _with_draws(se, [text] * n, lps[:n])
    est = se.estimate(["q"], samples=[s])
    assert est.scores[0] == 0.0
    assert est.details["n_clusters"].tolist() == [1.0]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(min_value=1, max_value=12), lp=st.floats(min_value=-20, max_value=0),
       variant=st.sampled_from(VARIANTS))
def test_semantic_entropy_distinct_answers_is_log_n(n: int, lp: float, variant: str) -> None:
    se = SemanticEntropy(n_samples=n, equivalence="exact", variant=variant)
    s = _with_draws(se, [f"answer {k}" for k in range(n)], [lp] * n)
    assert se.estimate(["q"], samples=[s]).scores[0] == pytest.approx(math.log(n))


@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_discrete_se_bounded_by_log_n(labels: list[int]) -> None:
    h = semantic_entropy_from_clusters(labels)
    assert 0.0 <= h <= math.log(len(labels)) + 1e-12


def test_weighted_se_needs_logprobs() -> None:
    se = SemanticEntropy(n_samples=2, equivalence="exact", variant="weighted")
    cfg = se._sampling_config()
    s = Samples(prompt="q", greedy=Sample("a"),
                draws={cfg.sampling_key(): (Sample("a"), Sample("b"))})
    with pytest.raises(EstimationError, match="variant='discrete'"):
        se.estimate(["q"], samples=[s])


# ------------------------------------------------------------------ self-consistency


@pytest.mark.parametrize(
    ("answers", "agreement", "entropy"),
    [
        (["1", "1", "1", "1"], 1.0, 0.0),
        (["1", "1", "2", None], 0.5, -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))),
        ([None, None], 0.0, math.log(2)),  # unextractable answers are all distinct
    ],
)
def test_answer_agreement(answers: list[str | None], agreement: float, entropy: float) -> None:
    a, h = answer_agreement(answers)
    assert a == pytest.approx(agreement) and h == pytest.approx(entropy)


@pytest.mark.parametrize(("measure", "expected"), [("majority", 0.5), ("entropy", 1.0397208)])
def test_self_consistency_number(measure: str, expected: float) -> None:
    sc = SelfConsistency(n_samples=4, extractor="number", measure=measure)
    s = _with_draws(sc, ["#### 12", "so 12.0", "it is 7", "no idea"])
    est = sc.estimate(["q"], samples=[s])
    assert est.scores[0] == pytest.approx(expected)
    assert est.details["agreement"].dtype == np.float64
    assert est.details["agreement"].tolist() == [0.5]
    assert est.details["n_extracted"].tolist() == [3.0]


# ------------------------------------------------------------------ verbalized


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Confidence: 85", 85.0), ("confidence: 85%", 85.0), ("CONFIDENCE:7", 7.0),
        ("Confidence: 0", 0.0), ("Confidence: 100 %", 100.0),
        ("I double-checked the capital.\nConfidence: 90\n\n", 90.0),
        ("My answer mentions 3 cities.\nConfidence: 70", 70.0),
        # the strict format only (issue 13): nothing else is read as a confidence
        ("85", None), ("85%", None), ("Confidence: 0.85", None), ("I am 90 percent sure", None),
        ("eighty", None), ("Confidence: 101", None), ("Confidence: -5", None),
        ("Confidence: 85\nThat is my answer.", None), ("no idea", None), ("", None),
        ("I'm not confident. 100% of experts would disagree.", None),
        ("Not sure at all. The answer is 100.", None), ("Confidence: 50-150", None),
        ("A spider has 8 legs.", None), ("Confidence: 1e9", None),
    ],
)
def test_parse_confidence(text: str, expected: float | None) -> None:
    assert parse_confidence(text) == expected


def test_verbalized_scores_reply_and_counts_unparsed() -> None:
    v = VerbalizedConfidence()
    samples = [
        Samples(prompt="q1", greedy=Sample("Paris"),
                extra={v.extra_key: Sample("Confidence: 90")}),
        Samples(prompt="q2", greedy=Sample("Rome"), extra={v.extra_key: Sample("dunno")}),
    ]
    est = v.estimate(["q1", "q2"], samples=samples)
    assert est.scores[0] == pytest.approx(0.1)
    assert math.isnan(est.scores[1]) and est.n_unscored == 1
    assert est.details["parsed"].tolist() == [1.0, 0.0]


def test_verbalized_followup_is_a_conversation() -> None:
    v = VerbalizedConfidence(question="Sure?")
    conv = v.followup_prompt([{"role": "system", "content": "s"},
                              {"role": "user", "content": "Q"}], "A")
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user"]
    assert conv[-2]["content"] == "A" and conv[-1]["content"] == "Sure?"


def test_verbalized_without_model_or_reply() -> None:
    with pytest.raises(InvalidParameterError, match="'model' parameter of VerbalizedConfidence"):
        VerbalizedConfidence().estimate(["q"], samples=[Samples(prompt="q", greedy=Sample("a"))])


# ------------------------------------------------------------------ ensemble


def test_ensemble_combines_and_exposes_members() -> None:
    g = [
        Sample("a", token_ids=(1,), token_logprobs=np.array([-0.1]),
               token_entropies=np.array([3.0])),
        Sample("b", token_ids=(1,), token_logprobs=np.array([-2.0]),
               token_entropies=np.array([1.0])),
        Sample("c", token_ids=(1,), token_logprobs=np.array([-5.0]),
               token_entropies=np.array([2.0])),
    ]
    ens = EnsembleEstimator([MeanTokenEntropy(), "sequence_logprob"], combine="mean_rank")
    est = ens.estimate(["x", "y", "z"], samples=_greedy_only(*g))
    feats = ens.member_scores(est)
    np.testing.assert_allclose(feats, [[3.0, 0.1], [1.0, 2.0], [2.0, 5.0]])
    np.testing.assert_allclose(est.scores, [(1.0 + 0.0) / 2, (0.0 + 0.5) / 2, (0.5 + 1.0) / 2])
    mean = EnsembleEstimator([MeanTokenEntropy(), SequenceLogProb()], combine="mean")
    np.testing.assert_allclose(mean.estimate(["x", "y", "z"], samples=_greedy_only(*g)).scores,
                               [1.55, 1.5, 3.5])
    first = EnsembleEstimator([SequenceLogProb(), MeanTokenEntropy()], combine="first")
    np.testing.assert_allclose(first.estimate(["x", "y", "z"], samples=_greedy_only(*g)).scores,
                               [0.1, 2.0, 5.0])


def test_ensemble_requests_every_sampling_config() -> None:
    a = SemanticEntropy(n_samples=3, temperature=0.7, equivalence="exact")
    b = SelfConsistency(n_samples=5, temperature=1.0)
    ens = EnsembleEstimator([a, b, MeanTokenEntropy()])
    keys = {r.sampling.sampling_key() for r in ens.sample_requests() if r.sampling is not None}
    assert keys == {a._sampling_config().sampling_key(), b._sampling_config().sampling_key()}


def test_ensemble_nan_only_when_all_members_nan() -> None:
    v = VerbalizedConfidence()
    s = [Samples(prompt="q", greedy=sample("a", entropy=1.0),
                 extra={v.extra_key: Sample("what?")})]
    est = EnsembleEstimator([v, MeanTokenEntropy()], combine="mean").estimate(["q"], samples=s)
    assert est.scores[0] == pytest.approx(1.0)
    only = EnsembleEstimator([v], combine="mean").estimate(["q"], samples=s)
    assert only.n_unscored == 1


def test_ensemble_bad_inputs() -> None:
    with pytest.raises(InvalidParameterError, match="'estimators' parameter of EnsembleEstimator"):
        EnsembleEstimator([]).sample_requests()
    with pytest.raises(InvalidParameterError, match=r"'estimators'.*'semantic_entropy'"):
        EnsembleEstimator(["semantic_entropyy"]).sample_requests()
    with pytest.raises(InvalidTypeError, match="'estimators' parameter"):
        EnsembleEstimator(MeanTokenEntropy()).sample_requests()  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="'combine' parameter"):
        EnsembleEstimator([MeanTokenEntropy()], combine="max").score_samples(
            _greedy_only(sample("a")))


def test_estimate_many_shares_samples() -> None:
    se = SemanticEntropy(n_samples=2, equivalence="exact")
    s = [_with_draws(se, ["a", "b"])]
    out = estimate_many([se, MeanTokenEntropy(), MeanTokenEntropy()], ["q"], samples=s)
    assert list(out) == ["semantic_entropy", "mean_token_entropy", "mean_token_entropy_2"]
    assert out["semantic_entropy"].samples is out["mean_token_entropy"].samples


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    ("est", "exc", "match"),
    [
        (SemanticEntropy(n_samples=0), InvalidParameterError, "'n_samples' parameter of Sem"),
        (SemanticEntropy(temperature=-0.1), InvalidParameterError, "'temperature' parameter"),
        (SemanticEntropy(temperature=0.0), InvalidParameterError, "'temperature' parameter"),
        (SemanticEntropy(top_p=1.5), InvalidParameterError, "'top_p' parameter"),
        (SemanticEntropy(seed=-1), InvalidParameterError, "'seed' parameter"),
        (SemanticEntropy(variant="renyi"), InvalidParameterError, "'variant' parameter"),
        (SemanticEntropy(equivalence="entailment"), InvalidParameterError,
         "'equivalence' parameter of SemanticEntropy.*'embedding'"),
        (SemanticEntropy(equivalence=1.0), InvalidTypeError, "'equivalence' parameter"),
        (SemanticEntropy(include_greedy="yes"), InvalidTypeError, "'include_greedy' param"),
        (SelfConsistency(n_samples=0), InvalidParameterError, "'n_samples' parameter of Self"),
        (SelfConsistency(temperature=-1.0), InvalidParameterError, "'temperature' parameter"),
        (SelfConsistency(measure="vote"), InvalidParameterError, "'measure' parameter"),
        (SelfConsistency(extractor="letters"), InvalidParameterError, "'extractor' parameter"),
        (MeanTokenEntropy(max_new_tokens=0), InvalidParameterError, "'max_new_tokens' param"),
        (SequenceLogProb(normalize=1), InvalidTypeError, "'normalize' parameter"),
        (VerbalizedConfidence(max_new_tokens=0), InvalidParameterError, "'max_new_tokens'"),
        (VerbalizedConfidence(question=""), InvalidParameterError, "'question' parameter"),
    ],
)
def test_bad_parameters_raise_at_first_use(est: object, exc: type[Exception], match: str) -> None:
    from confroute.estimators import UncertaintyEstimator

    assert isinstance(est, UncertaintyEstimator)
    samples = [Samples(prompt="q", greedy=sample("a"),
                       extra={"verbalized:16:": Sample("1")})]
    with pytest.raises(exc, match=match):
        est.estimate(["q"], samples=samples)
