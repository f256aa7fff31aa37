"""The pieces of benchmarks/traffic.py (docs/results-traffic.md) on tiny sizes.

Real parts throughout: a tiny random Llama as the edge model, the loopback
reference cloud over real HTTP, the routing server, the decision log. This
checks the script's bookkeeping, not the measurement itself.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from benchmarks import traffic as T
from benchmarks.reference_cloud import ReferenceCloudServer, last_user_content
from confroute.evaluation.datasets import Example


# ------------------------------------------------------------------ small pieces
@pytest.mark.parametrize("budget", [0.3, 0.25, 0.5])
def test_prefix_check_matches_floor_cap(budget):
    rng = np.random.default_rng(0)
    flags = rng.random(200) < budget * 0.8
    out = T.prefix_check(flags, budget)
    b = Fraction(str(budget))
    cum = np.cumsum(flags)
    excess = [int(c) - int(b * (i + 1)) for i, c in enumerate(cum)]
    assert out["n"] == 200 and out["cloud"] == int(flags.sum())
    assert out["max_prefix_excess"] == max(excess)
    assert out["violations"] == sum(e > 0 for e in excess)
    assert out["prefix_share"][-1] == pytest.approx(flags.mean())


def test_prefix_check_flags_a_violation():
    # One cloud answer as the very first request already exceeds floor(0.3 * 1) = 0.
    out = T.prefix_check([True, False, False, False], 0.3)
    assert out["max_prefix_excess"] == 1 and out["violations"] == 3
    ok = T.prefix_check([False, False, False, True], 0.3)
    assert ok["max_prefix_excess"] <= 0 and ok["violations"] == 0


def test_quality_at_share_random_and_oracle():
    e, c = [1, 0, 0, 0], [1, 1, 1, 1]
    q = T.quality_at_share(e, c, 0.25)
    assert q["edge_only"] == 0.25 and q["cloud_only"] == 1.0
    assert q["random"] == pytest.approx(0.25 + 0.25 * 0.75)
    assert q["oracle"] == pytest.approx(0.5)


def test_grade_uses_number_and_containment_graders():
    num = Example(id="a", prompt="What is 2 + 3?", gold=("5",), kind="number")
    short = Example(id="b", prompt="Capital of France?", gold=("Paris",), kind="short")
    assert T.grade(num, "It is 5.") == 1.0 and T.grade(num, "6") == 0.0
    assert T.grade(short, "The capital is Paris.") == 1.0 and T.grade(short, "Lyon") == 0.0
    assert T.grade(short, None) == 0.0


def test_size_notes_say_where_sizes_are_below_the_issue():
    notes = " ".join(T.size_notes(T.TINY))
    assert "below the 600" in notes and "below the 500" in notes and "below the 32" in notes
    full = " ".join(T.size_notes(T.Sizes()))
    assert "600" not in full and "below the 500" not in full


def test_load_sets_reads_development_and_report_files_only(tmp_path):
    (tmp_path / "nq_open").mkdir()
    (tmp_path / "triviaqa").mkdir()
    rows = [{"question": f"q{i}", "answer": [f"a{i}"]} for i in range(30)]
    rows.append(rows[0])  # a duplicate question is dropped
    text = "\n".join(json.dumps(r) for r in rows)
    (tmp_path / "nq_open" / "dev.jsonl").write_text(text)
    (tmp_path / "nq_open" / "efficientqa_dev.jsonl").write_text(text)
    (tmp_path / "triviaqa" / "triviaqa_sm_sub.jsonl").write_text("\n".join(
        json.dumps({"context": f"Question: t{i}?\nAnswer:", "answer": f"x{i}", "aliases": []})
        for i in range(10)))
    sizes = T.Sizes(nq=5, trivia=4, arith=7, cal=8, report=6, stream_max=100)
    sets = T.load_sets(tmp_path, sizes)
    assert [len(sets[k]) for k in ("nq", "trivia", "arith", "cal", "report", "stream")] == [
        5, 4, 7, 8, 6, 30]
    # prefix-stable subsamples share generations: every smaller set is inside the stream
    stream = {ex.prompt for ex in sets["stream"]}
    assert {ex.prompt for ex in sets["nq"] + sets["cal"]} <= stream


# ----------------------------------------------------------------- reference cloud
def test_reference_cloud_answers_over_real_http_and_refuses_unknown():
    import openai

    from confroute.errors import CloudError
    from confroute.models import OpenAIModel
    from confroute.types import GenerationConfig

    with ReferenceCloudServer({"Who wrote Hamlet?": "William Shakespeare"}) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        r = client.chat.completions.create(model="m", messages=T.chat("Who wrote Hamlet?"))
        assert r.choices[0].message.content == "William Shakespeare"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="m", messages=T.chat("Unknown?"))
        model = OpenAIModel("reference-cloud", base_url=srv.base_url, api_key="x",
                            logprobs=False, max_retries=0)
        out = model.generate([T.chat("Who wrote Hamlet?")], GenerationConfig(max_new_tokens=8))
        assert out[0][0].text == "William Shakespeare"
        with pytest.raises(CloudError):
            model.generate([T.chat("Unknown?")], GenerationConfig(max_new_tokens=8))
        assert srv.served == 2 and srv.missing == 2


def test_last_user_content():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert last_user_content(msgs) == "c"
    assert last_user_content([{"role": "system", "content": "s"}]) is None
    assert last_user_content("not a list") is None


# ----------------------------------------------------------------- label-free rows
def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)  # an uncertainty: higher = more likely wrong
    y = (rng.random(n) < 1 / (1 + np.exp(2 * x))).astype(float)
    return x, y


def test_labelfree_rows_gold_subset_and_one_class():
    from confroute.calibration import IsotonicCalibrator

    x_cal, y_cal = _synthetic(300, 0)
    x_rep, y_rep = _synthetic(300, 1)
    noisy = y_cal.copy()
    noisy[:30] = 1 - noisy[:30]
    subset = np.full(300, np.nan)
    subset[:100] = y_cal[:100]
    labelsets = [
        {"name": "gold (graded references)", "cloud": "references", "labels": y_cal},
        {"name": "cloud_agreement (exact)", "cloud": "reference", "labels": noisy,
         "cost": {"cloud_requests": 300, "seconds": 0.1}},
        {"name": "subset", "cloud": "x", "labels": subset, "subset": True},
        {"name": "one class", "cloud": "x", "labels": np.ones(300)},
    ]
    rows = T.labelfree_rows(IsotonicCalibrator(), x_cal, y_cal, labelsets, x_rep, y_rep)
    names = [r["name"] for r in rows]
    assert names == ["gold (graded references)", "cloud_agreement (exact)", "subset",
                     "gold (same 100 questions)", "one class"]
    gold, noisy_row, sub, sub_gold, one = rows
    assert gold["kappa"] == 1.0 and gold["n_labels"] == 300
    assert 0 < noisy_row["kappa"] < 1
    assert sub["n_labels"] == sub_gold["n_labels"] == 100
    assert sub["auroc"] == pytest.approx(sub_gold["auroc"])  # same labels on the same rows
    assert gold["auroc"] > 0.7 and 0 <= gold["ece"] <= 0.2
    assert math.isnan(one["auroc"]) and "one class" in one["note"]
    goal = T.labelfree_goal(rows)
    assert set(goal) == {"cloud_agreement (exact)"}
    g = goal["cloud_agreement (exact)"]
    assert g["auroc_gap"] == pytest.approx(gold["auroc"] - noisy_row["auroc"])
    assert g["met"] == (g["auroc_gap"] <= 0.03 and g["ece_gap"] <= 0.05 and g["ece"] <= 0.05)


def test_recalibration_windows_before_after():
    from confroute.calibration import IsotonicCalibrator

    x_old, y_old = _synthetic(200, 2)
    before = IsotonicCalibrator().fit(x_old, (1 - y_old).astype(int))  # badly calibrated
    x, y = _synthetic(400, 3)
    after = IsotonicCalibrator().fit(x[:100], y[:100].astype(int))
    records = [{"score": float(a), "truth": float(b)} for a, b in zip(x, y)]
    events = [{"checkpoint": 50, "labels": 51, "at": 100, "calibrator": after,
               "threshold": 0.4}]
    (w,) = T.recalibration_windows(before, records, events, window=250)
    assert w["n"] == 250 and w["at"] == 100
    assert w["ece_after"] < w["ece_before"] and w["auroc_after"] > w["auroc_before"]
    assert w["ece_halved"] == (w["ece_after"] <= w["ece_before"] / 2)


# --------------------------------------------------- end to end on a tiny edge model
@pytest.fixture(scope="module")
def tiny_edge():
    from confroute.models.hf import HFLanguageModel
    from tests.tiny_models import make_causal_lm

    # This seed answers with a non-empty (if silly) string, so answers can agree.
    return HFLanguageModel(*make_causal_lm("gpt2", seed=3), name="tiny-gpt2")


def _examples_agreeing_half(edge, n: int, prefix: str) -> list[Example]:
    """Questions whose reference answer is the edge's own short answer for even i (so the
    cloud-agreement label is 1 there) and an unrelated word for odd i."""
    from confroute.labeling import short_answer

    prompts = [f"{prefix} question {i}?" for i in range(n)]
    router = T.default_router(edge)
    answers = [d.edge_answer or "" for d in router.route([T.chat(p) for p in prompts])]
    return [Example(id=f"{prefix}{i}", prompt=p,
                    gold=((short_answer(a) or "zzz") if i % 2 == 0 else "zebra",),
                    kind="short")
            for i, (p, a) in enumerate(zip(prompts, answers))]


def test_run_shift_on_a_tiny_edge(tiny_edge):
    exs = _examples_agreeing_half(tiny_edge, 12, "shift")
    sets = {"nq": exs[:4], "trivia": exs[4:8], "arith": exs[8:]}
    sizes = T.Sizes(clients=4, budget=0.3)
    out = T.run_shift(tiny_edge, sets, sizes)
    assert out["n"] == 12 and out["lost"] == 0
    p = out["prefix"]
    assert p["n"] == 12 and p["max_prefix_excess"] <= 0 and p["cloud"] <= 3
    assert out["cloud_served"] == p["cloud"]
    assert out["ledger"]["requests"] == 12 and out["ledger"]["cloud"] == p["cloud"]
    assert [r["n"] for r in out["per_set"]] == [4, 4, 4]
    q = out["quality"]
    assert q["cloud_only"] == 1.0 and q["edge_only"] <= q["oracle"] <= 1.0
    assert sorted(out["arrival_sets"]) == sorted(["NQ-open dev"] * 4 + ["TriviaQA"] * 4
                                                 + ["arithmetic"] * 4)
    ad = T.run_shift(tiny_edge, sets, sizes, adapt_window=4)  # adapts after 4 requests
    assert ad["adapt_window"] == 4 and ad["lost"] == 0 and ad["prefix"]["max_prefix_excess"] <= 0
    md = "\n".join(T.adaptive_section(out, ad))
    assert "adapt_window=4" in md and "| NQ-open dev |" in md


def test_run_recalibration_and_report_on_a_tiny_edge(tiny_edge, tmp_path):
    exs = _examples_agreeing_half(tiny_edge, 60, "stream")
    sizes = T.Sizes(shadow_rate=1.0, checkpoints=(4, 8), window=10, budget=0.3)
    out = T.run_recalibration(tiny_edge, {"stream": exs}, sizes, tmp_path / "recal")
    assert out["checkpoints_reached"] == [4, 8]
    assert out["shadow_labels"] >= 8 and out["prefix"]["max_prefix_excess"] <= 0
    first, second = out["windows"]
    assert first["labels"] >= 4 and second["labels"] >= 8 and first["n"] == 10
    assert out["n"] <= len(exs)
    assert (tmp_path / "recal" / "decisions.sqlite").exists()

    summary = {"sizes": T.dataclasses.asdict(sizes), "size_notes": T.size_notes(sizes),
               "recalibration": out,
               "runs": [{"parts": ["recal"], "command": "python benchmarks/traffic.py",
                         "started": "s", "finished": "f", "wall_seconds": 1.0,
                         "load_start": 1.0, "load_end": 2.0, "machine": {"cpus": 2}}]}
    doc = tmp_path / "docs" / "results-traffic.md"
    doc.parent.mkdir()
    plots = T.write_plots(summary, tmp_path / "docs" / "img")
    text = T.report_markdown(summary, plots, doc)
    assert "## 3. Recalibration" in text and "img/traffic-recalibration-share.png" in text
    assert (tmp_path / "docs" / "img" / "traffic-recalibration-share.png").stat().st_size > 0
    assert "held" in text and "below the 500" in text
    assert "Parts recal: `python benchmarks/traffic.py`" in text and "load average" in text
