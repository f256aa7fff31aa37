from __future__ import annotations

import json
from pathlib import Path

import pytest

from confroute.errors import InvalidParameterError, InvalidTypeError
from confroute.evaluation import datasets as D

DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data directory is absent")
KIND_GRADER = {"gsm8k": "number", "gsm8k_solutions": "number", "nq_open": "contains",
               "triviaqa": "contains", "mt_bench": None, "mmlu_redux": "choice",
               "helm_mmlu": "choice", "helm_combined": "choice", "arc": "choice"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_gsm8k_and_solutions_join_on_id(tmp_path):
    test = _jsonl(tmp_path / "test.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "Pay?", "answer": "x\n#### 1,200"},
    ])
    sols = _jsonl(tmp_path / "sol.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "ground_truth": "3+4=7\nA: 7",
         "6b_finetuning": {"is_correct": False, "solution": "3+3=6\nA: 6"},
         "175b_finetuning": {"is_correct": True, "solution": "3+4=7\nA: 7"}},
    ])
    ex = D.load_gsm8k(test)
    assert [e.gold for e in ex] == [("7",), ("1200",)]
    assert ex[0].kind == "number" and "####" in ex[0].prompt
    sol = D.load_gsm8k_solutions(sols)
    assert sol[0].id == ex[0].id and sol[0].gold == ("7",)
    assert sol[0].recorded == {"6b_finetuning": "3+3=6\nA: 6", "175b_finetuning": "3+4=7\nA: 7"}
    assert sol[0].meta["is_correct"] == {"6b_finetuning": False, "175b_finetuning": True}
    assert {e.grader for e in [*ex, *sol]} == {"number"}
    assert sol[0].grade(sol[0].recorded["175b_finetuning"]) == 1.0


def test_nq_open_plain_and_efficientqa(tmp_path):
    plain = _jsonl(tmp_path / "dev.jsonl", [{"question": "who wrote hamlet",
                                             "answer": ["Shakespeare", "William Shakespeare"]}])
    eqa = _jsonl(tmp_path / "efficientqa_test.jsonl", [{
        "question": "q", "answer": ["Nine"], "def_correct_predictions": ["9"],
        "answer_and_def_correct_predictions": ["Nine", "9"]}])
    a = D.load_nq_open(plain)[0]
    assert a.gold == ("Shakespeare", "William Shakespeare") and a.kind == "short"
    assert "who wrote hamlet" in a.prompt
    b = D.load_nq_open(eqa)[0]
    assert b.gold == ("Nine", "9") and b.meta["answer"] == ["Nine"]
    # short free text is graded by alias containment, the library's one default
    assert a.grader == b.grader == "contains" and a.references == a.gold
    assert a.grade("It was William Shakespeare.") == 1.0


@pytest.mark.parametrize(
    "row, expected_gold",
    [
        ({"context": "Question: Which vegetable?\nAnswer:", "answer": "Onion",
          "aliases": ["Onion", "Onions"]}, ("Onion", "Onions")),
        ({"question": "Which vegetable?", "answer": {"value": "Onion", "aliases": ["Onions"]}},
         ("Onion", "Onions")),
        ({"question": "Which vegetable?", "answer": "Onion", "aliases": ["Allium cepa"]},
         ("Onion", "Allium cepa")),
    ],
)
def test_triviaqa_formats(tmp_path, row, expected_gold):
    ex = D.load_triviaqa(_jsonl(tmp_path / "t.jsonl", [row]))[0]
    assert ex.gold == expected_gold
    assert ex.meta["question"] == "Which vegetable?"
    assert ex.grader == "contains"


def test_triviaqa_official_json(tmp_path):
    p = tmp_path / "verified.json"
    p.write_text(json.dumps({"Data": [{"Question": "Capital of France?", "QuestionId": "tc_1",
                                       "Answer": {"Value": "Paris", "Aliases": ["Paris"]}}]}))
    ex = D.load_triviaqa(p)[0]
    assert ex.id == "tc_1" and ex.gold == ("Paris",)


