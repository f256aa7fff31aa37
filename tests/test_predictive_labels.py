"""Tests of semantic-entropy preference labels and their JSON-lines persistence."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confroute.errors import (
    InvalidParameterError,
    InvalidTypeError,
    SerializationError,
)
from confroute.predictive.labels import (
    accuracy_labels,
    label_credits,
    make_se_labels,
    preference_label,
    preference_labels,
    preference_rows,
    read_labels_jsonl,
    row_label,
    write_labels_jsonl,
)

# ----------------------------------------------------------------------------- rule


@pytest.mark.parametrize(
    ("se_strong", "se_weak", "tau", "expected"),
    [
        (0.2, 1.0, 0.5, "strong"),   # delta = 4 > 0.5, strong lower
        (1.0, 0.2, 0.5, "weak"),     # delta = 0.8 > 0.5, weak lower
        (1.0, 0.7, 0.5, "tie"),      # delta = 0.3 <= 0.5
        (1.0, 1.5, 0.5, "tie"),      # delta = 0.5, not > tau
        (1.0, 1.5, 0.49, "strong"),  # delta = 0.5 > 0.49
        (0.8, 0.8, 0.0, "tie"),      # equal SE is always a tie
        (0.0, 0.0, 0.0, "tie"),      # 0/0 -> tie by definition
        (0.0, 0.0, 10.0, "tie"),
        (0.0, 0.3, 0.0, "strong"),   # relative difference infinite -> strong wins
        (0.0, 1e-9, 1e6, "strong"),
        (2.0, 0.0, 0.5, "weak"),     # delta = 1 > 0.5
        (2.0, 0.0, 1.0, "tie"),      # delta = 1, not > 1
    ],
)
def test_preference_label_hand_made(se_strong, se_weak, tau, expected):
    assert preference_label(se_strong, se_weak, tau) == expected
    assert preference_labels([se_strong], [se_weak], tau).tolist() == [expected]


def test_preference_labels_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    s = rng.exponential(size=200)
    w = rng.exponential(size=200)
    s[:10] = 0.0
    w[5:15] = 0.0
    vec = preference_labels(s, w, 0.3)
    assert vec.shape == (200,)
    assert vec.tolist() == [preference_label(a, b, 0.3) for a, b in zip(s, w)]
    assert set(vec.tolist()) == {"strong", "weak", "tie"}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), min_size=1, max_size=30),
    st.floats(0, 5),
    st.floats(0, 5),
)
def test_preference_labels_properties(pairs, tau1, tau2):
    s = np.array([p[0] for p in pairs])
    w = np.array([p[1] for p in pairs])
    lo, hi = min(tau1, tau2), max(tau1, tau2)
    lab_lo = preference_labels(s, w, lo)
    lab_hi = preference_labels(s, w, hi)
    # the winner always has the lower SE
    assert np.all(s[lab_lo == "strong"] < w[lab_lo == "strong"])
    assert np.all(w[lab_lo == "weak"] < s[lab_lo == "weak"])
    # raising tau only turns decisive labels into ties, never flips a winner
    changed = lab_lo != lab_hi
    assert np.all(lab_hi[changed] == "tie")
    # equal SE is a tie at any tau
    assert np.all(lab_lo[s == w] == "tie")


@pytest.mark.parametrize(
    ("kwargs", "match", "exc"),
    [
        ({"se_strong": [0.1], "se_weak": [0.2], "tau": -0.1}, "'tau' parameter",
         InvalidParameterError),
        ({"se_strong": [0.1], "se_weak": [0.2], "tau": "x"}, "'tau' parameter", InvalidTypeError),
        ({"se_strong": [-0.1], "se_weak": [0.2], "tau": 0.1}, "'se_strong' parameter.*non-negative",
         InvalidParameterError),
        ({"se_strong": [0.1], "se_weak": [np.nan], "tau": 0.1}, "'se_weak' parameter.*finite",
         InvalidParameterError),
        ({"se_strong": [0.1, 0.2], "se_weak": [0.2], "tau": 0.1}, "same length",
         InvalidParameterError),
    ],
)
def test_preference_labels_errors(kwargs, match, exc):
    with pytest.raises(exc, match=match):
        preference_labels(**kwargs)


def test_accuracy_labels():
    out = accuracy_labels([1, 1, 0, 0], [True, False, True, False])
    assert out.tolist() == ["tie", "strong", "weak", "tie"]
    with pytest.raises(InvalidParameterError, match="'correct_weak' parameter"):
        accuracy_labels([1, 0], [1, 2])


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["strong", "weak", "tie"], [1.0, 0.0, 0.5]),
        (np.array(["tie", "strong"]), [0.5, 1.0]),
        ([1, 0, 0.5], [1.0, 0.0, 0.5]),
        ([0.25], [0.25]),
    ],
)
def test_label_credits(labels, expected):
    np.testing.assert_array_equal(label_credits(labels), expected)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (["strong", "draw"], "'labels' parameter.*'draw' at index 1"),
        ([1.0, 2.0], "'labels' parameter.*2.0 at index 1"),
        (["strong", 1], "must not mix"),
        ([], "non-empty"),
    ],
)
def test_label_credits_errors(labels, match):
    with pytest.raises(InvalidParameterError, match=match):
        label_credits(labels)


# ----------------------------------------------------------------------------- rows / jsonl


def _rows():
    return preference_rows(
        ["a", 7, "c"],
        ["What is 2+2?", [{"role": "user", "content": "Hi"}], "Capital of France?"],
        ["strong", "weak", "tie"],
        strong_name="big", weak_name="small",
        se_strong=[0.0, 1.2, 0.5], se_weak=[0.7, 0.1, 0.5],
    )


def test_rows_format_and_round_trip(tmp_path):
    rows = _rows()
    assert rows[0] == {
        "id": "a", "prompt": "What is 2+2?", "model_a": "big", "model_b": "small",
        "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0, "se_a": 0.0, "se_b": 0.7,
    }
    assert [row_label(r) for r in rows] == ["strong", "weak", "tie"]
    path = write_labels_jsonl(rows, tmp_path / "sub" / "labels.jsonl")
    back = read_labels_jsonl(path)
    assert back == rows
    assert isinstance(back[1]["id"], int)


def test_accuracy_rows_have_null_se(tmp_path):
    rows = preference_rows(["x"], ["q"], accuracy_labels([1], [0]), strong_name="s",
                           weak_name="w")
    path = write_labels_jsonl(rows, tmp_path / "l.jsonl")
    assert read_labels_jsonl(path)[0]["se_a"] is None


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop("winner_tie"), "missing key"),
        (lambda r: r.update(winner_tie=1), "exactly one"),
        (lambda r: r.update(winner_model_a=True), "exactly one"),
        (lambda r: r.update(se_a=-1.0), "'se_a'"),
        (lambda r: r.update(id=1.5), "'id'"),
        (lambda r: r.update(prompt=""), "'prompt'"),
        (lambda r: r.update(model_a=3), "'model_a'"),
    ],
)
def test_read_rejects_bad_rows(tmp_path, mutate, match):
    rows = _rows()
    mutate(rows[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SerializationError, match=match):
        read_labels_jsonl(path)
    with pytest.raises(SerializationError, match=match):
        write_labels_jsonl(rows, tmp_path / "never.jsonl")
    assert not (tmp_path / "never.jsonl").exists()


def test_read_duplicate_ids_and_truncation(tmp_path):
    rows = _rows()
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[0]]))
    with pytest.raises(SerializationError, match="duplicate id 'a'"):
        read_labels_jsonl(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "d", "pro')
    with pytest.raises(SerializationError, match="line 4 is not valid JSON"):
        read_labels_jsonl(path)
    with pytest.warns(UserWarning, match="truncated"):
        assert len(read_labels_jsonl(path, allow_truncated_tail=True)) == 3
    with pytest.raises(SerializationError, match="does not exist"):
        read_labels_jsonl(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- make_se_labels


@dataclass
class _Model:
    name: str


@dataclass
class _Est:
    scores: np.ndarray


class CountingSE:
    """Fake estimator: deterministic SE per (model, prompt); counts calls, can fail."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    @staticmethod
    def se(model: str, prompt: str) -> float:
        n = int(prompt.split()[-1])
        if model == "big":
            return 0.1 if n % 3 == 0 else (1.0 if n % 3 == 1 else 0.5)
        return 1.0 if n % 3 == 0 else (0.1 if n % 3 == 1 else 0.55)

    def estimate(self, prompts, model):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((model.name, tuple(prompts)))
        return _Est(np.array([self.se(model.name, p) for p in prompts]))


