"""confroute: confidence-driven routing between a small local (edge) LLM and a large (cloud) one.

``import confroute`` is light: torch and transformers load only when a part
that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from confroute._version import __version__
from confroute.errors import (
    CloudError,
    ConfigError,
    ConfrouteError,
    EstimationError,
    InvalidParameterError,
    InvalidTypeError,
    MissingDependencyError,
    ModelLoadError,
    NotFittedError,
    SerializationError,
)
from confroute.types import (
    Decision,
    Estimate,
    GenerationConfig,
    Prompt,
    RoutedResponse,
    Sample,
    Samples,
)

_LAZY: dict[str, str] = {
    # models
    "LanguageModel": "confroute.models.base",
    "collect_samples": "confroute.models.base",
    "HFLanguageModel": "confroute.models.hf",
    "OpenAIModel": "confroute.models.openai",
    "load_default_edge_model": "confroute.models.embedded",
    "load_default_embedder": "confroute.models.embedded",
    "Embedder": "confroute.models.embedded",
    # estimators
    "UncertaintyEstimator": "confroute.estimators",
    "MeanTokenEntropy": "confroute.estimators",
    "SequenceLogProb": "confroute.estimators",
    "SemanticEntropy": "confroute.estimators",
    "SelfConsistency": "confroute.estimators",
    "VerbalizedConfidence": "confroute.estimators",
    "EnsembleEstimator": "confroute.estimators",
    "NLIEquivalence": "confroute.estimators",
    "EmbeddingEquivalence": "confroute.estimators",
    "ExactMatchEquivalence": "confroute.estimators",
    "estimate_many": "confroute.estimators",
    # routing
    "Calibrator": "confroute.calibration",
    "IsotonicCalibrator": "confroute.calibration",
    "PlattCalibrator": "confroute.calibration",
    "Policy": "confroute.policies",
    "ThresholdPolicy": "confroute.policies",
    "BudgetPolicy": "confroute.policies",
    "CostAwarePolicy": "confroute.policies",
    "RiskControlPolicy": "confroute.policies",
    "Router": "confroute.router",
    # deployment configuration
    "Config": "confroute.config",
    "ServeOptions": "confroute.config",
    "load_config": "confroute.config",
    # k models
    "Cascade": "confroute.cascade",
    "Tier": "confroute.cascade",
    "KWaySelector": "confroute.cascade",
    # calibration on your own traffic
    "CloudAgreementLabeler": "confroute.labeling",
    "JudgeLabeler": "confroute.labeling",
    "SEPreferenceLabeler": "confroute.labeling",
    "DecisionLog": "confroute.traffic",
    "DriftMonitor": "confroute.traffic",
    "ShadowSampler": "confroute.traffic",
    "recalibrate": "confroute.traffic",
    # pre-generation (query-only) routing
    "QueryRouterEstimator": "confroute.predictive",
    "SWRankingRouter": "confroute.predictive",
    "MatrixFactorizationRouter": "confroute.predictive",
    "MLPRouter": "confroute.predictive",
    "KNNRouter": "confroute.predictive",
    "QueryEmbedder": "confroute.predictive",
    "make_se_labels": "confroute.predictive",
    "threshold_for_cloud_share": "confroute.predictive",
}

__all__ = [
    "CloudError",
    "ConfigError",
    "ConfrouteError",
    "Decision",
    "Estimate",
    "EstimationError",
    "GenerationConfig",
    "InvalidParameterError",
    "InvalidTypeError",
    "MissingDependencyError",
    "ModelLoadError",
    "NotFittedError",
    "Prompt",
    "RoutedResponse",
    "Sample",
    "Samples",
    "SerializationError",
    "__version__",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'confroute' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
