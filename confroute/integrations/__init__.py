"""Adapters that put a confroute Router behind other LLM frameworks (optional extras).

- :mod:`confroute.integrations.langchain`: :class:`ConfrouteChatModel`, a LangChain
  chat model (``pip install "confroute[langchain]"``).
- :mod:`confroute.integrations.litellm`: :class:`ConfrouteRoutingStrategy`, a
  routing strategy for ``litellm.Router`` (``pip install "confroute[litellm]"``).

Neither is imported by ``import confroute`` nor by this package: import the
submodule you need. Both apply the same escalation rule
(:data:`confroute.integrations.common.ESCALATION_RULE`): a request the edge
model cannot honour goes to the cloud without being scored.
"""

from __future__ import annotations

__all__: list[str] = []