def _expected(n: int) -> dict[str, str]:
    return {f"id{i}": ["strong", "weak", "tie"][i % 3] for i in range(n)}


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_make_se_labels_resumes_without_redoing(tmp_path, batch_size):
    n = 10
    prompts = [f"question number {i}" for i in range(n)]
    ids = [f"id{i}" for i in range(n)]
    out = tmp_path / "labels.jsonl"
    strong, weak = _Model("big"), _Model("small")

    first = CountingSE(fail_after=4)  # two estimate calls per batch: 2 batches complete
    with pytest.raises(KeyboardInterrupt):
        make_se_labels(prompts, ids, weak, strong, first, 0.2, out, batch_size=batch_size,
                       progress=False)
    done = read_labels_jsonl(out)
    assert [r["id"] for r in done] == ids[: 2 * batch_size]

    second = CountingSE()
    rows = make_se_labels(prompts, ids, weak, strong, second, 0.2, out, batch_size=batch_size,
                          progress=False)
    redone = [p for _, batch in second.calls for p in batch]
    assert sorted(set(redone)) == sorted(prompts[2 * batch_size:])
    assert len(redone) == 2 * (n - 2 * batch_size)  # each remaining prompt once per model
    assert {r["id"]: row_label(r) for r in rows} == _expected(n)
    assert all(r["model_a"] == "big" and r["model_b"] == "small" for r in rows)
    assert rows[0]["se_a"] == pytest.approx(0.1) and rows[0]["se_b"] == pytest.approx(1.0)

    third = CountingSE()
    again = make_se_labels(prompts, ids, weak, strong, third, 0.2, out, progress=False)
    assert third.calls == [] and again == rows


