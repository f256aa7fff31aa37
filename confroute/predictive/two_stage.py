"""Two-stage routing: a query-only gate before post-generation confidence routing.

Stage 1 scores each query with a fitted query router (P(strong model wins |
query), no generation) and sends the queries it is sure the edge model will
fail straight to the cloud, **without running the edge model at all**. Stage 2
runs a calibrated post-generation :class:`~confroute.router.Router` (edge
answer, uncertainty estimate, calibrator, policy) on the rest.

The gate can also be the edge model's own pre-generation probe
(:class:`~confroute.estimators.PromptProbe`): it reads the hidden state at the
prompt's last token after one prefill and escalates the queries it predicts the
edge will get wrong, before any token is decoded.

The gate saves the edge generations (and the uncertainty sampling) of the
queries it escalates; the post-generation router keeps its finer, answer-aware
decision for everything else. Zhang et al. (2025) propose both signals; this
module chains them as the design's "cheap pre-generation gate, then
post-generation confidence".

References
----------
.. [1] T. Zhang, A. Mehradfar, D. Dimitriadis, S. Avestimehr, "Leveraging
   Uncertainty Estimation for Efficient LLM Routing", arXiv:2502.11021, 2025.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from confroute._persist import part_from_spec, part_to_spec
from confroute._serialization import read_file, write_file
from confroute._validation import check_float, check_prompts, param_error
from confroute._version import __version__
from confroute.errors import (
    InvalidParameterError,
    NotFittedError,
    SerializationError,
)
from confroute.models.base import LanguageModel
from confroute.predictive.routers import (
    QueryRouter,
    QueryRouterEstimator,
    threshold_for_cloud_share,
)
from confroute.types import Decision, Prompt, RoutedResponse, Samples

__all__ = ["TwoStageRouter", "TwoStageStats"]

_SAVE_KIND = "two_stage_router"
_OWNER = "TwoStageRouter"


@dataclass
class TwoStageStats:
    """Cost accounting of a :class:`TwoStageRouter`, per stage.

    Attributes
    ----------
    n_prompts : int
        Prompts routed.
    n_gate_escalated : int
        Prompts the gate (stage 1) sent to the cloud.
    n_stage2_escalated : int
        Prompts the post-generation router (stage 2) sent to the cloud.
    n_edge_served : int
        Prompts answered by the edge model (including degraded answers).
    edge_generations_avoided : int
        Prompts that never reached the edge model (equal to ``n_gate_escalated``).
    cloud_calls : int
        Cloud requests made (by ``__call__``; ``route`` makes none).
    cloud_failures : int
        Cloud requests that failed after their retries.
    gate_seconds : float
        Wall-clock seconds of stage 1 (query embedding and router).
    edge_seconds : float
        Wall-clock seconds of stage 2 before any cloud call (edge generation,
        uncertainty estimation, calibrator and policy).
    cloud_seconds : float
        Wall-clock seconds spent in cloud calls.
    """

    n_prompts: int = 0
    n_gate_escalated: int = 0
    n_stage2_escalated: int = 0
    n_edge_served: int = 0
    edge_generations_avoided: int = 0
    cloud_calls: int = 0
    cloud_failures: int = 0
    gate_seconds: float = 0.0
    edge_seconds: float = 0.0
    cloud_seconds: float = 0.0

    def add(self, other: TwoStageStats) -> None:
        """Accumulate ``other`` into this record."""
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        """Plain-dict view (for logs and JSON)."""
        return {k: float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


class TwoStageRouter:
    r"""A query-only gate (stage 1) in front of a post-generation :class:`Router` (stage 2).

    For a query :math:`q` with gate score :math:`g(q) = \hat P(\text{strong wins}
    \mid q)` and gate threshold :math:`t`,

    .. math::

        \text{stage}(q) = \begin{cases}
            1 \text{ (cloud, edge model not run)} & g(q) > t \\
            2 \text{ (post-generation router decides)} & \text{otherwise.}
        \end{cases}

    The threshold is either given (``gate_threshold``) or chosen with
    :func:`~confroute.predictive.threshold_for_cloud_share` so that at most a
    share ``gate_share`` of representative queries is escalated by the gate
    (call :meth:`calibrate_gate` with such queries first). The overall cloud
    share is the gate share plus the stage-2 router's share of the remaining
    traffic: a stage-2 budget policy (e.g. ``max_cloud_fraction``) applies to
    the queries that reach stage 2, not to all queries.

    Parameters
    ----------
    gate : QueryRouter, QueryRouterEstimator or PromptProbe
        A fitted query router (scores P(strong wins); higher = escalate), or one
        already wrapped as an estimator (which carries its embedder); or a fitted
        pre-generation probe (:class:`~confroute.estimators.PromptProbe`, scores
        P(edge answer bad) from the edge model's hidden state after one prefill of
        the prompt, nothing decoded; it reads ``router.edge``, and its prompt
        states are passed on to stage 2).
    router : Router
        A calibrated post-generation router with its ``edge`` and ``cloud``
        models; its ``on_cloud_error`` also governs the gate's cloud calls
        (a gate-escalated query has no edge answer to degrade to, so a failed
        call gives an error record, or raises with ``"raise"``).
    gate_threshold : float or None, default None
        Escalate at stage 1 when the gate score is strictly above it.
    gate_share : float in [0, 1] or None, default None
        Target stage-1 cloud share; needs :meth:`calibrate_gate`. Exactly one
        of ``gate_threshold`` and ``gate_share`` must be given.
    embedder : QueryEmbedder, TextEncoder or None, default None
        How the gate embeds queries when ``gate`` is a bare :class:`QueryRouter`
        (None: the default MiniLM embedder). It must be the embedder the gate
        was trained with. Ignored when ``gate`` is a QueryRouterEstimator.

    Attributes
    ----------
    gate_threshold_ : float
        The threshold in use (given, or learned by :meth:`calibrate_gate`).
    gate_share_interval_ : tuple of float or None
        Clopper–Pearson 95% interval of the stage-1 cloud share on new,
        similar traffic (set by :meth:`calibrate_gate`).
    stats : TwoStageStats
        Cumulative cost accounting over every call.
    last_stats : TwoStageStats or None
        Accounting of the latest ``route`` or ``__call__``.

    Examples
    --------
    >>> ts = TwoStageRouter(mf_router, post_router, gate_share=0.2)  # doctest: +SKIP
    >>> ts.calibrate_gate(representative_prompts)  # doctest: +SKIP
    >>> responses = ts(["Who wrote Hamlet?"])  # doctest: +SKIP
    >>> ts.last_stats.edge_generations_avoided  # doctest: +SKIP
    """

    def __init__(
        self,
        gate: Any,
        router: Any,
        *,
        gate_threshold: float | None = None,
        gate_share: float | None = None,
        embedder: Any = None,
    ) -> None:
        from confroute.router import Router

        if isinstance(gate, QueryRouter):
            gate = QueryRouterEstimator(gate, embedder=embedder)
        elif _is_prompt_probe(gate):
            gate.check_fitted()  # NotFittedError naming the fix, before any routing
        elif not isinstance(gate, QueryRouterEstimator):
            raise param_error("gate", _OWNER, "a fitted QueryRouter, QueryRouterEstimator or "
                              "pre-generation probe (PromptProbe)", gate, type_error=True)
        if not isinstance(router, Router):
            raise param_error("router", _OWNER, "a calibrated Router", router, type_error=True)
        if (gate_threshold is None) == (gate_share is None):
            raise InvalidParameterError(
                f"{_OWNER} needs exactly one of 'gate_threshold' (escalate when the gate "
                f"score exceeds it) or 'gate_share' (target stage-1 cloud share, then call "
                f"calibrate_gate). Got gate_threshold={gate_threshold!r}, "
                f"gate_share={gate_share!r}."
            )
        self.gate_threshold = check_float(gate_threshold, "gate_threshold", _OWNER,
                                          allow_none=True)
        self.gate_share = check_float(gate_share, "gate_share", _OWNER, min_value=0.0,
                                      max_value=1.0, allow_none=True)
        self.gate: Any = gate
        self.router = router
        self.gate_threshold_: float | None = self.gate_threshold
        self.gate_share_interval_: tuple[float, float] | None = None
        self.stats = TwoStageStats()
        self.last_stats: TwoStageStats | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ gate
    def gate_scores(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """Stage-1 scores, P(strong wins | query), shape (n_prompts,)."""
        plist = check_prompts(prompts, f"{_OWNER}.gate_scores")
        return np.asarray(self._gate_estimate(plist).scores, dtype=np.float64)

    def _gate_estimate(self, plist: list[Prompt]) -> Any:
        """The gate's estimate; a prompt probe reads the edge model's prefill states."""
        if _is_prompt_probe(self.gate):
            return self.gate.estimate(plist, self.router.edge)
        return self.gate.estimate(plist)

    def calibrate_gate(
        self, prompts: Sequence[Prompt], *, confidence: float = 0.95
    ) -> TwoStageRouter:
        """Choose the gate threshold so at most ``gate_share`` of ``prompts`` escalate at stage 1.

        Parameters
        ----------
        prompts : sequence of Prompt
            Representative queries (ideally the traffic's own, not the gate's
            training queries, whose scores are optimistic).
        confidence : float in (0, 1), default 0.95
            Level of the interval stored in ``gate_share_interval_``.

        Returns
        -------
        self
        """
        if self.gate_share is None:
            raise InvalidParameterError(
                f"{_OWNER}.calibrate_gate needs 'gate_share' (this router was built with a "
                f"fixed gate_threshold={self.gate_threshold!r})."
            )
        scores = self.gate_scores(prompts)
        thr, interval = threshold_for_cloud_share(scores, self.gate_share, confidence)
        self.gate_threshold_ = thr
        self.gate_share_interval_ = interval
        return self

    def _threshold(self) -> float:
        if self.gate_threshold_ is None:
            raise NotFittedError(
                f"This {_OWNER} has a target gate_share={self.gate_share!r} but no threshold "
                "yet: call calibrate_gate(prompts) first, or load a saved router."
            )
        if self.router.calibration_ is None:
            raise NotFittedError(
                f"The post-generation router of this {_OWNER} is not calibrated: call "
                "router.calibrate(...) first."
            )
        return self.gate_threshold_

    # ----------------------------------------------------------------- route
    def _decide(
        self, plist: list[Prompt], samples: Sequence[Samples] | None, stats: TwoStageStats
    ) -> list[Decision]:
        thr = self._threshold()
        if samples is not None and len(samples) != len(plist):
            raise InvalidParameterError(
                f"The 'samples' parameter of {_OWNER} must hold one Samples per prompt: got "
                f"{len(samples)} for {len(plist)} prompts."
            )
        t0 = time.perf_counter()
        gated = self._gate_estimate(plist)
        g = np.asarray(gated.scores, dtype=np.float64)
        stats.gate_seconds += time.perf_counter() - t0
        if samples is None and _is_prompt_probe(self.gate):
            samples = gated.samples  # the prompt states, reused by a stage-2 prompt probe
        escalate = g > thr
        decisions: list[Decision | None] = [None] * len(plist)
        for j in np.flatnonzero(escalate):
            decisions[j] = Decision(
                prompt=plist[j], source="cloud", p_good=math.nan,
                scores={"gate": float(g[j])}, edge_answer=None,
                reason=f"stage 1 (gate): {self._gate_label()} {g[j]:.3f} > {thr:.3f}; "
                "edge model not run" + (" (one prefill)" if _is_prompt_probe(self.gate)
                                        else ""),
            )
        rest = [int(i) for i in np.flatnonzero(~escalate)]
        if rest:
            t1 = time.perf_counter()
            sub = None if samples is None else [samples[i] for i in rest]
            post = self.router.decide([plist[i] for i in rest], samples=sub)
            stats.edge_seconds += time.perf_counter() - t1
            for i, d in zip(rest, post):  # the stage-2 ticket travels with the decision
                decisions[i] = dataclasses.replace(
                    d, scores={"gate": float(g[i]), **dict(d.scores)},
                    reason=f"stage 2 (post-generation): {d.reason}",
                )
        stats.n_prompts += len(plist)
        stats.n_gate_escalated += int(escalate.sum())
        stats.edge_generations_avoided += int(escalate.sum())
        out = [d for d in decisions if d is not None]
        stats.n_stage2_escalated += sum(out[i].source == "cloud" for i in rest)
        assert len(out) == len(plist)
        return out

    def _gate_label(self) -> str:
        return "P(edge answer bad)" if _is_prompt_probe(self.gate) else "P(strong wins)"

    def _record(self, stats: TwoStageStats) -> None:
        with self._lock:
            self.stats.add(stats)
            self.last_stats = stats

    def route(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[Decision]:
        """Decide edge or cloud for each prompt, without calling the cloud.

        Gate-escalated prompts get ``source="cloud"``, ``p_good=nan``, no edge
        answer and a reason starting ``"stage 1 (gate)"``; the others get the
        post-generation router's decision with a reason starting
        ``"stage 2 (post-generation)"``. Every decision's ``scores`` holds the
        gate score under ``"gate"``.

        Returns
        -------
        list of Decision
            One per prompt, in order.
        """
        plist = check_prompts(prompts, f"{_OWNER}.route")
        stats = TwoStageStats()
        decisions = self._decide(plist, samples, stats)
        stats.n_edge_served = sum(d.source == "edge" for d in decisions)
        # As Router.decide: escalations admitted by an online policy stay counted until
        # Router.answer settles their tickets (the caller is expected to make those calls).
        self._record(stats)
        return decisions

    def __call__(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[RoutedResponse]:
        """Route and answer: keep edge answers, send escalated prompts (either stage) to the cloud.

        Every prompt gets a response. A failed cloud call follows the
        post-generation router's ``on_cloud_error``: a stage-2 prompt can fall
        back to its edge answer (``"degrade"``); a stage-1 prompt has none and
        gets an error record (``text=None``). With ``"raise"`` the first
        :class:`~confroute.errors.CloudError` is raised after the whole batch
        was answered.

        Returns
        -------
        list of RoutedResponse
        """
        plist = check_prompts(prompts, f"{_OWNER}.__call__")
        stats = TwoStageStats()
        decisions = self._decide(plist, samples, stats)
        t0 = time.perf_counter()
        responses = self.router.answer(decisions)
        failures = [r.cloud_error for r in responses if r.cloud_error is not None]
        stats.cloud_seconds += time.perf_counter() - t0
        stats.cloud_calls += sum(d.source == "cloud" for d in decisions)
        stats.cloud_failures += len(failures)
        stats.n_edge_served = sum(r.source == "edge" for r in responses)
        self._record(stats)
        if failures and self.router.on_cloud_error == "raise":
            raise failures[0]
        return responses

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Save gate, threshold and the calibrated post-generation router as one JSON file.

        The file uses the same checksummed, pickle-free format as
        :meth:`Router.save`. Models and a custom gate embedder are not saved:
        pass them again to :meth:`load` (the embedder's name is recorded and
        checked).
        """
        thr = self._threshold()
        if _is_prompt_probe(self.gate):
            gate_spec, emb = part_to_spec(self.gate, "gate"), None
        else:
            router = self.gate.resolve_router()
            # part_to_spec reads the query router's state, which fails if it is unfitted.
            gate_spec = part_to_spec(QueryRouterEstimator(router=router, embedder=None), "gate")
            emb = self.gate.embedder
        router_payload = self.router.to_dict()
        write_file(path, _SAVE_KIND, {
            "confroute_version": __version__,
            "gate": gate_spec,
            "gate_embedder": None if emb is None else str(getattr(emb, "name", emb)),
            "gate_threshold": self.gate_threshold,
            "gate_share": self.gate_share,
            "gate_threshold_learned": thr,
            "gate_share_interval": (None if self.gate_share_interval_ is None
                                    else list(self.gate_share_interval_)),
            "router": router_payload,
        })

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        edge: LanguageModel | None = None,
        cloud: LanguageModel | None = None,
        embedder: Any = None,
    ) -> TwoStageRouter:
        """Load a router saved by :meth:`save`; never executes code from the file.

        Parameters
        ----------
        path : path-like
        edge, cloud : LanguageModel, optional
            The models of the post-generation router.
        embedder : QueryEmbedder, TextEncoder or None
            The gate's embedder when it was not the default one (its ``name``
            must match the saved one).
        """
        from confroute.router import Router

        data = read_file(path, _SAVE_KIND)
        try:
            gate = part_from_spec(data["gate"], "estimator")
            if not isinstance(gate, QueryRouterEstimator) and not _is_prompt_probe(gate):
                raise SerializationError(f"The gate in {str(path)!r} is not a query router "
                                         "or a fitted prompt probe.")
            saved_emb = data.get("gate_embedder")
            if saved_emb is not None:
                got = None if embedder is None else str(getattr(embedder, "name", embedder))
                if got != saved_emb:
                    raise InvalidParameterError(
                        f"The 'embedder' parameter of {_OWNER}.load must be the gate's embedder "
                        f"named {saved_emb!r} (the one the gate was trained with). Got "
                        f"{got!r}."
                    )
            if isinstance(gate, QueryRouterEstimator):
                gate.embedder = embedder
            router = Router.from_dict(data["router"], edge=edge, cloud=cloud)
            thr = data.get("gate_threshold")
            share = data.get("gate_share")
            obj = cls(gate, router, gate_threshold=thr, gate_share=share)
            learned = data["gate_threshold_learned"]
            if isinstance(learned, bool) or not isinstance(learned, (int, float)) or (
                math.isnan(float(learned))
            ):
                raise SerializationError(f"Saved gate threshold in {str(path)!r} is invalid.")
            obj.gate_threshold_ = float(learned)
            interval = data.get("gate_share_interval")
            if interval is not None:
                obj.gate_share_interval_ = (float(interval[0]), float(interval[1]))
        except (SerializationError, InvalidParameterError):
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SerializationError(
                f"Saved two-stage router at {str(path)!r} is incomplete: {exc!r}"
            ) from None
        return obj

    def __repr__(self) -> str:
        thr = self.gate_threshold_
        how = (f"gate_threshold={thr!r}" if self.gate_share is None
               else f"gate_share={self.gate_share!r} (threshold {thr!r})")
        return f"TwoStageRouter(gate={self.gate!r}, {how}, router={self.router!r})"


def _is_prompt_probe(gate: Any) -> bool:
    """A pre-generation learned estimator (e.g. a PromptProbe): scores from one prefill."""
    from confroute.estimators.probes import LearnedEstimator

    return isinstance(gate, LearnedEstimator) and not gate.needs_generation
