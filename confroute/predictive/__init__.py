"""Pre-generation (query-only) routing, following Zhang et al., arXiv:2502.11021.

Offline: sample both models on training prompts, turn their semantic entropies
into preference labels (:mod:`~confroute.predictive.labels`), embed the prompts
(:mod:`~confroute.predictive.embed`) and fit a query router
(:mod:`~confroute.predictive.routers`). Online: the router scores a query before
any generation; :class:`QueryRouterEstimator` plugs it into the usual router.

Importing this package does not import torch or scikit-learn: its names load on
first use (so the CLI parser, which imports :mod:`confroute.predictive.cli`, stays light).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confroute.predictive.embed import QueryEmbedder, TextEncoder
    from confroute.predictive.labels import (
        LABEL_CREDIT,
        ROW_KEYS,
        accuracy_labels,
        label_credits,
        make_se_labels,
        preference_label,
        preference_labels,
        preference_rows,
        read_labels_jsonl,
        row_label,
        write_labels_jsonl,
    )
    from confroute.predictive.routers import (
        KNNRouter,
        MatrixFactorizationRouter,
        MLPRouter,
        QueryRouter,
        QueryRouterEstimator,
        SWRankingRouter,
        router_registry,
        threshold_for_cloud_share,
    )
    from confroute.predictive.two_stage import TwoStageRouter, TwoStageStats

_LAZY: dict[str, str] = {
    "QueryEmbedder": "confroute.predictive.embed",
    "TextEncoder": "confroute.predictive.embed",
    "LABEL_CREDIT": "confroute.predictive.labels",
    "ROW_KEYS": "confroute.predictive.labels",
    "accuracy_labels": "confroute.predictive.labels",
    "label_credits": "confroute.predictive.labels",
    "make_se_labels": "confroute.predictive.labels",
    "preference_label": "confroute.predictive.labels",
    "preference_labels": "confroute.predictive.labels",
    "preference_rows": "confroute.predictive.labels",
    "read_labels_jsonl": "confroute.predictive.labels",
    "row_label": "confroute.predictive.labels",
    "write_labels_jsonl": "confroute.predictive.labels",
    "KNNRouter": "confroute.predictive.routers",
    "MatrixFactorizationRouter": "confroute.predictive.routers",
    "MLPRouter": "confroute.predictive.routers",
    "QueryRouter": "confroute.predictive.routers",
    "QueryRouterEstimator": "confroute.predictive.routers",
    "SWRankingRouter": "confroute.predictive.routers",
    "router_registry": "confroute.predictive.routers",
    "threshold_for_cloud_share": "confroute.predictive.routers",
    "TwoStageRouter": "confroute.predictive.two_stage",
    "TwoStageStats": "confroute.predictive.two_stage",
}

__all__ = [
    "LABEL_CREDIT",
    "ROW_KEYS",
    "KNNRouter",
    "MLPRouter",
    "MatrixFactorizationRouter",
    "QueryEmbedder",
    "QueryRouter",
    "QueryRouterEstimator",
    "SWRankingRouter",
    "TextEncoder",
    "TwoStageRouter",
    "TwoStageStats",
    "accuracy_labels",
    "label_credits",
    "make_se_labels",
    "preference_label",
    "preference_labels",
    "preference_rows",
    "read_labels_jsonl",
    "router_registry",
    "row_label",
    "threshold_for_cloud_share",
    "write_labels_jsonl",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'confroute.predictive' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
