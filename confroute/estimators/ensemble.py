"""Combine several estimators that score from one shared generation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from confroute._validation import check_choice, param_error
from confroute.errors import EstimationError, InvalidParameterError
from confroute.estimators.base import UncertaintyEstimator, estimator_registry
from confroute.models.base import LanguageModel, SampleRequest
from confroute.types import Estimate, Samples

__all__ = ["EnsembleEstimator"]

_COMBINE = ("mean_rank", "mean", "first")


def _normalised_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties averaged, NaN kept); 0.5 for a single value."""
    from scipy.stats import rankdata

    out = np.full(x.shape, np.nan)
    ok = ~np.isnan(x)
    m = int(ok.sum())
    if m == 1:
        out[ok] = 0.5
    elif m > 1:
        out[ok] = (rankdata(x[ok]) - 1.0) / (m - 1.0)
    return out


@estimator_registry.register("ensemble")
class EnsembleEstimator(UncertaintyEstimator):
    """Several estimators on one shared generation, with a combined score.

    The union of the members' requests is generated once; each member scores
    from the same samples. With :math:`u_j(x_i)` the score of member :math:`j`
    on prompt :math:`i` (:math:`k` members, :math:`n` prompts):

    - ``combine="mean_rank"``: :math:`u(x_i) = \\frac1k \\sum_j
      \\frac{\\mathrm{rank}_j(x_i) - 1}{n - 1}`, ranks within the batch (ties
      averaged); scale-free, but depends on the batch.
    - ``combine="mean"``: :math:`u(x_i) = \\frac1k \\sum_j u_j(x_i)` (raw scales).
    - ``combine="first"``: the first member's score; the others are only
      reported (useful to feed :meth:`member_scores` to a multi-feature
      calibrator).

    NaN member scores are skipped in the means; the combined score is NaN only
    when every member is NaN for that prompt.

    Parameters
    ----------
    estimators : sequence of UncertaintyEstimator or registered names
    combine : {"mean_rank", "mean", "first"}, default "mean_rank"

    Notes
    -----
    ``details`` holds each member's scores under its name (duplicates become
    ``name_2``, ...) and each member's own details as ``"name.key"``.
    """

    def __init__(self, estimators: Sequence[Any] = (), combine: str = "mean_rank") -> None:
        self.estimators = estimators
        self.combine = combine

    def _members(self) -> list[UncertaintyEstimator]:
        owner = type(self).__name__
        if isinstance(self.estimators, (str, UncertaintyEstimator)) or not isinstance(
            self.estimators, Sequence
        ):
            raise param_error("estimators", owner, "a list of estimators", self.estimators,
                              type_error=True)
        if len(self.estimators) == 0:
            raise param_error("estimators", owner, "a non-empty list of estimators",
                              self.estimators)
        out = []
        for e in self.estimators:
            if isinstance(e, str) and e not in estimator_registry.names():
                raise param_error(
                    "estimators", owner, "estimators or names among "
                    + ", ".join(repr(n) for n in estimator_registry.names()), e,
                )
            if isinstance(e, str) and e == "ensemble":
                raise InvalidParameterError(
                    "The 'estimators' parameter of EnsembleEstimator cannot name 'ensemble'."
                )
            out.append(estimator_registry.resolve(e, "estimators", owner))
        return out

    def member_names(self) -> list[str]:
        """Keys of the members' scores in ``details`` (unique, in member order)."""
        names: list[str] = []
        for m in self._members():
            key, i = m.name, 2
            while key in names:
                key = f"{m.name}_{i}"
                i += 1
            names.append(key)
        return names

    def sample_request(self) -> SampleRequest:
        """The first member's request; use :meth:`sample_requests` for all of them."""
        return self._members()[0].sample_request()

    def sample_requests(self) -> list[SampleRequest]:
        return [r for m in self._members() for r in m.sample_requests()]

    def prepare_samples(
        self, samples: list[Samples], model: LanguageModel | None = None
    ) -> list[Samples]:
        for m in self._members():
            samples = m.prepare_samples(samples, model)
        return samples

    def score_samples(
        self, samples: Sequence[Samples], model: LanguageModel | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        combine = check_choice(self.combine, "combine", type(self).__name__, _COMBINE)
        members = self._members()
        names = self.member_names()
        used = self.prepare_samples(list(samples), model)
        details: dict[str, np.ndarray] = {}
        cols = []
        for m, key in zip(members, names):
            s, d = m.score_samples(used, model)
            s = np.asarray(s, dtype=np.float64)
            if s.shape != (len(samples),):
                raise EstimationError(
                    f"Member {key} returned scores of shape {s.shape}; expected "
                    f"({len(samples)},)."
                )
            cols.append(s)
            details[key] = s
            for k, v in d.items():
                details[f"{key}.{k}"] = np.asarray(v)
        mat = np.stack(cols, axis=1)
        if combine == "first":
            combined = mat[:, 0].copy()
        else:
            if combine == "mean_rank":
                mat = np.stack([_normalised_ranks(c) for c in cols], axis=1)
            ok = ~np.isnan(mat)
            cnt = ok.sum(axis=1)
            total = np.where(ok, mat, 0.0).sum(axis=1)
            combined = np.where(cnt > 0, total / np.maximum(cnt, 1), np.nan)
        return combined, details

    def member_scores(self, estimate: Estimate) -> np.ndarray:
        """The members' scores as features, shape (n_prompts, n_members).

        Parameters
        ----------
        estimate : Estimate
            Returned by this ensemble's :meth:`estimate`.
        """
        names = self.member_names()
        missing = [k for k in names if k not in estimate.details]
        if missing:
            raise InvalidParameterError(
                f"The 'estimate' parameter of EnsembleEstimator.member_scores must come from "
                f"this ensemble; its details lack {missing}."
            )
        return np.stack([np.asarray(estimate.details[k], dtype=np.float64) for k in names],
                        axis=1)
