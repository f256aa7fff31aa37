"""Evaluation tools: datasets, recorded models, graders, LLM judge and metrics.

Submodules load on first attribute access, so ``import confroute.evaluation``
stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # datasets
    "Example": "confroute.evaluation.datasets",
    "load_dataset": "confroute.evaluation.datasets",
    "load_gsm8k": "confroute.evaluation.datasets",
    "load_gsm8k_solutions": "confroute.evaluation.datasets",
    "load_nq_open": "confroute.evaluation.datasets",
    "load_triviaqa": "confroute.evaluation.datasets",
    "load_mt_bench": "confroute.evaluation.datasets",
    "load_mmlu_redux": "confroute.evaluation.datasets",
    "load_helm_mmlu": "confroute.evaluation.datasets",
    "load_helm_combined": "confroute.evaluation.datasets",
    "load_arc": "confroute.evaluation.datasets",
    "split": "confroute.evaluation.datasets",
    "dataset_names": "confroute.evaluation.datasets",
    # recorded models
    "RecordedModel": "confroute.evaluation.recorded",
    "RecordedAnswerMissing": "confroute.evaluation.recorded",
    # graders: one grading module, shared with Router.calibrate
    "BaseGrader": "confroute.grading",
    "ExactMatchGrader": "confroute.grading",
    "NumericGrader": "confroute.grading",
    "ChoiceGrader": "confroute.grading",
    "Grader": "confroute.grading",
    "get_grader": "confroute.grading",
    "resolve_grader": "confroute.grading",
    "grade_answers": "confroute.evaluation.harness",
    # judge
    "BestOfKJudge": "confroute.evaluation.judge",
    "BestOfKResult": "confroute.evaluation.judge",
    "MTBenchJudge": "confroute.evaluation.judge",
    "MTBenchResult": "confroute.evaluation.judge",
    "load_judge_prompts": "confroute.evaluation.judge",
    "parse_best_verdict": "confroute.evaluation.judge",
    "parse_rating": "confroute.evaluation.judge",
    # metrics
    "apgr": "confroute.evaluation.metrics",
    "auprc": "confroute.evaluation.metrics",
    "auroc": "confroute.evaluation.metrics",
    "bootstrap_ci": "confroute.evaluation.metrics",
    "brier": "confroute.evaluation.metrics",
    "cpt": "confroute.evaluation.metrics",
    "ece": "confroute.evaluation.metrics",
    "oracle_curve": "confroute.evaluation.metrics",
    "pgr": "confroute.evaluation.metrics",
    "prr": "confroute.evaluation.metrics",
    "quality_at_budget": "confroute.evaluation.metrics",
    "quality_vs_cloud_fraction": "confroute.evaluation.metrics",
    "random_curve": "confroute.evaluation.metrics",
    "reliability_curve": "confroute.evaluation.metrics",
}

__all__ = sorted(_LAZY)


# public names kept from before graders moved to confroute.grading
_RENAMED = {"Grader": "BaseGrader"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'confroute.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