def test_mt_bench_questions_references_and_answers(tmp_path):
    q = _jsonl(tmp_path / "question.jsonl", [
        {"question_id": 101, "category": "reasoning", "turns": ["T1?", "T2?"]},
        {"question_id": 102, "category": "math", "turns": ["M1?", "M2?"],
         "reference": ["r1", "r2"]},
    ])
    ref = _jsonl(tmp_path / "gpt-4.jsonl", [{"question_id": 101, "model_id": "gpt-4",
                                            "choices": [{"index": 0, "turns": ["R1", "R2"]}]}])
    ans = _jsonl(tmp_path / "small.jsonl", [
        {"question_id": 101, "model_id": "small", "choices": [{"index": 0, "turns": ["a", "b"]}]},
    ])
    ex = D.load_mt_bench(q, reference_path=ref, answer_paths=[ans])
    assert [e.id for e in ex] == ["101", "102"]
    assert ex[0].prompt == "T1?" and ex[0].meta["turns"] == ("T1?", "T2?")
    assert ex[0].gold == ("R1", "R2") and ex[1].gold == ("r1", "r2")
    assert ex[0].recorded == {"small": "a"} and ex[0].meta["answers"]["small"] == ("a", "b")
    assert ex[1].recorded == {} and ex[0].kind == "open"
    assert ex[0].grader is None  # open answers need a judge


REDUX_HEADER = ["question", "choices", "answer", "error_type", "source", "correct_answer",
                "potential_reason"]


def _redux_rows() -> list[list[str]]:
    return [
        ["Q zero; with semicolon?", "['a', 'b', 'c', 'd']", "0", "OK", "s", "", ""],
        ["Q one", "['a', 'b', 'c', 'd']", "1", "Wrong Groundtruth", "s", "2", ""],
        ["Q two", "['a', 'b', 'c', 'd']", "1", "wrong_groundtruth", "s", "C", ""],
        ["Q three", "['alpha', 'beta', 'gamma', 'delta']", "0", "multiple correct answers",
         "s", "1, 3", ""],
        ["Q four", "['alpha', 'beta', 'gamma', 'delta']", "0", "no_correct_answer", "s", "6", ""],
        ["Q five", "['alpha', 'beta', 'gamma', 'delta']", "0", "Wrong_Groundtruth", "s",
         "Gamma", ""],
        ["Q six", "['a', 'b', 'c', 'd']", "3", "expert", "s", "", ""],
        ["Q seven caf\u00e9", "['a', 'b', 'c', 'd']", "2", "ok", "s", "2", ""],
    ]


def _write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str,
               encoding: str) -> Path:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter)
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


@pytest.mark.parametrize("delimiter", [",", ";"])
@pytest.mark.parametrize("encoding", ["utf-8", "cp1252"])
def test_mmlu_redux_csv_quirks(tmp_path, delimiter, encoding):
    # shuffled column order with an extra empty-named column, as in econometrics
    order = [6, 2, 0, 5, 1, 3, 4]
    header = [REDUX_HEADER[i] for i in order] + [""]
    rows = [[r[i] for i in order] + [""] for r in _redux_rows()]
    _write_csv(tmp_path / "mmlu_toy_subject.csv", header, rows, delimiter, encoding)
    orig = D.load_mmlu_redux(tmp_path, label="original")
    corr = D.load_mmlu_redux(tmp_path / "mmlu_toy_subject.csv", label="corrected")
    assert {e.grader for e in [*orig, *corr]} == {"choice"}
    assert [e.gold for e in orig] == [("A",), ("B",), ("B",), ("A",), ("A",), ("A",), ("D",),
                                      ("C",)]
    assert [e.gold for e in corr] == [("A",), ("C",), ("C",), ("B", "D"), (), ("C",), ("D",),
                                      ("C",)]
    assert [e.meta["error_type"] for e in orig][:4] == [
        "ok", "wrong_groundtruth", "wrong_groundtruth", "multiple_correct_answers"]
    assert corr[4].meta["label_source"] == "no_listed_option"
    assert corr[6].meta["label_source"] == "original"
    assert orig[0].id == "mmlu_redux/toy_subject-0" and orig[0].meta["subject"] == "toy_subject"
    assert orig[0].choices == ("a", "b", "c", "d")
    assert orig[7].meta["question"].endswith("caf\u00e9")
    assert "A. a\nB. b" in orig[0].prompt and "letter" in orig[0].prompt