def test_make_se_labels_repairs_truncated_tail(tmp_path):
    prompts = [f"q {i}" for i in range(4)]
    ids = list(range(4))
    out = tmp_path / "l.jsonl"
    make_se_labels(prompts[:2], ids[:2], _Model("small"), _Model("big"), CountingSE(), 0.2,
                   out, progress=False)
    with out.open("a") as fh:
        fh.write('{"id": 2, "prompt": "q 2", "mod')  # killed mid-write
    est = CountingSE()
    with pytest.warns(UserWarning, match="truncated"):
        rows = make_se_labels(prompts, ids, _Model("small"), _Model("big"), est, 0.2, out,
                              progress=False)
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert {p for _, b in est.calls for p in b} == {"q 2", "q 3"}


def test_make_se_labels_skips_nan_and_checks_models(tmp_path):
    class NanSE(CountingSE):
        def estimate(self, prompts, model):
            res = super().estimate(prompts, model)
            res.scores[[i for i, p in enumerate(prompts) if p.endswith(" 1")]] = np.nan
            return res

    out = tmp_path / "l.jsonl"
    prompts = [f"q {i}" for i in range(3)]
    with pytest.warns(UserWarning, match="1 prompt"):
        rows = make_se_labels(prompts, ["a", "b", "c"], _Model("small"), _Model("big"), NanSE(),
                              0.2, out, progress=False)
    assert [r["id"] for r in rows] == ["a", "c"]
    with pytest.raises(InvalidParameterError, match=r"'out_path' parameter.*model_a='big'"):
        make_se_labels(prompts, ["a", "b", "c"], _Model("small"), _Model("other"), CountingSE(),
                       0.2, out, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"ids": ["a", "a"]}, InvalidParameterError, "'ids' parameter.*unique"),
        ({"ids": ["a"]}, InvalidParameterError, "same length"),
        ({"ids": ["a", 1.5]}, InvalidTypeError, r"'ids\[1\]' parameter"),
        ({"tau": -1.0}, InvalidParameterError, "'tau' parameter"),
        ({"batch_size": 0}, InvalidParameterError, "'batch_size' parameter"),
        ({"prompts": "q 1"}, InvalidTypeError, "'prompts' parameter"),
        ({"progress": 1}, InvalidTypeError, "'progress' parameter"),
    ],
)
def test_make_se_labels_input_errors(tmp_path, kwargs, exc, match):
    args = {"prompts": ["q 1", "q 2"], "ids": ["a", "b"], "weak_model": _Model("s"),
            "strong_model": _Model("b"), "estimator": CountingSE(), "tau": 0.1,
            "out_path": tmp_path / "x.jsonl", "progress": False}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        make_se_labels(**args)
