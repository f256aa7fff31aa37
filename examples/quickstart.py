"""Calibrate a router on labelled prompts, route, save and load it, answer with a cloud.

    python examples/quickstart.py

Uses the embedded edge model; as a stand-in "cloud" it uses the same small model
(any LanguageModel works). Replace it with ``OpenAIModel("gpt-4o-mini")`` or a
bigger local ``HFLanguageModel`` in real use.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from confroute import GenerationConfig, Router, load_default_edge_model
from confroute.calibration_data import default_calibration_set
from confroute.policies import BudgetPolicy


def main() -> None:
    edge = load_default_edge_model()
    rows = default_calibration_set()[::3]  # about 100 labelled questions, to be quick
    router = Router(
        ["sequence_logprob", "mean_token_entropy"],  # two scores from one greedy answer
        "platt",
        BudgetPolicy(max_cloud_fraction=0.4),  # escalate at most 40% of traffic
        edge=edge,
        cloud=edge,  # stand-in cloud for an offline demo
        cloud_config=GenerationConfig(max_new_tokens=48),
    )
    router.calibrate(
        [r["prompt"] for r in rows],
        references=[r["answers"] for r in rows],
        grader=[r["grader"] for r in rows],
    )
    policy = router.policy
    lo, hi = policy.cloud_fraction_interval_
    print(f"calibrated on {len(rows)} prompts: edge accuracy "
          f"{router.calibration_['edge_accuracy']:.2f}; threshold p_good < "
          f"{policy.threshold_:.2f} escalates; expected cloud share in [{lo:.2f}, {hi:.2f}]")

    path = Path(tempfile.mkdtemp()) / "router.json"
    router.save(path)
    router = Router.load(path, edge=edge, cloud=edge)
    for r in router(["What is the capital of Italy?", "What is 483 times 27?"]):
        d = r.decision
        print(f"{d.prompt!r}: {r.source} (p_good {d.p_good:.2f}) -> {r.text!r}")


if __name__ == "__main__":
    main()
