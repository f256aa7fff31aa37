from __future__ import annotations

import pytest

from confroute.errors import ConfrouteError, InvalidParameterError, InvalidTypeError
from confroute.evaluation.datasets import Example
from confroute.evaluation.recorded import RecordedAnswerMissing, RecordedModel
from confroute.grading import NumericGrader
from confroute.models.base import LanguageModel, SampleRequest, collect_samples
from confroute.types import GenerationConfig

EXAMPLES = [
    Example(id="g0", prompt="2+2?", gold=("4",), kind="number",
            recorded={"small": "2+2=5\nA: 5", "big": "A: 4"}),
    Example(id="g1", prompt="3*3?", gold=("9",), kind="number",
            recorded={"small": "A: 9", "big": "A: 9"}),
    Example(id="g2", prompt="10-1?", gold=("9",), kind="number", recorded={"big": "A: 9"}),
]


def test_is_a_language_model_and_replays():
    m = RecordedModel.from_examples(EXAMPLES, "small")
    assert isinstance(m, LanguageModel) and m.name == "small"
    out = m.generate(["3*3?", "2+2?"], GenerationConfig())
    assert [o[0].text for o in out] == ["A: 9", "2+2=5\nA: 5"]
    assert out[0][0].token_logprobs is None and out[0][0].finish_reason == "stop"


@pytest.mark.parametrize("n", [2, 5])
def test_n_copies(n):
    m = RecordedModel({"q": "a"}, name="m")
    out = m.generate(["q"], GenerationConfig(temperature=1.0, n=n, seed=0))
    assert [s.text for s in out[0]] == ["a"] * n


def test_stop_strings_and_chat_prompt():
    m = RecordedModel({"q": "first\nA: 4"}, name="m")
    assert m.generate(["q"], GenerationConfig(stop=("\n",)))[0][0].text == "first"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    assert m.generate([chat], GenerationConfig())[0][0].text == "first\nA: 4"
    keyed = RecordedModel({"q": "x"}, name="m", key="prompt_key")
    with pytest.raises(RecordedAnswerMissing):
        keyed.generate(["q"], GenerationConfig())


def test_missing_answer_is_typed_error_not_default():
    m = RecordedModel.from_examples(EXAMPLES, "small")
    with pytest.raises(RecordedAnswerMissing, match=r"'small' has no recorded answer.*10-1"):
        m.generate(["2+2?", "10-1?"], GenerationConfig())
    err = RecordedAnswerMissing("x")
    assert isinstance(err, ConfrouteError) and isinstance(err, KeyError) and str(err) == "x"


def test_feeds_collect_samples_and_graders():
    big = RecordedModel.from_examples(EXAMPLES, "big")
    prompts = [e.prompt for e in EXAMPLES]
    samples = collect_samples(big, prompts, [SampleRequest(greedy=True)])
    texts = [s.greedy.text for s in samples]
    assert NumericGrader().grade_many(texts, EXAMPLES).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: RecordedModel({"q": 1}, name="m"), InvalidTypeError, "'answers'"),
        (lambda: RecordedModel({"q": "a"}, name=""), InvalidTypeError, "'name'"),
        (lambda: RecordedModel({"q": "a"}, name="m", key="id"), InvalidParameterError, "'key'"),
        (lambda: RecordedModel.from_examples(EXAMPLES, "gpt-9"), InvalidParameterError,
         "'model_name'.*big, small"),
        (lambda: RecordedModel({"q": "a"}, name="m").generate("q", GenerationConfig()),
         InvalidTypeError, "'prompts'"),
        (lambda: RecordedModel({"q": "a"}, name="m").generate(["q"], {"n": 1}),
         InvalidTypeError, "'config'"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_conflicting_answers_for_same_prompt():
    dup = [Example(id="a", prompt="q", gold=("1",), kind="number", recorded={"m": "1"}),
           Example(id="b", prompt="q", gold=("1",), kind="number", recorded={"m": "2"})]
    with pytest.raises(InvalidParameterError, match="same prompt"):
        RecordedModel.from_examples(dup, "m")
