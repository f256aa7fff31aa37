"""Early escalation: stop the edge answer as soon as the decision is settled.

While the edge model decodes its greedy answer, the running token statistics
already bound the final uncertainty score. With a calibrator that is
non-increasing in the score and a policy that escalates when
:math:`p_{good} < \\tau`, there is a score :math:`s^*` with

.. math:: s \\ge s^* \\implies \\hat p(s) < \\tau \\implies \\text{escalate}.

:class:`EarlyEscalation` computes :math:`s^*` from a calibrated
:class:`~confroute.router.Router` and stops each answer once a lower bound of its
final score reaches :math:`s^*`:

- ``SequenceLogProb(normalize=False)``: the total negative log-likelihood
  :math:`S_t = -\\sum_{i \\le t} \\log p_i` only grows with length, so
  :math:`S_t \\ge s^*` settles the decision (exact).
- ``SequenceLogProb(normalize=True)`` and ``MeanTokenEntropy`` (means of
  non-negative per-token terms over :math:`T \\le T_{max}` tokens):
  ``mode="sound"`` stops when :math:`S_t / T_{max} \\ge s^*`, a bound the final
  mean can never fall below (decisions are those of full generation);
  ``mode="heuristic"`` stops when the running mean :math:`S_t / t \\ge s^*` after
  ``min_tokens`` tokens (saves more; the decision may differ from full generation,
  since later confident tokens could lower the mean).

The stopped prompt escalates, so the truncated edge answer is never served; it is
completed only if the cloud call fails and the router degrades to the edge answer.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from confroute._validation import check_choice, check_int, check_prompts, param_error
from confroute.errors import InvalidParameterError
from confroute.types import (
    Decision,
    GenerationConfig,
    Prompt,
    RoutedResponse,
    Sample,
    Samples,
)

__all__ = ["EarlyEscalation"]

_OWNER = "EarlyEscalation"


class EarlyEscalation:
    """Route with a router, stopping the edge answer once escalation is certain.

    Parameters
    ----------
    router : Router
        A calibrated router with one estimator (``SequenceLogProb`` or
        ``MeanTokenEntropy``), a calibrator non-increasing in the score
        (``IsotonicCalibrator`` with ``increasing_ == False`` or a one-feature
        ``PlattCalibrator`` with a non-positive weight), a fixed-threshold policy
        (``ThresholdPolicy`` or ``RiskControlPolicy``; online budgets are refused,
        since an exhausted budget can keep a low-confidence answer on the edge), and
        an edge model whose ``generate`` accepts ``early_stop``
        (:class:`~confroute.models.HFLanguageModel`).
    mode : {"sound", "heuristic"}, default "sound"
        How a length-normalised score is bounded (see the module notes); ignored
        for the total NLL, whose bound is exact.
    min_tokens : int >= 1, default 4
        ``mode="heuristic"`` only: tokens decoded before the running mean may stop.

    Attributes
    ----------
    stop_score_ : float
        :math:`s^*` of the last call (``inf`` when no score settles escalation).
    n_early_stopped_ : int
        Answers stopped early in the last call.

    Examples
    --------
    >>> early = EarlyEscalation(router)  # doctest: +SKIP
    >>> decisions = early.route(["Who won the 1987 Tour de France?"])  # doctest: +SKIP
    """

    def __init__(self, router: Any, *, mode: str = "sound", min_tokens: int = 4) -> None:
        self.router = router
        self.mode = mode
        self.min_tokens = min_tokens

    # ----------------------------------------------------------------- checks
    def _estimator(self) -> tuple[str, bool, int]:
        """(statistic, normalised, max_new_tokens) of the router's single estimator."""
        from confroute.estimators import MeanTokenEntropy, SequenceLogProb

        ests = getattr(self.router, "estimators", None)
        if not ests or len(ests) != 1:
            raise InvalidParameterError(
                "EarlyEscalation needs a Router with exactly one estimator "
                "(SequenceLogProb or MeanTokenEntropy)."
            )
        est = ests[0]
        m = int(est.sample_request().max_new_tokens)
        if isinstance(est, SequenceLogProb):
            return "nll", bool(est.normalize), m
        if isinstance(est, MeanTokenEntropy):
            return "entropy", True, m
        raise InvalidParameterError(
            f"EarlyEscalation supports SequenceLogProb and MeanTokenEntropy; the router's "
            f"estimator is {type(est).__name__}, whose score has no running bound."
        )

    def _threshold(self) -> float:
        from confroute.policies import OnlinePolicy, RiskControlPolicy, ThresholdPolicy

        pol = self.router.policy
        if isinstance(pol, OnlinePolicy) or not isinstance(
            pol, (ThresholdPolicy, RiskControlPolicy)
        ):
            raise InvalidParameterError(
                f"EarlyEscalation needs a policy that always escalates below a fixed "
                f"threshold (ThresholdPolicy or RiskControlPolicy); got {type(pol).__name__}."
            )
        pol.decide(np.zeros(0))  # raises NotFittedError naming the fix when unfitted
        if isinstance(pol, ThresholdPolicy):
            return float(pol.min_p_good)
        return float(pol.threshold_)

    def _check_calibrator(self) -> None:
        from confroute.calibration import IsotonicCalibrator, PlattCalibrator

        cal = self.router.calibrator
        if isinstance(cal, IsotonicCalibrator) and not cal.increasing_:
            return
        if (
            isinstance(cal, PlattCalibrator)
            and cal.n_features_in_ == 1
            and float(np.asarray(cal.coef_)[0]) <= 0.0
        ):
            return
        raise InvalidParameterError(
            "EarlyEscalation needs a calibrator whose P(good) does not increase with the "
            f"score (isotonic fitted decreasing, or Platt with a non-positive weight); got "
            f"{type(cal).__name__} with another direction."
        )

    def stop_score(self) -> float:
        """:math:`s^*`: every score at or above it escalates (``inf`` if none does).

        Found by bisection on the router's own :meth:`~confroute.router.Router.p_good_of`, and
        returned as a point whose probability was checked to be below the
        threshold, so the stopping rule never disagrees with the policy.
        """
        self.router.check_calibrated()
        self._estimator()
        tau = self._threshold()
        self._check_calibrator()

        def p(s: float) -> float:
            return float(self.router.p_good_of(np.array([s]))[0])

        if p(0.0) < tau:
            return 0.0  # scores are never negative
        hi = 1.0
        while p(hi) >= tau:
            hi *= 2.0
            if hi > 1e12:
                return math.inf
        lo = 0.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if p(mid) < tau:
                hi = mid
            else:
                lo = mid
        return hi

    # -------------------------------------------------------------- generation
    def rule(self) -> Any:
        """The per-step stopping rule for ``HFLanguageModel.generate(early_stop=...)``."""
        stat, normalised, max_tokens = self._estimator()
        mode = check_choice(self.mode, "mode", _OWNER, ("sound", "heuristic"))
        min_tokens = check_int(self.min_tokens, "min_tokens", _OWNER, min_value=1)
        s_star = self.stop_score()
        self.stop_score_ = s_star
        # Running sums and the samples' scores differ only by float summation order.
        tol = 1e-5 * (1.0 + abs(s_star)) if math.isfinite(s_star) else 0.0

        def rule(n_tokens: int, sum_nll: np.ndarray, sum_entropy: np.ndarray) -> np.ndarray:
            total = sum_nll if stat == "nll" else sum_entropy
            if not math.isfinite(s_star):
                return np.zeros(total.shape, dtype=bool)
            if not normalised:
                bound = total
            elif mode == "sound":
                bound = total / max_tokens
            else:
                if n_tokens < min_tokens:
                    return np.zeros(total.shape, dtype=bool)
                bound = total / n_tokens
            return np.asarray(bound >= s_star + tol, dtype=bool)

        return rule

    def generate(self, prompts: Sequence[Prompt]) -> list[Samples]:
        """Greedy edge answers, each stopped once its escalation is settled.

        Returns
        -------
        list of Samples
            One per prompt, holding only ``greedy``; stopped answers have
            ``finish_reason == "early_stop"``. Pass them to ``Router.route`` or
            ``Router.__call__`` as ``samples``.
        """
        plist = check_prompts(prompts, f"{_OWNER}.generate")
        edge = self.router.edge
        gen = getattr(edge, "generate", None)
        if gen is None or "early_stop" not in inspect.signature(gen).parameters:
            raise param_error(
                "router.edge", _OWNER, "a model whose generate() accepts early_stop "
                "(HFLanguageModel)", edge, type_error=True,
            )
        _, _, max_tokens = self._estimator()
        rule = self.rule()
        cfg = GenerationConfig(max_new_tokens=max_tokens)
        out = gen(plist, cfg, early_stop=rule)
        self.n_early_stopped_ = sum(o[0].finish_reason == "early_stop" for o in out)
        return [Samples(prompt=p, greedy=o[0]) for p, o in zip(plist, out)]

    # ------------------------------------------------------------------- route
    def route(self, prompts: Sequence[Prompt]) -> list[Decision]:
        """Like ``Router.route``, with early-stopped edge answers.

        Decisions equal those of full generation (``mode="sound"``); the score
        reported for a stopped answer is that of its prefix.
        """
        return list(self.router.route(prompts, samples=self.generate(prompts)))

    def __call__(self, prompts: Sequence[Prompt]) -> list[RoutedResponse]:
        """Like ``Router.__call__``; a stopped answer served after a cloud failure
        (``on_cloud_error="degrade"``) is first completed on the edge."""
        plist = check_prompts(prompts, f"{_OWNER}.__call__")
        samples = self.generate(plist)
        responses = list(self.router(plist, samples=samples))
        redo = [
            i for i, r in enumerate(responses)
            if r.degraded and _stopped(samples[i].greedy)
        ]
        if redo:
            _, _, max_tokens = self._estimator()
            full = self.router.edge.generate([plist[i] for i in redo],
                                             GenerationConfig(max_new_tokens=max_tokens))
            for i, f in zip(redo, full):
                r = responses[i]
                decision = dataclasses.replace(r.decision, edge_answer=f[0].text)
                responses[i] = dataclasses.replace(r, text=f[0].text, decision=decision)
        return responses


def _stopped(sample: Sample | None) -> bool:
    return sample is not None and sample.finish_reason == "early_stop"
