"""Calibrating on your own traffic: a decision log, shadow labelling, drift alarms
and recalibration.

The loop, once a router serves real requests:

1. every decision is appended to a :class:`DecisionLog` (SQLite, one row per
   request, each append one transaction, so a crash never leaves half a row);
2. a :class:`ShadowSampler` picks a few kept-on-edge requests that are also sent
   to the cloud in the background, under their own capped budget;
   :func:`shadow_label` turns the cloud answer into a label with a labeler from
   :mod:`confroute.labeling` and writes it to the log (escalated requests that
   still have an edge answer can be labelled the same way at no extra cost);
3. a :class:`DriftMonitor` follows the cloud share, the agreement rate of kept
   answers, the calibration error of ``p_good`` on labelled requests and the
   population stability of the scores, exports them to Prometheus and warns when
   a bound is crossed;
4. :func:`recalibrate` refits a copy of the router's calibrator and policy on the
   logged scores and labels (the edge model and the estimators are untouched).

Shadow labels come from kept requests only, a biased sample of traffic (the
ones the router trusted); escalated requests with an edge answer are worth
labelling too, so the recalibration set covers low ``p_good`` as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confroute._validation import (
    check_array,
    check_bool,
    check_choice,
    check_float,
    check_int,
    param_error,
)
from confroute.errors import InvalidParameterError, SerializationError
from confroute.recalibration import fingerprint, recalibrate_router
from confroute.router import Router
from confroute.types import Decision, RoutedResponse, prompt_key

__all__ = [
    "DEFAULT_BOUNDS",
    "DecisionLog",
    "DriftMonitor",
    "ShadowSampler",
    "expected_calibration_error",
    "population_stability_index",
    "recalibrate",
    "router_fingerprint",
    "shadow_label",
]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    request_id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    prompt TEXT NOT NULL,
    scores TEXT NOT NULL,
    p_good REAL,
    decision TEXT NOT NULL CHECK (decision IN ('edge', 'cloud')),
    edge_answer_hash TEXT,
    cloud_answer_hash TEXT,
    label REAL CHECK (label IS NULL OR label IN (0.0, 1.0)),
    cost REAL NOT NULL,
    router_fingerprint TEXT NOT NULL
);
"""
_COLUMNS = ("request_id", "time", "prompt", "scores", "p_good", "decision", "edge_answer_hash",
            "cloud_answer_hash", "label", "cost", "router_fingerprint")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def router_fingerprint(router: Router) -> str:
    """Identity of a calibrated router: a hash of its parts, parameters and learned state.

    Two routers that would decide differently have different fingerprints
    (a recalibrated router gets a new one); models are not part of it.

    Returns
    -------
    str
        16 hexadecimal characters.
    """
    if not isinstance(router, Router):
        raise param_error("router", "router_fingerprint", "a Router", router, type_error=True)
    return fingerprint(router)


# --------------------------------------------------------------------------- decision log


