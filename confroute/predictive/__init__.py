"""Pre-generation (query-only) routing, following Zhang et al., arXiv:2502.11021.

Offline: sample both models on training prompts, turn their semantic entropies
into preference labels (:mod:`~confroute.predictive.labels`), embed the prompts
(:mod:`~confroute.predictive.embed`) and fit a query router
(:mod:`~confroute.predictive.routers`). Online: the router scores a query before
any generation; :class:`QueryRouterEstimator` plugs it into the usual router.

Importing this package does not import torch.
"""

from __future__ import annotations

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
