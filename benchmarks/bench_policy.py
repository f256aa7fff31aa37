"""B4: calibrator + policy throughput on precomputed scores (vectorised)."""

from __future__ import annotations

import numpy as np

from benchmarks._common import Context, Row, interleave


def run(ctx: Context) -> list[Row]:
    from confroute.calibration import IsotonicCalibrator, PlattCalibrator
    from confroute.policies import ThresholdPolicy

    rng = np.random.default_rng(0)
    fit_scores = rng.gamma(2.0, 1.0, size=2000)
    fit_labels = (rng.random(2000) < 1.0 / (1.0 + np.exp(fit_scores - 2.0))).astype(int)
    n = 1_000_000
    scores = rng.gamma(2.0, 1.0, size=n)
    rows: list[Row] = []
    for name, cal in [("isotonic", IsotonicCalibrator()), ("platt", PlattCalibrator())]:
        cal.fit(fit_scores, fit_labels)
        pol = ThresholdPolicy(min_p_good=0.5)

        def decide(cal: object = cal, pol: ThresholdPolicy = pol) -> np.ndarray:
            return pol.decide(cal.p_good(scores))  # type: ignore[attr-defined]

        wall, _ = interleave({"d": decide}, ctx.repeats)
        rows.append(
            Row("B4", f"{name} + threshold decisions per second", [n / t for t in wall["d"]],
                "1/s", note=f"batch of {n:,} precomputed scores").check(">=", 1e6, on="median")
        )
    return rows
