"""Learning from live traffic in the routing server: decision log, shadow labels, drift.

:class:`TrafficTap` is what ``confroute serve --decision-log ... --shadow-rate r``
adds to the server (:func:`confroute.serve.create_app` takes one as ``traffic=``):

1. every answered request is appended to a :class:`~confroute.traffic.DecisionLog`
   (one row: prompt hash or text, scores, ``p_good``, decision, answer hashes,
   cost, router fingerprint) before its response is returned;
2. a random share ``r`` of the requests kept on the edge (a
   :class:`~confroute.traffic.ShadowSampler`, with its own capped budget of calls
   and cost) is also sent to the cloud *in the background*: the response never
   waits for it, and a failing shadow call changes nothing but a counter. The
   cloud answer is turned into a label by an answer labeler
   (:class:`~confroute.labeling.CloudAgreementLabeler` or
   :class:`~confroute.labeling.JudgeLabeler`) and written to the log with
   :func:`~confroute.traffic.shadow_label`;
3. escalated requests that still have an edge answer are labelled against the
   cloud answer the user got, at no extra cloud call, when the labeler makes
   no call of its own (``cloud_agreement``), so the recalibration set also
   covers low ``p_good`` (these labels do not feed the drift monitor, whose
   agreement rate is about kept answers);
4. a :class:`~confroute.traffic.DriftMonitor` follows every decision and every
   shadow label; its gauges and the tap's counters are exported on ``/metrics``
   and reported on ``/health``; it logs a warning when a bound is crossed.

Layer: above :mod:`confroute.router` and :mod:`confroute.traffic`, below the CLI;
:mod:`confroute.serve` imports it only for type checking.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from confroute._validation import check_float, check_int, param_error
from confroute.labeling import AnswerLabeler, CloudAgreementLabeler, JudgeLabeler
from confroute.recalibration import fingerprint
from confroute.router import Router
from confroute.traffic import DecisionLog, DriftMonitor, ShadowSampler, shadow_label
from confroute.types import Decision, RoutedResponse, Sample, prompt_text

__all__ = ["TrafficTap", "build_traffic_tap"]

logger = logging.getLogger(__name__)

_COUNTERS = ("logged", "shadow_ok", "shadow_failed", "labelled", "unknown",
             "escalated_labelled")


class TrafficTap:
    """Decision log, shadow labelling and drift monitor around one serving router.

    Build it with :func:`build_traffic_tap` (which checks every option first).

    Parameters
    ----------
    log : DecisionLog
    cloud : LanguageModel, optional
        Answers the shadow requests (required when ``sampler`` is given).
    sampler : ShadowSampler, optional
        Which kept requests are shadowed, under which caps; None = no shadow calls.
    labeler : AnswerLabeler, optional
        Turns (edge answer, cloud answer) into a label (required with ``sampler``).
    monitor : DriftMonitor, optional
    cloud_config : GenerationConfig, optional
        How the cloud answers a shadow request.
    label_escalated : bool, default True
        Label escalated requests against the cloud answer they got, when the
        labeler makes no call of its own.

    Attributes
    ----------
    counts : dict of str to int
        ``logged``, ``shadow_ok``, ``shadow_failed``, ``labelled``, ``unknown``
        (labeler could not decide), ``escalated_labelled``.
    shadow_cost : float
        Cost of the shadow calls made (the cloud's ``cost_of``).
    """

    def __init__(self, log: DecisionLog, *, cloud: Any = None, sampler: ShadowSampler | None = None,
                 labeler: AnswerLabeler | None = None, monitor: DriftMonitor | None = None,
                 cloud_config: Any = None, label_escalated: bool = True) -> None:
        self.log = log
        self.cloud = cloud
        self.sampler = sampler
        self.labeler = labeler
        self.monitor = monitor
        self.cloud_config = cloud_config
        self.label_escalated = bool(label_escalated) and isinstance(labeler, CloudAgreementLabeler)
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.shadow_cost = 0.0
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    # -- per request ------------------------------------------------------------------------
    async def record(self, response: RoutedResponse) -> int:
        """Log one answered request, feed the monitor, start its background work.

        The log append (one SQLite transaction) runs in a worker thread; the
        shadow call and labelling run in background tasks the caller never waits for.

        Returns
        -------
        int
            The request's id in the decision log.
        """
        d = response.decision
        rid = await asyncio.to_thread(self.log.append, response)
        self._count("logged")
        if self.monitor is not None:
            self.monitor.observe(d)
        if self.sampler is not None and self.sampler.admit(d, cost=self._reserve(d)):
            self._spawn(self._shadow(rid, d))
        elif (self.label_escalated and d.source == "cloud" and response.source == "cloud"
              and d.edge_answer is not None and response.text is not None):
            self._spawn(self._label_escalated(rid, d, response.text))
        return int(rid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reserve(self, d: Decision) -> float:
        """Cost reserved for a shadow call of ``d``: the cloud's price of a full-length
        answer to a prompt of ``len(text) / 2`` tokens (an upper bound for usual
        tokenizers, about 4 characters per token); 0 without a price."""
        cost_of = getattr(self.cloud, "cost_of", None)
        if cost_of is None:
            return 0.0
        out = int(getattr(self.cloud_config, "max_new_tokens", 256))
        probe = Sample(text="", token_ids=(0,) * out,
                       prompt_tokens=math.ceil(len(prompt_text(d.prompt)) / 2))
        try:
            return float(cost_of(probe))
        except Exception:  # a gap in the price table must not stop serving
            return 0.0

    async def _shadow(self, rid: int, d: Decision) -> None:
        """One shadow call, its label and its log update; never raises."""
        try:
            agenerate = getattr(self.cloud, "agenerate", None)
            if agenerate is not None:
                out = await agenerate([d.prompt], self.cloud_config)
            else:
                out = await asyncio.to_thread(self.cloud.generate, [d.prompt], self.cloud_config)
            text = out[0][0].text
            cost_of = getattr(self.cloud, "cost_of", None)
            cost = float(cost_of(out[0])) if cost_of is not None else 0.0
        except Exception as exc:  # the user's response is long gone: count it, go on
            self._count("shadow_failed")
            logger.info("shadow call for request %d failed: %s", rid, exc)
            return
        with self._lock:
            self.counts["shadow_ok"] += 1
            self.shadow_cost += cost
        await self._label(rid, d, text, monitor=self.monitor)

    async def _label_escalated(self, rid: int, d: Decision, cloud_answer: str) -> None:
        await self._label(rid, d, cloud_answer, monitor=None, key="escalated_labelled")

    async def _label(self, rid: int, d: Decision, cloud_answer: str, *, monitor: Any,
                     key: str = "labelled") -> None:
        try:
            y = await asyncio.to_thread(shadow_label, self.log, rid, d, cloud_answer,
                                        self.labeler, monitor=monitor)
        except Exception as exc:
            self._count("unknown")
            logger.warning("labelling request %d failed: %s", rid, exc)
            return
        self._count("unknown" if math.isnan(y) else key)

    async def aclose(self, timeout: float = 30.0) -> None:
        """Let running shadow work finish (up to ``timeout`` seconds), then stop it."""
        pending = set(self._tasks)
        if pending:
            _, left = await asyncio.wait(pending, timeout=timeout)
            for task in left:
                task.cancel()

    async def drain(self) -> None:
        """Wait until every background shadow call and label has finished."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    @property
    def pending(self) -> int:
        """Background tasks still running."""
        return len(self._tasks)

    # -- reporting --------------------------------------------------------------------------
    def totals(self) -> tuple[dict[str, int], float]:
        """A consistent copy of :attr:`counts` and :attr:`shadow_cost`."""
        with self._lock:
            return dict(self.counts), self.shadow_cost

    def health(self) -> dict[str, Any]:
        """JSON-safe state for ``/health``: log, shadow budget and counters, drift."""
        counts, cost = self.totals()
        out: dict[str, Any] = {
            "decision_log": str(self.log.path), "store_prompts": self.log.store_prompts,
            "router_fingerprint": self.log.router_fingerprint, "counts": counts,
            "shadow": None if self.sampler is None else
            {**self.sampler.snapshot(), "cost": cost, "pending": self.pending},
            "labeler": None if self.labeler is None else self.labeler.name,
        }
        if self.monitor is not None:
            snap = self.monitor.snapshot()
            out["drift"] = {k: _json_safe(v) for k, v in snap.items()}
        return out

    def register_metrics(self, registry: Any) -> None:
        """Add the drift gauges (``confroute_drift_*``) and the tap's counters
        (``confroute_decision_log_rows``, ``confroute_shadow_*``) to a
        ``prometheus_client.CollectorRegistry``."""
        if self.monitor is not None:
            self.monitor.register_metrics(registry)
        registry.register(_TapCollector(self))


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


class _TapCollector:
    """Prometheus collector reading the tap's counters at scrape time."""

    def __init__(self, tap: TrafficTap) -> None:
        self.tap = tap

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        tap = self.tap
        counts, cost = tap.totals()
        rows = CounterMetricFamily("confroute_decision_log_rows",
                                   "Requests appended to the decision log")
        rows.add_metric([], counts["logged"])
        yield rows
        calls = CounterMetricFamily("confroute_shadow_calls", "Shadow cloud calls, by outcome",
                                    labels=["outcome"])
        calls.add_metric(["ok"], counts["shadow_ok"])
        calls.add_metric(["failed"], counts["shadow_failed"])
        yield calls
        labels = CounterMetricFamily("confroute_shadow_labels",
                                     "Labels written to the decision log, by kind",
                                     labels=["kind"])
        for kind in ("labelled", "unknown", "escalated_labelled"):
            labels.add_metric([kind], counts[kind])
        yield labels
        spent = GaugeMetricFamily("confroute_shadow_cost", "Cost of the shadow calls made")
        spent.add_metric([], cost)
        yield spent
        pending = GaugeMetricFamily("confroute_shadow_pending",
                                    "Shadow calls and labels still running")
        pending.add_metric([], tap.pending)
        yield pending


def build_traffic_tap(
    router: Router,
    decision_log: str | os.PathLike[str],
    *,
    store_prompts: str = "hash",
    shadow_rate: float = 0.0,
    shadow_max_calls: int | None = None,
    shadow_max_cost: float | None = None,
    labeler: str | AnswerLabeler = "cloud_agreement",
    drift_bounds: Mapping[str, Any] | None = None,
    drift_window: int = 500,
    drift_min_samples: int = 30,
    seed: int | None = None,
) -> TrafficTap:
    """Check the traffic options and build the tap of a serving router.

    Parameters
    ----------
    router : Router
        The calibrated router as loaded (before a serve-time budget is applied):
        its fingerprint is the log's, so ``confroute recalibrate --router`` with
        the same file accepts the log. ``router.cloud`` answers shadow requests.
    decision_log : path-like
        SQLite file; created if missing, refused if written by another router.
    store_prompts : {"hash", "text"}, default "hash"
    shadow_rate : float in [0, 1], default 0
        Share of kept requests also answered by the cloud in the background.
    shadow_max_calls : int >= 0, optional
    shadow_max_cost : float >= 0, optional
        Caps of the shadow budget (calls; cost reserved per call, see
        :meth:`TrafficTap._reserve`).
    labeler : {"cloud_agreement", "judge"} or AnswerLabeler, default "cloud_agreement"
        ``"judge"`` uses the cloud model as the judge.
    drift_bounds : mapping, optional
        :class:`~confroute.traffic.DriftMonitor` bounds (default its own).
    drift_window : int >= 1, default 500
        Rolling window of the drift metrics.
    drift_min_samples : int >= 1, default 30
        Observations before a drift metric is reported (NaN until then).
    seed : int >= 0, optional
        Seed of the shadow sampler.

    Raises
    ------
    InvalidParameterError, InvalidTypeError
        A bad option (checked before the log is opened), a shadow rate without
        a cloud model, or a log written by another router.
    """
    owner = "build_traffic_tap"
    if not isinstance(router, Router):
        raise param_error("router", owner, "a Router", router, type_error=True)
    if router.calibration_ is None:
        raise param_error("router", owner, "a calibrated Router (call calibrate first)", router)
    rate = check_float(shadow_rate, "shadow_rate", owner, min_value=0.0, max_value=1.0)
    sampler = ShadowSampler(rate, max_calls=shadow_max_calls, max_cost=shadow_max_cost,
                            seed=seed) if rate > 0 else None
    if sampler is not None and router.cloud is None:
        raise param_error("shadow_rate", owner, "0 when the router has no cloud model (shadow "
                          "requests are answered by the cloud)", shadow_rate)
    lab = _resolve_labeler(labeler, router, owner)
    check_int(drift_window, "drift_window", owner, min_value=1)
    check_int(drift_min_samples, "drift_min_samples", owner, min_value=1)
    monitor = DriftMonitor(_calibration_scores(router), feature_names=router.feature_names,
                           window=drift_window, bounds=drift_bounds,
                           min_samples=drift_min_samples)
    log = DecisionLog(decision_log, router_fingerprint=fingerprint(router),
                      store_prompts=store_prompts)
    return TrafficTap(log, cloud=router.cloud, sampler=sampler, labeler=lab, monitor=monitor,
                      cloud_config=router.cloud_config)


def _resolve_labeler(labeler: Any, router: Router, owner: str) -> AnswerLabeler:
    if isinstance(labeler, AnswerLabeler):
        return labeler
    if labeler == "cloud_agreement":
        return CloudAgreementLabeler()
    if labeler == "judge":
        if router.cloud is None:
            raise param_error("labeler", owner, "'cloud_agreement' when the router has no cloud "
                              "model (the judge is the cloud model)", labeler)
        return JudgeLabeler(judge=router.cloud)
    raise param_error("labeler", owner, "'cloud_agreement' or 'judge' (a labeler comparing the "
                      "edge answer with one cloud answer) or an AnswerLabeler", labeler,
                      type_error=not isinstance(labeler, str))


def _calibration_scores(router: Router) -> list[list[float]]:
    """Calibration scores (n, k) recorded by ``confroute calibrate``; one NaN row (PSI
    stays NaN) for a router saved without them."""
    k = len(router.feature_names)
    rows = (router.calibration_ or {}).get("scores") or []
    out = [[math.nan if v is None else float(v) for v in r] for r in rows
           if isinstance(r, list) and len(r) == k]
    if not out:
        logger.warning("the router has no recorded calibration scores: the drift monitor "
                       "reports no PSI (re-calibrate with this confroute version)")
        return [[math.nan] * k]
    return out

