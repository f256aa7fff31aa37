from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.evaluation.datasets import Example, load_mt_bench
from confroute.evaluation.judge import (
    BestOfKJudge,
    MTBenchJudge,
    load_judge_prompts,
    parse_best_verdict,
    parse_rating,
)
from confroute.evaluation.recorded import RecordedModel

DATA = Path("/work/shared/data/mt_bench")


@pytest.mark.parametrize(
    "text, k, expected",
    [
        ("Response 2 is clearly wrong. [[1, 3]]", 3, (1, 3)),
        ("[[2]]", 3, (2,)),
        ("first thought [[1]] ... on reflection [[3]]", 3, (3,)),
        ("Best: Response 2", 3, (2,)),
        ("The best response is Response #3.", 3, (3,)),
        ("Responses 1 and 2 are equally good.", 3, (1, 2)),
        ("Response 1 is wrong, while Response 3 is the best.", 3, (3,)),
        ("Best responses: 1, 2 and 3", 3, (1, 2, 3)),
        ("Only Response 2 gives the correct year.", 3, (2,)),
        ("Response 1 and Response 2 both mention it.", 3, None),  # no verdict
        ("[[4]]", 3, None),  # out of range
        ("[[0]]", 3, None),
        ("I cannot decide.", 3, None),
        ("", 2, None),
        ("[[A]]", 2, None),
    ],
)
def test_parse_best_verdict_adversarial(text, k, expected):
    assert parse_best_verdict(text, k) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Rating: [[8]]", 8.0),
        ("[[8.5]]", 8.5),
        ("The answer is fine.\nRating: [[9]]", 9.0),
        ("Draft [[3]] then final [[7]]", 7.0),
        ("Rating: [[ 6 ]]", 6.0),
        ("Rating: [[7/10]]", 7.0),
        ("Rating: [6]", 6.0),
        ("Rating: [[11]]", None),
        ("Rating: [[0]]", None),
        ("[[-3]]", None),
        ("I give it an 8.", None),
        ("[[A]]", None),
        ("see [1] and [[5]]", 5.0),
    ],
)
def test_parse_rating_adversarial(text, expected):
    assert parse_rating(text) == expected


def test_best_of_k_end_to_end_with_recorded_judge():
    questions = ["Capital of France?", "2+2?", "Largest planet?", "Who wrote Hamlet?"]
    truths = ["Paris", "4", "Jupiter", "Shakespeare"]
    responses = {"edge": ["Paris", "5", "Jupiter", "Marlowe"],
                 "cloud": ["Paris", "4", "Saturn", "Shakespeare"]}
    judge_probe = BestOfKJudge(RecordedModel({"x": "x"}, name="probe"), seed=3)
    prompts, orders = judge_probe.build_prompts(questions, truths, responses)
    # the shuffle is seeded, and the responses appear under their labels
    assert orders == judge_probe.build_prompts(questions, truths, responses)[1]
    assert all(sorted(o) == ["cloud", "edge"] for o in orders)
    assert "[Response 1]\n" + responses[orders[1][0]][1] in prompts[1]
    # scripted verdicts: tie on q0, correct model on q1 and q2, garbage on q3
    want = [("edge", "cloud"), ("cloud",), ("edge",), None]
    script = {}
    for p, order, w in zip(prompts, orders, want):
        if w is None:
            script[p] = "Both have merit; I cannot pick."
        else:
            labels = sorted(order.index(m) + 1 for m in w)
            script[p] = "Reasoning...\n[[" + ", ".join(map(str, labels)) + "]]"
    judge = BestOfKJudge(RecordedModel(script, name="judge"), seed=3)
    res = judge.evaluate(questions, truths, responses)
    assert res.n_unparseable == 1
    assert res.scores == {"edge": 50.0, "cloud": 50.0}  # 2 of 4 each; q3 counts as nobody
    assert [set(s) for s in res.selected] == [{"edge", "cloud"}, {"cloud"}, {"edge"}, set()]


def _toy_prompts(tmp_path: Path) -> Path:
    # own wording; same placeholders as FastChat's file
    rows = [
        {"name": "single-v1", "type": "single", "system_prompt": "Judge.",
         "prompt_template": "Q: {question}\nA: {answer}\nRate 1-10 as [[rating]].",
         "output_format": "[[rating]]", "category": "general"},
        {"name": "single-math-v1", "type": "single", "system_prompt": "Judge math.",
         "prompt_template": "Q: {question}\nRef: {ref_answer_1}\nA: {answer}\n[[rating]]",
         "output_format": "[[rating]]", "category": "math"},
        {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Judge turn 2.",
         "prompt_template": "{question_1}|{answer_1}|{question_2}|{answer_2}",
         "output_format": "[[rating]]", "category": "general"},
    ]
    p = tmp_path / "judge_prompts.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


