"""Prices and per-sample billing of :class:`~confroute.models.openai.OpenAIModel`."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from confroute._validation import param_error
from confroute.models.openai.wire import Parsed
from confroute.types import Sample

__all__ = ["Billing", "check_price_table", "completion_split", "flatten_samples"]

_EXPECTED = "a mapping {'prompt': float >= 0, 'completion': float >= 0} or None"


def check_price_table(table: Any, owner: str) -> tuple[float, float] | None:
    """(prompt, completion) prices per one million tokens, or None for no table.

    Raises
    ------
    InvalidTypeError, InvalidParameterError
        If ``table`` is not a mapping with exactly those two finite, non-negative prices.
    """
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise param_error("price_table", owner, _EXPECTED, table, type_error=True)
    if set(table) != {"prompt", "completion"}:
        raise param_error("price_table", owner, _EXPECTED, table)
    prices = []
    for key in ("prompt", "completion"):
        value = table[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise param_error("price_table", owner, _EXPECTED, table)
        prices.append(float(value))
    return prices[0], prices[1]


def completion_split(parsed: Parsed, want: int) -> tuple[list[int], int]:
    """Completion tokens of each of the first ``want`` choices, and their total.

    A choice with logprobs counts its logprobs; the total is ``usage.completion_tokens``
    when reported, else the counted sum. Choices without logprobs get an even split
    of what the counted choices leave of the total.
    """
    choices = parsed.choices[:want]
    counted = [len(c.logprobs) if c.logprobs is not None else None for c in choices]
    known = sum(c for c in counted if c is not None)
    total = parsed.completion_tokens if parsed.completion_tokens is not None else known
    unknown = [i for i, c in enumerate(counted) if c is None]
    if unknown:
        share, extra = divmod(max(total - known, 0), len(unknown))
        for j, i in enumerate(unknown):
            counted[i] = share + (1 if j < extra else 0)
    return [int(c or 0) for c in counted], total


def flatten_samples(samples: Any, where: str) -> list[Sample]:
    """The samples of a Sample or of (nested) sequences of Samples.

    Raises
    ------
    InvalidTypeError
        On anything else.
    """
    flat: list[Sample] = []
    stack: list[Any] = [samples]
    while stack:
        item = stack.pop()
        if isinstance(item, Sample):
            flat.append(item)
        elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
            stack.extend(item)
        else:
            raise param_error("samples", where, "Samples or (nested) sequences of Samples",
                              item, type_error=True)
    return flat


class Billing:
    """Per-sample billing records (prompt-token share, completion tokens), weakly keyed
    so that a record lives as long as its sample. Safe under threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: weakref.WeakKeyDictionary[Sample, tuple[float, int]] = (
            weakref.WeakKeyDictionary()
        )

    def record(self, sample: Sample, prompt_share: float, completion: int) -> None:
        """Remember what generating ``sample`` was billed."""
        with self._lock:
            self._records[sample] = (prompt_share, completion)

    def cost(self, samples: list[Sample], prices: tuple[float, float]) -> float:
        r"""Cost of ``samples`` at ``prices`` (per one million tokens).

        .. math::

            \text{cost} = \sum_s \frac{\text{prompt}_s \, P_\text{prompt}
                + \text{completion}_s \, P_\text{completion}}{10^6}

        Samples without a record are charged ``sample.prompt_tokens`` and
        ``sample.n_tokens``.
        """
        total = 0.0
        with self._lock:
            for sample in samples:
                record = self._records.get(sample)
                if record is None:
                    record = (float(sample.prompt_tokens or 0), sample.n_tokens)
                total += record[0] * prices[0] + record[1] * prices[1]
        return total / 1e6