class DecisionLog:
    """Append-only SQLite log of routing decisions, one row per request.

    The database runs in WAL mode with ``synchronous=FULL``; each append or
    label update is one transaction, so a process killed mid-write leaves every
    committed row intact and no partial row. Safe to share between threads.

    Columns: ``request_id`` (int, increasing), ``time`` (Unix seconds),
    ``prompt`` (SHA-256 of the prompt's JSON identity, or that JSON itself with
    ``store_prompts="text"``), ``scores`` (dict of estimator name to score),
    ``p_good`` (float, NaN stored as NULL), ``decision`` ("edge" / "cloud"),
    ``edge_answer_hash`` / ``cloud_answer_hash`` (SHA-256, or None),
    ``label`` (1 / 0 / None until :meth:`set_label`), ``cost`` and
    ``router_fingerprint``.

    Parameters
    ----------
    path : path-like
        The SQLite file (created with its directory if missing).
    router_fingerprint : str
        :func:`router_fingerprint` of the router whose decisions are logged.
    store_prompts : {"hash", "text"} or None, default "hash"
        Keep only a hash of each prompt (privacy), or its text. None: as the
        existing log was created ("hash" for a new log), e.g. to read a log.
    allow_foreign : bool, default False
        Open a log created for another router fingerprint (rows keep the
        fingerprint they were written with).

    Raises
    ------
    InvalidParameterError
        The log was created for another router (``router_fingerprint``) or with
        another ``store_prompts``; nothing is written then.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        router_fingerprint: str,
        store_prompts: str | None = "hash",
        allow_foreign: bool = False,
    ) -> None:
        owner = "DecisionLog"
        if not isinstance(path, (str, os.PathLike)):
            raise param_error("path", owner, "a path", path, type_error=True)
        if not isinstance(router_fingerprint, str) or not router_fingerprint:
            raise param_error("router_fingerprint", owner, "a non-empty str",
                              router_fingerprint, type_error=True)
        self.path = Path(path)
        self.router_fingerprint = router_fingerprint
        self.store_prompts = None if store_prompts is None else check_choice(
            store_prompts, "store_prompts", owner, ("hash", "text"))
        self.allow_foreign = check_bool(allow_foreign, "allow_foreign", owner)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                     timeout=30.0)
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    def _setup(self) -> None:
        c = self._conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
            self._check_meta(meta)
            if not meta:
                c.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("router_fingerprint", self.router_fingerprint),
                    ("store_prompts", self.store_prompts), ("schema", "1")])
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _check_meta(self, meta: Mapping[str, str]) -> None:
        if not meta:
            self.store_prompts = self.store_prompts or "hash"
            return
        got = meta.get("router_fingerprint")
        if got != self.router_fingerprint and not self.allow_foreign:
            raise InvalidParameterError(
                f"The 'router_fingerprint' parameter of DecisionLog must match the log at "
                f"{str(self.path)!r}, which was written by router {got!r}. Got "
                f"{self.router_fingerprint!r}. Use another file, or pass allow_foreign=True."
            )
        if self.store_prompts is None:  # read as created
            self.store_prompts = meta.get("store_prompts", "hash")
        if meta.get("store_prompts") != self.store_prompts:
            raise param_error("store_prompts", "DecisionLog",
                              f"{meta.get('store_prompts')!r} as when the log was created",
                              self.store_prompts)

    # -- writing ---------------------------------------------------------------------------
    def append(
        self,
        decision: Decision | RoutedResponse,
        *,
        cloud_answer: str | None = None,
        cost: float | None = None,
        label: float | None = None,
        timestamp: float | None = None,
    ) -> int:
        """Append one request (one transaction) and return its ``request_id``.

        Parameters
        ----------
        decision : Decision or RoutedResponse
            A response also gives the cloud answer and the cost when they are
            not passed.
        cloud_answer : str, optional
        cost : float >= 0, optional
        label : {1, 0}, optional
        timestamp : float, optional
            Unix seconds (default: now).
        """
        row = self._row(decision, cloud_answer, cost, label, timestamp)
        with self._lock:
            cur = self._conn.execute(
                f"INSERT INTO decisions ({', '.join(_COLUMNS[1:])}) "
                f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})", row)
        return int(cur.lastrowid or 0)

    def _row(self, decision: Any, cloud_answer: Any, cost: Any, label: Any, ts: Any
             ) -> tuple[Any, ...]:
        owner = "DecisionLog.append"
        if isinstance(decision, RoutedResponse):
            if decision.source == "cloud" and cloud_answer is None:
                cloud_answer = decision.text
            cost = decision.cost if cost is None else cost
            decision = decision.decision
        if not isinstance(decision, Decision):
            raise param_error("decision", owner, "a Decision or a RoutedResponse", decision,
                              type_error=True)
        if cloud_answer is not None and not isinstance(cloud_answer, str):
            raise param_error("cloud_answer", owner, "a str or None", cloud_answer,
                              type_error=True)
        c = check_float(0.0 if cost is None else cost, "cost", owner, min_value=0.0)
        ts = check_float(time.time() if ts is None else ts, "timestamp", owner)
        key = prompt_key(decision.prompt)
        scores = {str(k): (None if math.isnan(float(v)) else float(v))
                  for k, v in decision.scores.items()}
        return (
            ts, _sha(key) if self.store_prompts == "hash" else key, json.dumps(scores),
            None if math.isnan(decision.p_good) else float(decision.p_good), decision.source,
            None if decision.edge_answer is None else _sha(decision.edge_answer),
            None if cloud_answer is None else _sha(cloud_answer),
            _check_label(label, owner), c, self.router_fingerprint,
        )

    def set_label(self, request_id: int, label: float, *, cloud_answer: str | None = None
                  ) -> None:
        """Record the label (1 = edge answer good, 0 = bad) of a logged request.

        Raises
        ------
        InvalidParameterError
            Unknown ``request_id`` or a label other than 0/1 (nothing is written).
        """
        owner = "DecisionLog.set_label"
        rid = check_int(request_id, "request_id", owner, min_value=1)
        y = _check_label(label, owner)
        if y is None:
            raise param_error("label", owner, "1 or 0", label)
        if cloud_answer is not None and not isinstance(cloud_answer, str):
            raise param_error("cloud_answer", owner, "a str or None", cloud_answer,
                              type_error=True)
        with self._lock:
            cur = self._conn.execute(
                "UPDATE decisions SET label = ?, cloud_answer_hash = "
                "COALESCE(?, cloud_answer_hash) WHERE request_id = ?",
                (y, None if cloud_answer is None else _sha(cloud_answer), rid))
        if cur.rowcount != 1:
            raise param_error("request_id", owner, "the id of a logged request", request_id)

    # -- reading ---------------------------------------------------------------------------
    def rows(
        self,
        *,
        since: float | None = None,
        decision: str | None = None,
        labelled: bool | None = None,
        router_fingerprint: str | None = None,
        last: int | None = None,
    ) -> list[dict[str, Any]]:
        """Logged rows, oldest first, as dicts (``scores`` decoded, NULL p_good as NaN).

        Parameters
        ----------
        since : float, optional
            Only rows with ``time >= since``.
        decision : {"edge", "cloud"}, optional
        labelled : bool, optional
            Only rows with (True) or without (False) a label.
        router_fingerprint : str, optional
            Only rows written by this router.
        last : int, optional
            Only the ``last`` most recent matching rows.
        """
        owner = "DecisionLog.rows"
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if since is not None:
            where.append("time >= ?")
            args.append(check_float(since, "since", owner))
        if decision is not None:
            where.append("decision = ?")
            args.append(check_choice(decision, "decision", owner, ("edge", "cloud")))
        if labelled is not None:
            where.append("label IS NOT NULL" if check_bool(labelled, "labelled", owner)
                         else "label IS NULL")
        if router_fingerprint is not None:
            where.append("router_fingerprint = ?")
            args.append(str(router_fingerprint))
        sql = f"SELECT {', '.join(_COLUMNS)} FROM decisions WHERE {' AND '.join(where)} " \
              "ORDER BY request_id DESC"
        if last is not None:
            sql += f" LIMIT {check_int(last, 'last', owner, min_value=1)}"
        with self._lock:
            fetched = self._conn.execute(sql, args).fetchall()
        return [_decode(r) for r in reversed(fetched)]

    def labelled(self, **filters: Any) -> list[dict[str, Any]]:
        """:meth:`rows` with a label (same filters)."""
        return self.rows(labelled=True, **filters)

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_label(label: Any, owner: str) -> float | None:
    if label is None:
        return None
    y = check_float(label, "label", owner, min_value=0.0, max_value=1.0)
    if y not in (0.0, 1.0):
        raise param_error("label", owner, "1, 0 or None", label)
    return y


def _decode(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(_COLUMNS, row))
    try:
        scores = json.loads(out["scores"])
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"Decision log row {out['request_id']} is corrupt: {exc}") \
            from None
    out["scores"] = {k: (math.nan if v is None else float(v)) for k, v in scores.items()}
    out["p_good"] = math.nan if out["p_good"] is None else float(out["p_good"])
    return out


# --------------------------------------------------------------------------- shadow sampling


class ShadowSampler:
    """Picks the kept-on-edge requests that are also sent to the cloud for a label.

    Each kept request is shadowed with probability ``rate`` while the shadow
    budget lasts: at most ``max_calls`` shadow calls and ``max_cost`` total
    cost. The caps are exact under concurrency (one lock around the check and
    the reservation).

    Parameters
    ----------
    rate : float in [0, 1]
    max_calls : int >= 0, optional
    max_cost : float >= 0, optional
    seed : int >= 0, optional

    Attributes
    ----------
    n_seen_, n_calls_ : int
        Kept requests offered, shadow calls granted (minus released ones).
    spent_ : float
        Cost reserved by granted calls (minus released ones).
    """

    def __init__(self, rate: float, *, max_calls: int | None = None,
                 max_cost: float | None = None, seed: int | None = None) -> None:
        owner = "ShadowSampler"
        self.rate = check_float(rate, "rate", owner, min_value=0.0, max_value=1.0)
        self.max_calls = check_int(max_calls, "max_calls", owner, min_value=0, allow_none=True)
        self.max_cost = check_float(max_cost, "max_cost", owner, min_value=0.0, allow_none=True)
        self.seed = check_int(seed, "seed", owner, min_value=0, allow_none=True)
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()
        self.n_seen_ = 0
        self.n_calls_ = 0
        self.spent_ = 0.0

    def admit(self, decision: Decision | None = None, *, cost: float = 0.0) -> bool:
        """Whether to shadow this request; a True reserves one call and ``cost``.

        Escalated decisions (``source == "cloud"``) are never shadowed: the
        cloud answers them anyway.
        """
        c = check_float(cost, "cost", "ShadowSampler.admit", min_value=0.0)
        if decision is not None and not isinstance(decision, Decision):
            raise param_error("decision", "ShadowSampler.admit", "a Decision or None",
                              decision, type_error=True)
        if decision is not None and decision.source != "edge":
            return False
        with self._lock:
            self.n_seen_ += 1
            if self.max_calls is not None and self.n_calls_ >= self.max_calls:
                return False
            if self.max_cost is not None and self.spent_ + c > self.max_cost + 1e-12:
                return False
            if self._rng.random() >= self.rate:
                return False
            self.n_calls_ += 1
            self.spent_ += c
            return True

    def release(self, *, cost: float = 0.0) -> None:
        """Give back one granted call and its reserved ``cost`` (the shadow call failed)."""
        c = check_float(cost, "cost", "ShadowSampler.release", min_value=0.0)
        with self._lock:
            if self.n_calls_ == 0:
                raise InvalidParameterError("ShadowSampler.release called with no granted call.")
            self.n_calls_ -= 1
            self.spent_ = max(0.0, self.spent_ - c)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {"rate": self.rate, "seen": self.n_seen_, "calls": self.n_calls_,
                    "spent": self.spent_}


def shadow_label(
    log: DecisionLog,
    request_id: int,
    decision: Decision,
    cloud_answer: str,
    labeler: Any,
    *,
    monitor: DriftMonitor | None = None,
) -> float:
    """Label a logged request from its edge answer and a cloud answer, and record it.

    Parameters
    ----------
    log : DecisionLog
    request_id : int
        What :meth:`DecisionLog.append` returned for ``decision``.
    decision : Decision
        Must hold the edge answer.
    cloud_answer : str
    labeler : AnswerLabeler
        A labeler comparing two answers (:class:`~confroute.labeling.CloudAgreementLabeler`,
        :class:`~confroute.labeling.JudgeLabeler`).
    monitor : DriftMonitor, optional
        Also fed the label.

    Returns
    -------
    float
        1, 0, or NaN when the labeler could not decide (nothing is written then).
    """
    from confroute.labeling import AnswerLabeler

    owner = "shadow_label"
    if not isinstance(log, DecisionLog):
        raise param_error("log", owner, "a DecisionLog", log, type_error=True)
    if not isinstance(decision, Decision) or decision.edge_answer is None:
        raise param_error("decision", owner, "a Decision holding the edge answer", decision,
                          type_error=not isinstance(decision, Decision))
    if not isinstance(labeler, AnswerLabeler):
        raise param_error("labeler", owner, "a labeler comparing two answers (CloudAgreement"
                          "Labeler, JudgeLabeler)", labeler, type_error=True)
    if not isinstance(cloud_answer, str):
        raise param_error("cloud_answer", owner, "a str", cloud_answer, type_error=True)
    check_int(request_id, "request_id", owner, min_value=1)
    y = float(labeler.label_answers([decision.prompt], [decision.edge_answer],
                                    [cloud_answer])[0])
    if not math.isnan(y):
        log.set_label(request_id, y, cloud_answer=cloud_answer)
        if monitor is not None:
            monitor.observe_label(decision.p_good, y)
    return y


# --------------------------------------------------------------------------- drift


def expected_calibration_error(p_good: Any, labels: Any, *, n_bins: int = 10) -> float:
    r"""Expected calibration error with equal-width bins.

    .. math:: \mathrm{ECE} = \sum_{b=1}^{B} \frac{n_b}{n} \left| \bar y_b - \bar p_b \right|

    over bins :math:`[0, 1/B), [1/B, 2/B), \dots, [(B-1)/B, 1]` (the last one
    closed), with :math:`\bar y_b` the share of good answers and :math:`\bar p_b`
    the mean ``p_good`` in bin *b*. NaN ``p_good`` are left out.

    Parameters
    ----------
    p_good : array-like of shape (n,)
    labels : array-like of shape (n,)
        1 / 0.
    n_bins : int >= 1, default 10

    Returns
    -------
    float
        NaN when no finite ``p_good`` is left.
    """
    owner = "expected_calibration_error"
    p = check_array(p_good, "p_good", owner, allow_nan=True, allow_empty=True)
    y = check_array(labels, "labels", owner, allow_empty=True)
    if p.shape != y.shape:
        raise InvalidParameterError(
            f"The inputs of {owner} must have the same length: 'p_good' has {p.size}, "
            f"'labels' has {y.size}.")
    b = check_int(n_bins, "n_bins", owner, min_value=1)
    keep = ~np.isnan(p)
    p, y = p[keep], y[keep]
    if p.size == 0:
        return math.nan
    idx = np.minimum((p * b).astype(int), b - 1)
    total = 0.0
    for k in np.unique(idx):
        m = idx == k
        total += m.sum() / p.size * abs(float(y[m].mean()) - float(p[m].mean()))
    return float(total)


def population_stability_index(
    expected: Any, actual: Any, *, n_bins: int = 10, eps: float = 1e-4
) -> float:
    r"""Population stability index of ``actual`` scores against ``expected`` ones.

    Bins are the ``n_bins``-quantiles of ``expected`` (duplicate edges merged),
    with the outer bins open to :math:`\pm\infty`, so every expected bin holds
    about :math:`1 / B` of the reference. With :math:`e_b` and :math:`a_b` the
    shares of each sample in bin *b* (floored at ``eps`` so empty bins stay finite):

    .. math:: \mathrm{PSI} = \sum_b (a_b - e_b) \ln \frac{a_b}{e_b}

    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 large shift.
    NaN scores are left out.

    Parameters
    ----------
    expected : array-like of shape (n,)
        Reference scores (the calibration set).
    actual : array-like of shape (m,)
        Recent scores.
    n_bins : int >= 1, default 10
    eps : float > 0, default 1e-4

    Returns
    -------
    float
        NaN when either side has no finite score.
    """
    owner = "population_stability_index"
    e = check_array(expected, "expected", owner, allow_nan=True, allow_empty=True)
    a = check_array(actual, "actual", owner, allow_nan=True, allow_empty=True)
    b = check_int(n_bins, "n_bins", owner, min_value=1)
    floor = check_float(eps, "eps", owner, min_value=0.0, min_inclusive=False)
    e, a = e[~np.isnan(e)], a[~np.isnan(a)]
    if e.size == 0 or a.size == 0:
        return math.nan
    return _psi(*_psi_reference(e, b), a, floor)


def _psi_reference(e: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner bin edges (quantiles of ``e``) and the share of ``e`` in each bin."""
    inner = np.unique(np.quantile(e, np.linspace(0, 1, n_bins + 1)[1:-1]))
    pe = np.bincount(np.searchsorted(inner, e, side="right"), minlength=inner.size + 1) / e.size
    return inner, pe


