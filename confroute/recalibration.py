"""Refit a router's calibrator and policy on labelled rows of a decision log.

This module sits below :mod:`confroute.router`: it imports neither the router nor
:mod:`confroute.traffic`, and works on any router-like object (``estimators``,
``calibrator``, ``policy``, ``feature_names``, ``calibration_`` and the
constructor of :class:`~confroute.router.Router`) and any log-like object
(``labelled()``, ``rows(last=...)``, ``path``, ``router_fingerprint``,
``allow_foreign``: :class:`~confroute.traffic.DecisionLog`). Both
:meth:`confroute.router.Router.recalibrate` and :func:`confroute.traffic.recalibrate`
delegate here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from confroute._persist import part_to_spec
from confroute._validation import check_array, check_int, check_labels, param_error
from confroute.errors import InvalidParameterError

__all__ = ["fingerprint", "recalibrate_router"]


def fingerprint(router: Any) -> str:
    """Identity of a calibrated router: a hash of its parts, parameters and learned state.

    Two routers that would decide differently have different fingerprints
    (a recalibrated router gets a new one); models are not part of it.

    Parameters
    ----------
    router : Router

    Returns
    -------
    str
        16 hexadecimal characters.
    """
    payload = {
        "estimators": [part_to_spec(e, "estimator") for e in router.estimators],
        "calibrator": part_to_spec(router.calibrator, "calibrator")
        if router.calibration_ is not None else None,
        "policy": part_to_spec(router.policy, "policy"),
    }
    text = json.dumps(payload, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def recalibrate_router(
    router: Any,
    log: Any,
    *,
    labeler: Any = None,
    min_labels: int = 50,
    weight_recent: int | None = None,
    merge_calibration: tuple[Any, Any] | None = None,
    policy_window: int | None = None,
    owner: str = "Router.recalibrate",
) -> Any:
    """A copy of ``router`` with its calibrator and policy refitted on ``log``.

    See :func:`confroute.traffic.recalibrate` for the weighting and the policy
    refit; the parameters are the same. Every argument is checked before
    anything is fitted; ``router`` is never changed.

    Raises
    ------
    InvalidParameterError
        ``log`` was written by another router (and not opened with
        ``allow_foreign=True``), has fewer than ``min_labels`` usable labelled
        rows or a single class; or a bad parameter.
    """
    _check_args(router, log, labeler, owner)
    n_min = check_int(min_labels, "min_labels", owner, min_value=2)
    half = check_int(weight_recent, "weight_recent", owner, min_value=1, allow_none=True)
    pwin = check_int(policy_window, "policy_window", owner, min_value=1, allow_none=True)
    names = router.feature_names
    merged = None if merge_calibration is None else _check_merge(merge_calibration, len(names),
                                                                 owner)
    x, y = _features(log.labelled(), names)
    if len(y) < n_min:
        raise param_error("log", owner, f"at least {n_min} labelled rows with scores "
                          f"{names} (min_labels)", f"{len(y)} usable labelled rows")
    w = np.ones(len(y)) if half is None else 0.5 ** (np.arange(len(y))[::-1] / half)
    if merged is not None:
        mx, my = merged
        x, y = np.vstack([mx, x]), np.concatenate([my, y])
        w = np.concatenate([np.full(len(my), w[0]), w])
    reps = np.rint(10.0 * w).astype(int)
    check_labels(np.repeat(y, reps).astype(int), "log", owner)  # both classes
    new = _copy_router(router)
    xr = np.repeat(x, reps, axis=0)
    new.calibrator.fit(xr[:, 0] if x.shape[1] == 1 else xr, np.repeat(y, reps).astype(int))
    _fit_policy(new, log, names, x, y, pwin)
    new.calibration_ = {
        **dict(router.calibration_ or {}),
        "n": len(y), "n_unscored": 0, "edge_accuracy": float(np.mean(y)),
        "source": "traffic", "log": str(log.path),
        "previous_fingerprint": fingerprint(router), "weight_recent": half,
        "merged_calibration": merged is not None,
        "labeler": labeler.describe() if labeler is not None else None,
    }
    return new


def _check_args(router: Any, log: Any, labeler: Any, owner: str) -> None:
    if not all(hasattr(router, a) for a in ("estimators", "calibrator", "policy",
                                              "calibration_")):
        raise param_error("router", owner, "a Router", router, type_error=True)
    if router.calibration_ is None:
        raise param_error("router", owner, "a calibrated Router (call calibrate first)", router)
    if not all(callable(getattr(log, a, None)) for a in ("labelled", "rows")):
        raise param_error("log", owner, "a DecisionLog", log, type_error=True)
    if labeler is not None and not callable(getattr(labeler, "describe", None)):
        raise param_error("labeler", owner, "a labeler (with describe()) or None", labeler,
                          type_error=True)
    written_by = getattr(log, "router_fingerprint", None)
    mine = fingerprint(router)
    if written_by is not None and written_by != mine and not getattr(log, "allow_foreign", False):
        raise InvalidParameterError(
            f"The 'log' parameter of {owner} must be a decision log written by this router "
            f"(fingerprint {mine!r}). Got the log at {str(getattr(log, 'path', log))!r}, "
            f"written by router {written_by!r}; open it with allow_foreign=True to use it anyway."
        )


def _features(rows: Sequence[Mapping[str, Any]], names: Sequence[str]
              ) -> tuple[np.ndarray, np.ndarray]:
    """Score matrix (n, k) and labels (n,) of the rows that have every score, finite."""
    xs, ys = [], []
    for r in rows:
        v = [r["scores"].get(n, math.nan) for n in names]
        if all(math.isfinite(s) for s in v):
            xs.append(v)
            ys.append(r["label"])
    return np.array(xs, dtype=float).reshape(-1, len(names)), np.array(ys, dtype=float)


def _check_merge(merge: Any, k: int, owner: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(merge, (tuple, list)) or len(merge) != 2:
        raise param_error("merge_calibration", owner, "a (scores, labels) pair", merge,
                          type_error=True)
    mx = check_array(merge[0], "merge_calibration", owner, ndim=(1, 2))
    mx = mx[:, None] if mx.ndim == 1 else mx
    my = check_labels(merge[1], "merge_calibration", owner, require_both=False).astype(float)
    if mx.shape[1] != k or mx.shape[0] != my.size:
        raise param_error("merge_calibration", owner, f"scores of shape (n, {k}) and n labels",
                          f"scores {mx.shape}, {my.size} labels")
    return mx, my


def _copy_router(router: Any) -> Any:
    """A new router of the same class sharing estimators and models, with unfitted
    clones of the calibrator and the policy."""
    from sklearn.base import clone

    return type(router)(
        list(router.estimators), clone(router.calibrator), clone(router.policy),
        edge=router.edge, cloud=list(router.clouds), on_cloud_error=router.on_cloud_error,
        cloud_config=router.cloud_config, edge_max_new_tokens=router.edge_max_new_tokens,
    )


def _fit_policy(new: Any, log: Any, names: Sequence[str], x: np.ndarray, y: np.ndarray,
                window: int | None) -> None:
    from confroute.policies import RiskControlPolicy

    if isinstance(new.policy, RiskControlPolicy):
        new.policy.fit(_p_good(new.calibrator, x), y.astype(int))
        return
    rows = log.rows(last=window)
    mat = np.array([[r["scores"].get(n, math.nan) for n in names] for r in rows], dtype=float)
    new.policy.fit(_p_good(new.calibrator, mat.reshape(-1, len(names))))


def _p_good(calibrator: Any, x: np.ndarray) -> np.ndarray:
    """P(good) of shape (n,) from scores (n, k), whether the calibrator's
    ``predict_proba`` gives (n,) or the scikit-learn (n, 2) with a ``p_good`` method."""
    scores = x if x.shape[1] > 1 else x[:, 0]
    fn = getattr(calibrator, "p_good", None)
    p = np.asarray(fn(scores) if callable(fn) else calibrator.predict_proba(scores), dtype=float)
    return p[:, 1] if p.ndim == 2 else p