EX = [
    Example(id="81", prompt="Write a poem.", gold=(), kind="open",
            meta={"turns": ("Write a poem.", "Shorter."), "answers": {"m": ("roses", "rose")}}),
    Example(id="111", prompt="Area of triangle?", gold=("3", "6"), kind="open",
            meta={"turns": ("Area of triangle?", "Circle?"), "reference": ("3", "6"),
                  "answers": {"m": ("It is 3.", "pi")}}),
]


def test_mt_bench_end_to_end_with_recorded_judge(tmp_path):
    path = _toy_prompts(tmp_path)
    judge = MTBenchJudge(RecordedModel({"x": "x"}, name="probe"), path)
    names = [judge.build_prompt(e, e.meta["answers"]["m"])[0] for e in EX]
    assert names == ["single-v1", "single-math-v1"]
    _, chat = judge.build_prompt(EX[1], EX[1].meta["answers"]["m"])
    assert chat[0] == {"role": "system", "content": "Judge math."}
    assert chat[1]["content"] == "Q: Area of triangle?\nRef: 3\nA: It is 3.\n[[rating]]"
    script = {
        "Q: Write a poem.\nA: roses\nRate 1-10 as [[rating]].": "Nice. Rating: [[7]]",
        chat[1]["content"]: "Correct but terse. Rating: [[12]]",
    }
    res = MTBenchJudge(RecordedModel(script, name="judge"), path).evaluate(EX, "m")
    assert res.n_unparseable == 1 and res.ratings[0] == 7.0 and math.isnan(res.ratings[1])
    assert res.mean == 7.0 and res.prompt_names == names
    # turn 2 with explicit answers
    _, chat2 = judge.build_prompt(EX[0], ["roses", "rose"], turn=2)
    assert chat2[1]["content"] == "Write a poem.|roses|Shorter.|rose"


@pytest.mark.skipif(not DATA.is_dir(), reason="shared MT-Bench data is absent")
def test_real_judge_prompts_format_every_question():
    prompts = load_judge_prompts(DATA / "judge_prompts.jsonl")
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn"} <= set(prompts)
    ex = load_mt_bench(DATA / "question.jsonl", DATA / "reference_answer/gpt-4.jsonl",
                       [DATA / "model_answer/llama-2-chat7b.jsonl"])
    judge = MTBenchJudge(RecordedModel({"x": "x"}, name="probe"), prompts)
    for turn in (1, 2):
        built = [judge.build_prompt(e, e.meta["answers"]["llama-2-chat7b"], turn) for e in ex]
        assert all("{" + "answer" not in b[1][1]["content"] for b in built)
        n_math = sum(b[0].startswith("single-math") for b in built)
        assert n_math == sum(bool(e.meta["reference"]) for e in ex) >= 30


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: BestOfKJudge("gpt-4"), InvalidTypeError, "'judge'"),
        (lambda: BestOfKJudge(RecordedModel({"x": "x"}, name="j"), seed=-1),
         InvalidParameterError, "'seed'"),
        (lambda: BestOfKJudge(RecordedModel({"x": "x"}, name="j")).evaluate(
            ["q"], ["a"], {"only": ["r"]}), InvalidParameterError, "'responses'"),
        (lambda: BestOfKJudge(RecordedModel({"x": "x"}, name="j")).evaluate(
            ["q", "q2"], ["a"], {"a": ["r"], "b": ["s"]}), InvalidParameterError,
         "same length"),
        (lambda: parse_best_verdict("[[1]]", 0), InvalidParameterError, "'k'"),
        (lambda: parse_rating(None), InvalidTypeError, "'text'"),
        (lambda: MTBenchJudge(RecordedModel({"x": "x"}, name="j"), {}).evaluate(EX, "m"),
         InvalidParameterError, "no judge prompt 'single-v1'"),
        (lambda: MTBenchJudge(RecordedModel({"x": "x"}, name="j"), {}).evaluate(EX, "zz"),
         InvalidParameterError, "'model'.*'zz'"),
        (lambda: load_judge_prompts("/nonexistent/judge.jsonl"), InvalidParameterError, "'path'"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_unparseable_scores_are_counted_in_denominator():
    q, t = ["a?", "b?"], ["a", "b"]
    resp = {"x": ["a", "b"], "y": ["c", "d"]}
    probe = BestOfKJudge(RecordedModel({"z": "z"}, name="p"), seed=0)
    prompts, orders = probe.build_prompts(q, t, resp)
    script = {prompts[0]: f"[[{orders[0].index('x') + 1}]]", prompts[1]: "no idea"}
    res = BestOfKJudge(RecordedModel(script, name="j"), seed=0).evaluate(q, t, resp)
    assert res.scores == {"x": 50.0, "y": 0.0} and res.n_unparseable == 1
    assert np.isclose(sum(res.scores.values()), 50.0)
