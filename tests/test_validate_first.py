"""Bad arguments to evaluate and make_se_labels are refused before any generation (issue 11).

A spy wraps a real tiny model and records every generation call; each bad argument
must raise a typed confroute error naming the parameter while the spy stays silent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from confroute.errors import ConfrouteError
from confroute.evaluation.datasets import Example
from confroute.evaluation.harness import evaluate
from confroute.models.hf import HFLanguageModel
from confroute.predictive.labels import make_se_labels


class Spy:
    """Forwards to a real model and counts generation calls."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name = model.name
        self.n_generations = 0

    def generate(self, prompts: Any, config: Any) -> Any:
        self.n_generations += 1
        return self.model.generate(prompts, config)

    def generate_multi(self, prompts: Any, configs: Any) -> Any:
        self.n_generations += 1
        return self.model.generate_multi(prompts, configs)


@pytest.fixture()
def spy(tiny_llama: Any) -> Spy:
    return Spy(HFLanguageModel(*tiny_llama, use_chat_template=False))


def _examples(n: int = 8) -> list[Example]:
    return [Example(id=f"q{i}", prompt=f"question {i}?", gold=(f"a{i}",), kind="short")
            for i in range(n)]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"estimators": ["no_such_estimator"]}, "no_such_estimator"),
        ({"grader": "no_such_grader"}, "grader"),
        ({"calibration_fraction": 1.5}, "calibration_fraction"),
        ({"n_boot": -1}, "n_boot"),
        ({"n_samples": 0}, "n_samples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"equivalence": "no_such_equivalence"}, "equivalence"),
        ({"cloud": "model-nobody-recorded"}, "cloud"),
    ],
)
def test_evaluate_checks_arguments_before_generating(spy: Spy, tmp_path: Path,
                                                     kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ConfrouteError, match=param):
        evaluate(_examples(), spy, out_dir=tmp_path, plots=False, **kwargs)
    assert spy.n_generations == 0


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"ids": ["a", "a", "b"]}, "ids"),
        ({"ids": ["a", "b"]}, "ids"),
        ({"tau": -0.5}, "tau"),
        ({"batch_size": 0}, "batch_size"),
        ({"estimator": 42}, "estimator"),
        ({"strong_model": "not a model"}, "strong_model"),
    ],
)
def test_make_se_labels_checks_arguments_before_generating(spy: Spy, tmp_path: Path,
                                                           change: dict[str, Any],
                                                           param: str) -> None:
    from confroute.estimators.semantic import SemanticEntropy

    args: dict[str, Any] = {
        "prompts": ["p1?", "p2?", "p3?"], "ids": ["a", "b", "c"], "weak_model": spy,
        "strong_model": spy, "estimator": SemanticEntropy(n_samples=2, equivalence="exact"),
        "tau": 0.1, "out_path": tmp_path / "labels.jsonl", "progress": False,
    }
    args.update(change)
    with pytest.raises(ConfrouteError, match=param):
        make_se_labels(**args)
    assert spy.n_generations == 0
    assert not (tmp_path / "labels.jsonl").exists()
