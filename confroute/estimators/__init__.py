"""Uncertainty estimators (higher score = more uncertain), answer extractors and
semantic-equivalence backends.

Every estimator is registered by name in :data:`estimator_registry`, declares the
generations it needs and scores from shared samples, so several estimators run on
one generation (:func:`estimate_many`).
"""

from __future__ import annotations

from confroute.estimators.answers import (
    EXTRACTORS,
    extract_choice,
    extract_number,
    extract_short_answer,
    get_extractor,
    normalize_answer,
)
from confroute.estimators.base import UncertaintyEstimator, estimate_many, estimator_registry
from confroute.estimators.consistency import SelfConsistency, answer_agreement
from confroute.estimators.ensemble import EnsembleEstimator
from confroute.estimators.equivalence import (
    EmbeddingEquivalence,
    Equivalence,
    ExactMatchEquivalence,
    NLIEquivalence,
    equivalence_registry,
    resolve_equivalence,
)
from confroute.estimators.logprob import MeanTokenEntropy, SequenceLogProb
from confroute.estimators.options import (
    OptionEntropy,
    cloze_prompt,
    parse_option_texts,
    parse_options,
)
from confroute.estimators.probes import (
    HiddenStateProbe,
    LearnedEstimator,
    PromptProbe,
    SemanticEntropyProbe,
    shared_probe_fits,
)
from confroute.estimators.semantic import SemanticEntropy, semantic_entropy_from_clusters
from confroute.estimators.verbalized import VerbalizedConfidence, parse_confidence

__all__ = [
    "EXTRACTORS",
    "EmbeddingEquivalence",
    "EnsembleEstimator",
    "Equivalence",
    "ExactMatchEquivalence",
    "HiddenStateProbe",
    "LearnedEstimator",
    "MeanTokenEntropy",
    "NLIEquivalence",
    "OptionEntropy",
    "PromptProbe",
    "SelfConsistency",
    "SemanticEntropy",
    "SemanticEntropyProbe",
    "SequenceLogProb",
    "UncertaintyEstimator",
    "VerbalizedConfidence",
    "answer_agreement",
    "cloze_prompt",
    "equivalence_registry",
    "estimate_many",
    "estimator_registry",
    "extract_choice",
    "extract_number",
    "extract_short_answer",
    "get_extractor",
    "normalize_answer",
    "parse_confidence",
    "parse_option_texts",
    "parse_options",
    "resolve_equivalence",
    "semantic_entropy_from_clusters",
    "shared_probe_fits",
]
