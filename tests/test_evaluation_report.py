"""The results page of ``confroute evaluate-report`` (confroute.evaluation.report)."""

from __future__ import annotations

import json

from confroute.evaluation.datasets import load_dataset
from confroute.evaluation.harness import evaluate_pair, markdown_report
from confroute.evaluation.report import SUITE_DEFAULTS, results_markdown

ROWS = [  # question, gold, (6b answer, correct), (175b answer, correct)
    ("2 plus 2?", 4, (4, True), (4, True)),
    ("10 minus 3?", 7, (7, True), (6, False)),
    ("5 times 5?", 25, (20, False), (25, True)),
    ("9 divided by 3?", 3, (2, False), (3, True)),
]


def test_results_markdown_holds_every_report_and_run(tmp_path):
    path = tmp_path / "example_model_solutions.jsonl"
    path.write_text("".join(json.dumps({
        "question": q, "ground_truth": f"Work.\nA: {gold}",
        "6b_finetuning": {"is_correct": ok6, "solution": f"Steps.\nA: {a6}"},
        "175b_finetuning": {"is_correct": ok175, "solution": f"Steps.\nA: {a175}"},
    }) + "\n" for q, gold, (a6, ok6), (a175, ok175) in ROWS))
    report = evaluate_pair(load_dataset("gsm8k_solutions", path), "6b_finetuning",
                           "175b_finetuning", n_boot=20, dataset="tiny pair", plots=False)
    history = [
        {"time": "2026-01-01 10:00:00", "wall_seconds": 12.4, "model_calls": 7,
         "edge_model_loaded": True, "load_start": 1.5, "load_end": None},
        {"time": "2026-01-01 11:00:00", "wall_seconds": 3.0, "model_calls": 0,
         "edge_model_loaded": False, "load_start": None, "load_end": 0.5},
    ]
    sizes = {k: SUITE_DEFAULTS[k] for k in ("nq", "trivia", "arith", "n_samples",
                                            "max_new_tokens")}
    page = results_markdown({"reports": [report], "history": history, "sizes": sizes})
    assert page.startswith("# Results\n")
    sections = [line for line in page.splitlines() if line.startswith("## ")]
    assert sections == ["## Setup", "## Runs", "## Live edge model",
                        "## Recorded pairs (no live model)", "## Reproduce"]
    assert "| 1 | 2026-01-01 10:00:00 | 12 | 7 | yes | 1.5 / n/a |" in page
    assert "| 2 | 2026-01-01 11:00:00 | 3 | 0 | no | n/a / 0.5 |" in page
    assert f"NQ-open `dev.jsonl` ({SUITE_DEFAULTS['nq']} questions" in page
    recorded = page.index("## Recorded pairs")
    assert page.index(markdown_report(report)) > recorded  # a recorded pair, not a live set