@pytest.mark.parametrize(
    "cell, expected",
    [("2", ("C",)), ("B,C", ("B", "C")), ("2 and 3", ("C", "D")), ("either 1 or 3", ("B", "D")),
     ("", None), ("Ok", None), ("6", None), ("beta", ("B",)), ("depends on interpretation", None)],
)
def test_parse_corrected_answer(cell, expected):
    assert D.parse_corrected_answer(cell, ["alpha", "beta", "gamma", "delta"]) == expected


def _helm_dump(pred: str) -> dict:
    return {"adapter_spec": {}, "request_states": [{
        "instance": {"input": {"text": "How many?"}, "id": "id7", "split": "test",
                     "references": [{"output": {"text": "100"}, "tags": ["correct"]},
                                    {"output": {"text": "1"}, "tags": []}]},
        "output_mapping": {"A": "100", "B": "1"},
        "result": {"completions": [{"text": pred, "logprob": 0}]},
    }]}


def test_helm_mmlu(tmp_path):
    for model, pred in [("m_big", "A"), ("m_small", " B")]:
        (tmp_path / model).mkdir()
        (tmp_path / model / "virology.json").write_text(json.dumps(_helm_dump(pred)))
    ex = D.load_helm_mmlu(tmp_path)
    assert len(ex) == 1 and ex[0].id == "helm/virology/id7"
    assert ex[0].gold == ("A",) and ex[0].choices == ("100", "1")
    assert ex[0].recorded == {"m_big": "A", "m_small": "B"}
    assert ex[0].grader == "choice" and ex[0].grade("The answer is (A).") == 1.0
    assert D.load_helm_mmlu(tmp_path, models=["m_small"])[0].recorded == {"m_small": "B"}
    with pytest.raises(InvalidParameterError, match=r"'models'.*m_big, m_small"):
        D.load_helm_mmlu(tmp_path, models=["gpt-9"])


def test_helm_combined_joins_on_stripped_question(tmp_path):
    qdir = tmp_path / "questions"
    qdir.mkdir()
    _write_csv(qdir / "mmlu_toy.csv", REDUX_HEADER, _redux_rows()[:2], ",", "utf-8")
    cdir = tmp_path / "combined"
    cdir.mkdir()
    _write_csv(cdir / "toy.csv", ["question", "choices", "model_a", "model_b"], [
        [" Q one", "['a', 'b', 'c', 'd']", " B", ""],
        ["Unmatched", "['a', 'b', 'c', 'd']", "A", "A"],
    ], ",", "utf-8")
    ex = D.load_helm_combined(cdir, qdir, label="corrected")
    assert len(ex) == 1 and ex[0].id == "mmlu_redux/toy-1"
    assert ex[0].recorded == {"model_a": "B"} and ex[0].gold == ("C",)
    assert ex[0].grader == "choice"


@pytest.mark.parametrize(
    "row, gold, qid",
    [({"query": "Question: Why?", "choices": ["x", "y", "z"], "gold": 2}, ("C",), "arc-0"),
     ({"id": "Mercury_1", "question": {"stem": "Why?", "choices": [
         {"label": "A", "text": "x"}, {"label": "B", "text": "y"}]}, "answerKey": "B"},
      ("B",), "Mercury_1")],
)
def test_arc_formats(tmp_path, row, gold, qid):
    ex = D.load_arc(_jsonl(tmp_path / "arc.jsonl", [row]))[0]
    assert ex.gold == gold and ex.id == qid and ex.meta["question"] == "Why?"
    assert ex.grader == "choice" and ex.grade(gold[0]) == 1.0


def _toy(n: int) -> list[D.Example]:
    return [D.Example(id=f"q{i}", prompt="p", gold=("1",), kind="number") for i in range(n)]


