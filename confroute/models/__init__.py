"""Language models: the protocol, local Hugging Face models, remote and embedded defaults.

Heavy modules (torch, transformers) are imported only when their classes are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confroute.models.base import (
    LanguageModel,
    MultiConfigLanguageModel,
    SampleRequest,
    ScoringLanguageModel,
    collect_samples,
    generate_configs,
    merge_requests,
)

if TYPE_CHECKING:  # pragma: no cover
    from confroute.models.embedded import (
        Embedder,
        load_default_edge_model,
        load_default_embedder,
    )
    from confroute.models.hf import HFLanguageModel
    from confroute.models.openai import OpenAIModel

__all__ = [
    "Embedder",
    "HFLanguageModel",
    "LanguageModel",
    "MultiConfigLanguageModel",
    "OpenAIModel",
    "SampleRequest",
    "ScoringLanguageModel",
    "collect_samples",
    "generate_configs",
    "load_default_edge_model",
    "load_default_embedder",
    "merge_requests",
]

_LAZY = {
    "HFLanguageModel": "confroute.models.hf",
    "Embedder": "confroute.models.embedded",
    "load_default_edge_model": "confroute.models.embedded",
    "load_default_embedder": "confroute.models.embedded",
    "OpenAIModel": "confroute.models.openai",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'confroute.models' has no attribute {name!r}")
