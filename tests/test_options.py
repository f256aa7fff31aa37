"""OptionEntropy's scorings (option letter, option text, cloze) on a tiny in-test model."""

from __future__ import annotations

import numpy as np
import pytest

from confroute._persist import part_from_spec, part_to_spec
from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.estimators import (
    OptionEntropy,
    cloze_prompt,
    parse_option_texts,
    parse_options,
)
from confroute.models import HFLanguageModel
from confroute.types import Samples
from tests.tiny_models import make_causal_lm

Q = ("Which city is a capital?\nA. Paris\n(B) the city of Rome\nC) 42 Oslo street\n"
     "D: four\nAnswer:")
TEXTS = ["Paris", "the city of Rome", "42 Oslo street", "four"]


@pytest.fixture(scope="module")
def lm() -> HFLanguageModel:
    model, tok = make_causal_lm("llama", seed=0)
    return HFLanguageModel(model, tok, device="cpu")


def _by_hand(lm: HFLanguageModel, prompt: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sum, token count) of each option text after ``prompt``, straight from model.score."""
    got = lm.score([prompt] * len(texts), [" " + t for t in texts])
    return (np.array([float(np.sum(g)) for g in got]),
            np.array([float(len(g)) for g in got]))


def _entropy(ll: np.ndarray) -> float:
    p = np.exp(ll - ll.max())
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def test_option_texts_are_parsed_from_the_three_line_styles() -> None:
    assert parse_option_texts(Q, "ABCDE") == list(zip("ABCD", TEXTS))
    assert parse_options(Q, "ABCDE") == ["A", "B", "C", "D"]
    # a letter listed twice counts once (its first line); letters outside the set are ignored
    assert parse_option_texts("A. one\nB. two\nA. again\nF. six", "ABCD") == [
        ("A", "one"), ("B", "two")]
    assert parse_option_texts("A. only one option", "ABCD") == []
    assert parse_option_texts("Answer: A\nQuestion: two", "ABCD") == []


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_text_scores_are_the_model_s_own_log_probs(lm: HFLanguageModel, normalize: str
                                                   ) -> None:
    sums, counts = _by_hand(lm, Q, TEXTS)
    assert counts.max() > counts.min()  # options of different lengths: mean != sum
    ll = sums / counts if normalize == "mean" else sums
    est = OptionEntropy(scoring="text", normalize=normalize)
    out = est.estimate([Q], lm)
    cached = out.samples[0].extra["option_text_logliks"]
    assert cached.shape == (4, 2) and cached[:, 1].tolist() == counts.tolist()
    np.testing.assert_allclose(cached[:, 0], sums, rtol=1e-5)
    np.testing.assert_allclose(est.option_scores(out.samples[0]), ll, rtol=1e-5)
    assert out.details["choice"][0] == float(np.argmax(ll))
    assert out.scores[0] == pytest.approx(_entropy(ll), abs=1e-5)
    p = np.sort(np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum())[::-1]
    margin = OptionEntropy(scoring="text", normalize=normalize, measure="margin")
    got = margin.estimate([Q], samples=out.samples)  # reuses the cache: no model needed
    assert got.scores[0] == pytest.approx(1.0 - (p[0] - p[1]), abs=1e-5)


def test_mean_and_sum_share_one_cache_and_differ(lm: HFLanguageModel) -> None:
    prepared = OptionEntropy(scoring="text").prepare_samples([Samples(prompt=Q)], lm)
    mean = OptionEntropy(scoring="text", normalize="mean").estimate([Q], samples=prepared)
    total = OptionEntropy(scoring="text", normalize="sum").estimate([Q], samples=prepared)
    assert mean.scores[0] != pytest.approx(total.scores[0])


def test_given_option_texts_override_the_prompt(lm: HFLanguageModel) -> None:
    prompt = "Pick one.\nAnswer:"  # no option lines at all
    given = ["blue whale", "cat", "a very small red ant"]
    s = Samples(prompt=prompt, extra={"options": ["A", "B", "C"], "option_texts": given})
    out = OptionEntropy(scoring="text").estimate([prompt], lm, samples=[s])
    sums, counts = _by_hand(lm, prompt, given)
    assert out.details["n_options"][0] == 3
    assert out.scores[0] == pytest.approx(_entropy(sums / counts), abs=1e-5)
    # texts without letters: the first letters are implied
    s2 = Samples(prompt=prompt, extra={"option_texts": given})
    out2 = OptionEntropy(scoring="text").estimate([prompt], lm, samples=[s2])
    assert out2.scores[0] == pytest.approx(out.scores[0])
    # letter scoring ignores the texts: it scores " A", " B", ... of the parsed prompt
    assert np.isnan(OptionEntropy().estimate([prompt], lm, samples=[s2]).scores[0])


def test_unparseable_options_score_nan(lm: HFLanguageModel) -> None:
    # the letters are given but the prompt lists no text for C: counted as unscored
    s = Samples(prompt="A. yes\nB. no\nAnswer:", extra={"options": ["A", "B", "C"]})
    out = OptionEntropy(scoring="text").estimate([s.prompt, "no options"], lm,
                                                 samples=[s, Samples(prompt="no options")])
    assert np.isnan(out.scores).all() and out.n_unscored == 2


def test_cloze_prompt_keeps_the_question_stem_only() -> None:
    assert cloze_prompt(Q) == "Which city is a capital?\nAnswer:"
    assert cloze_prompt("no options here") == "no options here"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": Q}]
    got = cloze_prompt(msgs)
    assert got == [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": "Which city is a capital?\nAnswer:"}]
    assert msgs[1]["content"] == Q  # the caller's conversation is not modified


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_cloze_scores_the_texts_after_the_stem(lm: HFLanguageModel, normalize: str) -> None:
    sums, counts = _by_hand(lm, "Which city is a capital?\nAnswer:", TEXTS)
    listed, _ = _by_hand(lm, Q, TEXTS)
    assert not np.allclose(sums, listed)  # the stem is not the full prompt
    ll = sums / counts if normalize == "mean" else sums
    out = OptionEntropy(scoring="cloze", normalize=normalize).estimate([Q], lm)
    cached = out.samples[0].extra["option_cloze_logliks"]
    np.testing.assert_allclose(cached[:, 0], sums, rtol=1e-5)
    assert out.details["choice"][0] == float(np.argmax(ll))
    assert out.scores[0] == pytest.approx(_entropy(ll), abs=1e-5)
    assert "option_text_logliks" not in out.samples[0].extra


def test_cache_keys_do_not_collide_between_scorings(lm: HFLanguageModel) -> None:
    letter, text = OptionEntropy(), OptionEntropy(scoring="text")
    assert letter.cache_key == "option_logliks" and text.cache_key == "option_text_logliks"
    assert OptionEntropy(scoring="cloze").cache_key == "option_cloze_logliks"
    # a letter cache (a clear winner) must not be read by the text scoring
    s = Samples(prompt=Q, extra={"option_logliks": np.array([0.0, -9.0, -9.0, -9.0])})
    by_letter = letter.estimate([Q], samples=[s])
    assert by_letter.scores[0] < 0.01
    with pytest.raises(InvalidParameterError, match="'model' parameter"):
        text.estimate([Q], samples=[s])  # nothing cached for text: needs the model
    by_text = text.estimate([Q], lm, samples=[s])
    sums, counts = _by_hand(lm, Q, TEXTS)
    assert by_text.scores[0] == pytest.approx(_entropy(sums / counts), abs=1e-5)
    kept = by_text.samples[0].extra
    assert kept["option_logliks"].tolist() == [0.0, -9.0, -9.0, -9.0]  # untouched


@pytest.mark.parametrize(("kwargs", "err", "match"), [
    ({"scoring": "cloz"}, InvalidParameterError,
     r"'scoring' parameter of OptionEntropy must be one of 'letter', 'text', 'cloze'\. "
     r"Got 'cloz'"),
    ({"scoring": 1}, InvalidTypeError, r"'scoring' parameter .* Got 1"),
    ({"normalize": "max"}, InvalidParameterError,
     r"'normalize' parameter of OptionEntropy must be one of 'mean', 'sum'\. Got 'max'"),
    ({"normalize": None}, InvalidTypeError, r"'normalize' parameter .* Got None"),
])
def test_bad_parameters_raise_typed_errors_before_scoring(kwargs: dict, err: type,
                                                          match: str) -> None:
    with pytest.raises(err, match=match):
        OptionEntropy(**kwargs).estimate([Q])  # no model: the check comes first


def test_misaligned_option_texts_are_refused(lm: HFLanguageModel) -> None:
    s = Samples(prompt=Q, extra={"options": ["A", "B"], "option_texts": ["x", "y", "z"]})
    with pytest.raises(InvalidParameterError, match=r"'samples' parameter .*option_texts"):
        OptionEntropy(scoring="text").estimate([Q], lm, samples=[s])


def test_new_parameters_round_trip_through_params_and_specs() -> None:
    est = OptionEntropy(scoring="text", normalize="sum", measure="margin")
    params = est.get_params(deep=False)
    assert params["scoring"] == "text" and params["normalize"] == "sum"
    assert OptionEntropy(**params).get_params(deep=False) == params
    back = part_from_spec(part_to_spec(est, "estimator"), "estimator")
    assert isinstance(back, OptionEntropy) and back.get_params(deep=False) == params
