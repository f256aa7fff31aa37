"""Approximate list prices of hosted models, per million input / output tokens.

The table holds **approximate mid-2024 list prices in US dollars** for the models
whose answers are recorded in the HELM MMLU runs (``helm_combined``). Providers
change prices and hosting providers differ (the open-weight models are priced as
served by typical hosting providers), so treat them as an order of magnitude
for cost comparisons, not as a bill. Every function takes ``overrides`` so a
user can put in their own numbers or add models.

Token counts for recorded prompts are estimated as ``ceil(len(text) / 4)``
(:func:`estimate_tokens`), the usual rule of thumb of about four characters per
English token; no tokenizer is loaded.

The cost of one call is

.. math::

    c = \\frac{p_\\text{in} \\, t_\\text{in} + p_\\text{out} \\, t_\\text{out}}{10^6}

with prices :math:`p` per million tokens and token counts :math:`t`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from confroute._validation import check_float, check_int, param_error
from confroute.errors import InvalidParameterError

__all__ = [
    "PRICES_MID_2024",
    "Price",
    "call_cost",
    "estimate_tokens",
    "lookup_price",
    "price_table",
]


@dataclass(frozen=True)
class Price:
    """Price of one model in dollars per million tokens.

    Attributes
    ----------
    input_per_mtok : float >= 0
        Dollars per million prompt (input) tokens.
    output_per_mtok : float >= 0
        Dollars per million completion (output) tokens.
    approximate : bool, default True
        True for the built-in list prices; False for user-supplied ones.
    """

    input_per_mtok: float
    output_per_mtok: float
    approximate: bool = True

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok"):
            v = check_float(getattr(self, name), name, "Price", min_value=0.0)
            object.__setattr__(self, name, v)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for one call with these token counts (see module formula)."""
        t_in = check_int(prompt_tokens, "prompt_tokens", "Price.cost", min_value=0)
        t_out = check_int(completion_tokens, "completion_tokens", "Price.cost", min_value=0)
        return (self.input_per_mtok * t_in + self.output_per_mtok * t_out) / 1e6


#: Approximate mid-2024 list prices (USD per million input / output tokens).
PRICES_MID_2024: Mapping[str, Price] = MappingProxyType({
    "gpt-4-0613": Price(30.0, 60.0),
    "gpt-4-1106-preview": Price(10.0, 30.0),
    "gpt-4o-2024-05-13": Price(5.0, 15.0),
    "claude-3-opus": Price(15.0, 75.0),
    "gemini-1.5-pro": Price(3.5, 10.5),
    "gemini-1.5-flash": Price(0.35, 1.05),
    "llama-3-70b": Price(0.9, 0.9),
    "mixtral-8x22b": Price(1.2, 1.2),
})

# Provider prefixes and dated suffixes used by HELM column names
# (e.g. "anthropic_claude-3-opus-20240229", "google_gemini-1.5-pro-preview-0409").
_PREFIXES = ("openai_", "anthropic_", "google_", "meta_", "mistralai_", "writer_")
_SUFFIXES = ("-20240229", "-preview-0409", "-preview-0514")


def _canonical(name: str) -> str:
    n = name.strip().lower()
    for p in _PREFIXES:
        if n.startswith(p):
            n = n[len(p):]
            break
    for s in _SUFFIXES:
        if n.endswith(s):
            n = n[: -len(s)]
            break
    return n


def _as_price(value: Any, key: str, owner: str) -> Price:
    if isinstance(value, Price):
        return value
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return Price(float(value[0]), float(value[1]), approximate=False)
    raise param_error(f"overrides[{key!r}]", owner,
                      "a Price or an (input_per_mtok, output_per_mtok) pair", value,
                      type_error=True)


def price_table(overrides: Mapping[str, Any] | None = None) -> dict[str, Price]:
    """The built-in table with ``overrides`` applied (a new dict; the built-in is read-only).

    Parameters
    ----------
    overrides : mapping of str to Price or (float, float), optional
        Prices to replace or add, keyed by model name (HELM names such as
        ``"openai_gpt-4-0613"`` are accepted and normalised).

    Returns
    -------
    dict of str to Price
    """
    owner = "price_table"
    table = dict(PRICES_MID_2024)
    if overrides is None:
        return table
    if not isinstance(overrides, Mapping):
        raise param_error("overrides", owner, "a mapping of model name to price", overrides,
                          type_error=True)
    for key, value in overrides.items():
        if not isinstance(key, str) or not key.strip():
            raise param_error("overrides", owner, "a mapping with non-empty str keys", key,
                              type_error=True)
        table[_canonical(key)] = _as_price(value, key, owner)
    return table


def lookup_price(model: str, overrides: Mapping[str, Any] | None = None) -> Price:
    """Price of ``model`` (exact name or a HELM column name such as ``"meta_llama-3-70b"``).

    Raises
    ------
    InvalidParameterError
        If the model has no price; the message lists the priced models.
    """
    if not isinstance(model, str):
        raise param_error("model", "lookup_price", "a model name (str)", model, type_error=True)
    table = price_table(overrides)
    key = _canonical(model)
    if key not in table:
        raise InvalidParameterError(
            f"The 'model' parameter of lookup_price must be a priced model. Got {model!r}; "
            f"priced: {', '.join(sorted(table))} (add it with overrides={{name: (in, out)}})."
        )
    return table[key]


def estimate_tokens(text: str) -> int:
    """Approximate token count of ``text``: ``ceil(len(text) / 4)`` (no tokenizer loaded)."""
    if not isinstance(text, str):
        raise param_error("text", "estimate_tokens", "a str", text, type_error=True)
    return math.ceil(len(text) / 4)


def call_cost(
    model: str | Price, prompt: str | int, completion: str | int,
    overrides: Mapping[str, Any] | None = None,
) -> float:
    """Dollars for one call of ``model`` on a prompt and completion.

    Parameters
    ----------
    model : str or Price
        A priced model name (see :func:`lookup_price`) or a price.
    prompt, completion : str or int
        The texts (tokens estimated with :func:`estimate_tokens`) or token counts.
    overrides : mapping, optional
        As in :func:`price_table`.

    Returns
    -------
    float
    """
    price = model if isinstance(model, Price) else lookup_price(model, overrides)
    t_in = estimate_tokens(prompt) if isinstance(prompt, str) else prompt
    t_out = estimate_tokens(completion) if isinstance(completion, str) else completion
    return price.cost(t_in, t_out)