@pytest.mark.parametrize("seed", [0, 7])
def test_split_deterministic_order_free_and_stable(seed):
    ex = _toy(400)
    dev, test = D.split(ex, 0.25, seed)
    assert len(dev) + len(test) == 400 and 60 < len(dev) < 140
    dev2, _ = D.split(list(reversed(ex)), 0.25, seed)
    assert {e.id for e in dev} == {e.id for e in dev2}
    dev3, _ = D.split(ex[:200], 0.25, seed)  # membership does not depend on the others
    assert {e.id for e in dev3} == {e.id for e in dev if int(e.id[1:]) < 200}
    assert {e.id for e in D.split(ex, 0.25, seed + 1)[0]} != {e.id for e in dev}


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda tmp: D.load_dataset("imagenet", tmp), InvalidParameterError,
         "'name'.*'arc'.*'triviaqa'"),
        (lambda tmp: D.load_gsm8k(tmp / "nope.jsonl"), InvalidParameterError,
         "'path'.*existing file"),
        (lambda tmp: D.load_gsm8k(3), InvalidTypeError, "'path'"),
        (lambda tmp: D.load_mmlu_redux(tmp, label="fixed"), InvalidParameterError, "'label'"),
        (lambda tmp: D.split(_toy(3), 1.5, 0), InvalidParameterError, "'fraction'"),
        (lambda tmp: D.split(_toy(3) + _toy(1), 0.5, 0), InvalidParameterError, "unique ids"),
        (lambda tmp: D.Example(id="x", prompt="p", gold=(), kind="essay"), InvalidParameterError,
         "'kind'"),
    ],
)
def test_bad_inputs(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [('{"question": "q"}\n', "no 'answer'"), ("not json\n", "line 1 is not valid JSON"),
     ('{"question": "q", "answer": "no marker"}\n', "####")],
)
def test_format_errors_name_the_file_and_row(tmp_path, text, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(D.DatasetFormatError, match=match):
        D.load_gsm8k(p)


# ---------------------------------------------------------------- real files (smoke)


@needs_data
@pytest.mark.parametrize(
    "name, path, kwargs, n",
    [
        ("gsm8k", "gsm8k/test.jsonl", {}, 1319),
        ("gsm8k_solutions", "gsm8k/example_model_solutions.jsonl", {}, 1319),
        ("nq_open", "nq_open/efficientqa_test.jsonl", {}, 1769),
        ("triviaqa", "triviaqa/triviaqa_sm_sub.jsonl", {}, 3000),
        ("mt_bench", "mt_bench/question.jsonl",
         {"reference_path": DATA / "mt_bench/reference_answer/gpt-4.jsonl",
          "answer_paths": [DATA / "mt_bench/model_answer/gpt-4o.jsonl"]}, 80),
        ("mmlu_redux", "mmlu_redux/questions", {"label": "corrected"}, 5700),
        ("helm_mmlu", "mmlu_redux/helm_original", {"models": ["meta_llama-3-70b"]}, 1079),
        ("helm_combined", "mmlu_redux/helm_combined",
         {"questions": DATA / "mmlu_redux/questions"}, None),
        ("arc", "arc/arc_easy_test.jsonl", {}, 2376),
    ],
)
def test_real_files_smoke(name, path, kwargs, n):
    ex = D.load_dataset(name, DATA / path, **kwargs)
    if n is not None:
        assert len(ex) == n
    else:
        assert 5000 < len(ex) <= 5700
    assert len({e.id for e in ex}) == len(ex)
    assert {e.grader for e in ex} == {KIND_GRADER[name]}
    if name != "mt_bench":
        assert all(e.gold for e in ex if e.meta.get("label_source") != "no_listed_option")


@needs_data
def test_real_gsm8k_stored_correctness_matches_gold():
    from confroute.estimators.answers import extract_number

    ex = D.load_gsm8k_solutions(DATA / "gsm8k/example_model_solutions.jsonl")
    acc = sum(e.meta["is_correct"]["175b_verification"] for e in ex) / len(ex)
    assert acc == pytest.approx(0.563, abs=0.002)
    agree = sum((extract_number(e.recorded["6b_finetuning"]) == e.gold[0])
                == e.meta["is_correct"]["6b_finetuning"] for e in ex) / len(ex)
    assert agree > 0.98