def _psi(inner: np.ndarray, pe: np.ndarray, a: np.ndarray, floor: float = 1e-4) -> float:
    a = a[~np.isnan(a)]
    if a.size == 0 or pe.size == 0:
        return math.nan
    pa = np.bincount(np.searchsorted(inner, a, side="right"), minlength=inner.size + 1) / a.size
    pe, pa = np.maximum(pe, floor), np.maximum(pa, floor)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


#: Bounds checked by :class:`DriftMonitor` unless others are given: (low, high), None = open.
DEFAULT_BOUNDS: dict[str, tuple[float | None, float | None]] = {"psi": (None, 0.25)}
_METRICS = ("cloud_share", "agreement", "ece", "psi")


class DriftMonitor:
    """Rolling health of a deployed router, compared with its calibration.

    Metrics (over the last ``window`` observations of each kind):

    ``cloud_share``
        Share of decisions escalated to the cloud.
    ``agreement``
        Share of shadow-labelled kept answers labelled good.
    ``ece``
        :func:`expected_calibration_error` of ``p_good`` on labelled requests.
    ``psi``
        :func:`population_stability_index` of the recent scores against
        ``calibration_scores``, per score column; the largest is reported.

    A metric is NaN until it has ``min_samples`` observations. When a metric
    leaves its ``(low, high)`` bound a warning is logged (logger
    ``confroute.traffic``) once per crossing: again only after it came back.

    Parameters
    ----------
    calibration_scores : array-like of shape (n,) or (n, k)
        Estimator scores of the calibration set.
    feature_names : sequence of str, optional
        Names of the k score columns in ``Decision.scores`` (default: the
        order of the scores in each decision).
    window : int >= 1, default 500
    bounds : mapping of metric name to (low, high), optional
        Default :data:`DEFAULT_BOUNDS`. Names among ``cloud_share``,
        ``agreement``, ``ece``, ``psi``; None for an open side.
    n_bins : int >= 1, default 10
        Bins of both ECE and PSI.
    min_samples : int >= 1, default 30
    """

    def __init__(self, calibration_scores: Any, *, feature_names: Sequence[str] | None = None,
                 window: int = 500, bounds: Mapping[str, Any] | None = None, n_bins: int = 10,
                 min_samples: int = 30) -> None:
        owner = "DriftMonitor"
        ref = check_array(calibration_scores, "calibration_scores", owner, ndim=(1, 2),
                          allow_nan=True)
        self.calibration_scores = ref[:, None] if ref.ndim == 1 else ref
        k = self.calibration_scores.shape[1]
        if feature_names is not None and (isinstance(feature_names, str)
                                          or len(list(feature_names)) != k):
            raise param_error("feature_names", owner, f"{k} names, one per score column",
                              feature_names, type_error=isinstance(feature_names, str))
        self.feature_names = None if feature_names is None else [str(n) for n in feature_names]
        self.window = check_int(window, "window", owner, min_value=1)
        self.bounds = _check_bounds(DEFAULT_BOUNDS if bounds is None else bounds, owner)
        self.n_bins = check_int(n_bins, "n_bins", owner, min_value=1)
        self.min_samples = check_int(min_samples, "min_samples", owner, min_value=1)
        self._lock = threading.Lock()
        self._sources: deque[bool] = deque(maxlen=self.window)
        self._scores: deque[np.ndarray] = deque(maxlen=self.window)
        self._labelled: deque[tuple[float, float]] = deque(maxlen=self.window)
        self._outside: dict[str, bool] = dict.fromkeys(_METRICS, False)
        # The reference binning is fixed: computed once, not at every observation.
        self._reference = [
            _psi_reference(col[~np.isnan(col)], self.n_bins) if (~np.isnan(col)).any()
            else (np.zeros(0), np.zeros(0)) for col in self.calibration_scores.T
        ]

    def observe(self, decision: Decision | RoutedResponse) -> None:
        """Record one routing decision (its source and scores)."""
        if isinstance(decision, RoutedResponse):
            decision = decision.decision
        if not isinstance(decision, Decision):
            raise param_error("decision", "DriftMonitor.observe", "a Decision", decision,
                              type_error=True)
        names = self.feature_names or list(decision.scores)
        k = self.calibration_scores.shape[1]
        row = np.array([float(decision.scores.get(n, math.nan)) for n in names[:k]])
        if row.size != k:
            raise param_error("decision", "DriftMonitor.observe", f"{k} score(s)",
                              dict(decision.scores))
        with self._lock:
            self._sources.append(decision.source == "cloud")
            self._scores.append(row)
        self.check()

    def observe_label(self, p_good: float, label: float) -> None:
        """Record the label (1 / 0) of a shadow-labelled request and its ``p_good`` (NaN ok)."""
        owner = "DriftMonitor.observe_label"
        # NaN p_good (an unscorable request) still counts for the agreement rate.
        nan = isinstance(p_good, float) and math.isnan(p_good)
        p = math.nan if nan else check_float(p_good, "p_good", owner, min_value=0.0,
                                             max_value=1.0)
        y = _check_label(label, owner)
        if y is None:
            raise param_error("label", owner, "1 or 0", label)
        with self._lock:
            self._labelled.append((p, y))
        self.check()

    def snapshot(self) -> dict[str, Any]:
        """Current metrics and counts (NaN where not enough observations)."""
        with self._lock:
            src = np.array(self._sources, dtype=float)
            scores = np.array(self._scores).reshape(-1, self.calibration_scores.shape[1])
            lab = np.array(self._labelled, dtype=float).reshape(-1, 2)
        enough, enough_lab = src.size >= self.min_samples, len(lab) >= self.min_samples
        psi = [_psi(inner, pe, scores[:, j]) for j, (inner, pe) in enumerate(self._reference)]
        return {
            "cloud_share": float(src.mean()) if enough else math.nan,
            "agreement": float(lab[:, 1].mean()) if enough_lab else math.nan,
            "ece": expected_calibration_error(lab[:, 0], lab[:, 1], n_bins=self.n_bins)
            if enough_lab else math.nan,
            "psi": float(max(psi)) if enough and psi else math.nan,
            "psi_per_feature": psi if enough else [],
            "n_decisions": int(src.size),
            "n_labelled": len(lab),
        }

    def check(self) -> list[str]:
        """Log a warning for each metric that newly left its bound; return those names."""
        snap = self.snapshot()
        crossed = []
        for name, (lo, hi) in self.bounds.items():
            v = snap[name]
            out = not math.isnan(v) and ((lo is not None and v < lo) or (hi is not None and v > hi))
            with self._lock:
                was, self._outside[name] = self._outside[name], out
            if out and not was:
                crossed.append(name)
                logger.warning("confroute drift: %s = %.4g left its bound [%s, %s]", name, v,
                               "-inf" if lo is None else f"{lo:g}",
                               "inf" if hi is None else f"{hi:g}")
        return crossed

    def register_metrics(self, registry: Any, *, prefix: str = "confroute_drift") -> None:
        """Add one gauge per metric to a ``prometheus_client.CollectorRegistry``.

        Gauges: ``{prefix}_cloud_share``, ``{prefix}_agreement``, ``{prefix}_ece``,
        ``{prefix}_psi``; each is read from :meth:`snapshot` at scrape time.
        """
        from prometheus_client import CollectorRegistry, Gauge

        if not isinstance(registry, CollectorRegistry):
            raise param_error("registry", "DriftMonitor.register_metrics",
                              "a prometheus_client.CollectorRegistry", registry, type_error=True)
        docs = {"cloud_share": "rolling share of requests escalated to the cloud",
                "agreement": "rolling share of shadow-labelled kept answers judged good",
                "ece": "expected calibration error of p_good on shadow-labelled requests",
                "psi": "population stability index of scores vs the calibration set"}
        for name in _METRICS:
            gauge = Gauge(f"{prefix}_{name}", docs[name], registry=registry)
            gauge.set_function(self._reader(name))

    def _reader(self, name: str) -> Callable[[], float]:
        return lambda: float(self.snapshot()[name])


def _check_bounds(bounds: Any, owner: str) -> dict[str, tuple[float | None, float | None]]:
    if not isinstance(bounds, Mapping):
        raise param_error("bounds", owner, "a mapping of metric name to (low, high)", bounds,
                          type_error=True)
    out: dict[str, tuple[float | None, float | None]] = {}
    for name, pair in bounds.items():
        if name not in _METRICS:
            raise param_error("bounds", owner, "keys among " + ", ".join(_METRICS), name)
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise param_error(f"bounds[{name!r}]", owner, "a (low, high) pair", pair,
                              type_error=True)
        lo = check_float(pair[0], f"bounds[{name!r}]", owner, allow_none=True)
        hi = check_float(pair[1], f"bounds[{name!r}]", owner, allow_none=True)
        if lo is not None and hi is not None and lo > hi:
            raise param_error(f"bounds[{name!r}]", owner, "low <= high", pair)
        out[str(name)] = (lo, hi)
    return out


# --------------------------------------------------------------------------- recalibrate


def recalibrate(
    router: Router,
    log: DecisionLog,
    *,
    labeler: Any = None,
    min_labels: int = 50,
    weight_recent: int | None = None,
    merge_calibration: tuple[Any, Any] | None = None,
    policy_window: int | None = None,
) -> Router:
    """A copy of ``router`` with its calibrator and policy refitted on logged traffic.

    The estimators, the edge and cloud models and every parameter are shared;
    only clones of the calibrator and the policy are fitted. The calibrator is
    fitted on the labelled rows of ``log`` (scores as logged, by any router), merged
    if asked with the original calibration set, with recency weights

    .. math:: w_i = 2^{-a_i / h}

    where :math:`a_i` is the row's age in labelled rows (0 = newest) and
    :math:`h` = ``weight_recent`` (the half-life); merged calibration rows get
    the weight of the oldest logged row. Calibrators take no sample weights,
    so a weight is applied by repeating a row :math:`\\mathrm{round}(10\\, w_i)`
    times (weights quantised to 0.1; rows below 0.05 are dropped).

    The policy is refitted on the new ``p_good`` of the last ``policy_window``
    logged rows (labelled or not, so a budget threshold follows real traffic);
    a :class:`~confroute.policies.RiskControlPolicy`, which needs labels, is
    refitted on the labelled rows.

    Parameters
    ----------
    router : Router
        A calibrated router.
    log : DecisionLog
    labeler : Labeler, optional
        The labeler that made the log's labels; its ``describe()`` is recorded
        in ``calibration_["labeler"]``.
    min_labels : int >= 2, default 50
    weight_recent : int >= 1, optional
        Half-life in labelled rows; None = equal weights.
    merge_calibration : (scores, labels), optional
        The original calibration set: scores of shape (n,) or (n, k), labels (n,).
    policy_window : int >= 1, optional
        Rows for the policy fit (default: all rows).

    Returns
    -------
    Router
        A new calibrated router; ``router`` is unchanged.

    Raises
    ------
    InvalidParameterError
        Fewer than ``min_labels`` usable labelled rows, a single class, or bad
        parameters (checked before anything is fitted).
    """
    if not isinstance(router, Router):
        raise param_error("router", "recalibrate", "a Router", router, type_error=True)
    if not isinstance(log, DecisionLog):
        raise param_error("log", "recalibrate", "a DecisionLog", log, type_error=True)
    return recalibrate_router(router, log, labeler=labeler, min_labels=min_labels,
                              weight_recent=weight_recent, merge_calibration=merge_calibration,
                              policy_window=policy_window, owner="recalibrate")
