"""Input validation shared by every public entry point.

Messages follow one pattern: ``The 'name' parameter of Owner must be EXPECTED. Got VALUE.``
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, overload

import numpy as np

from confroute.errors import InvalidParameterError, InvalidTypeError, describe, redact

__all__ = [
    "check_array",
    "check_bool",
    "check_choice",
    "check_existing_dir",
    "check_float",
    "check_http_url",
    "check_int",
    "check_labels",
    "check_path",
    "check_path_within",
    "check_prompts",
    "check_same_length",
    "has_control_chars",
    "param_error",
]

# The prompt aliases live here, below confroute.types (which re-exports them), so
# that types.py can use these checks without an import circle.
Message = Mapping[str, str]
"""A chat message: ``{"role": "user" | "assistant" | "system", "content": str}``."""

Prompt = Union[str, Sequence[Message]]  # noqa: UP007 - a runtime alias on Python 3.10
"""A prompt: a plain user string, or a whole chat conversation."""


def param_error(
    name: str, owner: str, expected: str, got: Any, *, type_error: bool = False
) -> InvalidParameterError | InvalidTypeError:
    """Build the standard error for a bad parameter (the caller raises it)."""
    msg = f"The '{name}' parameter of {owner} must be {expected}. Got {describe(got)}."
    return InvalidTypeError(msg) if type_error else InvalidParameterError(msg)


@overload
def check_int(
    value: Any,
    name: str,
    owner: str,
    *,
    min_value: int | None = ...,
    max_value: int | None = ...,
    allow_none: Literal[False] = ...,
) -> int: ...


@overload
def check_int(
    value: Any,
    name: str,
    owner: str,
    *,
    min_value: int | None = ...,
    max_value: int | None = ...,
    allow_none: bool,
) -> int | None: ...


def check_int(
    value: Any,
    name: str,
    owner: str,
    *,
    min_value: int | None = None,
    max_value: int | None = None,
    allow_none: bool = False,
) -> int | None:
    if value is None and allow_none:
        return None
    bounds = _bounds_text(min_value, max_value)
    expected = f"an int{bounds}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise param_error(name, owner, expected, value, type_error=True)
    v = int(value)
    if (min_value is not None and v < min_value) or (max_value is not None and v > max_value):
        raise param_error(name, owner, expected, value)
    return v


@overload
def check_float(
    value: Any,
    name: str,
    owner: str,
    *,
    min_value: float | None = ...,
    max_value: float | None = ...,
    min_inclusive: bool = ...,
    max_inclusive: bool = ...,
    allow_none: Literal[False] = ...,
) -> float: ...


@overload
def check_float(
    value: Any,
    name: str,
    owner: str,
    *,
    min_value: float | None = ...,
    max_value: float | None = ...,
    min_inclusive: bool = ...,
    max_inclusive: bool = ...,
    allow_none: bool,
) -> float | None: ...


def check_float(
    value: Any,
    name: str,
    owner: str,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
    if value is None and allow_none:
        return None
    lo = "[" if min_inclusive else "("
    hi = "]" if max_inclusive else ")"
    if min_value is not None or max_value is not None:
        a = "-inf" if min_value is None else f"{min_value:g}"
        b = "inf" if max_value is None else f"{max_value:g}"
        expected = f"a float in {lo}{a}, {b}{hi}"
    else:
        expected = "a finite float"
    if allow_none:
        expected += " or None"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise param_error(name, owner, expected, value, type_error=True)
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise param_error(name, owner, expected, value)
    if min_value is not None and (v < min_value or (not min_inclusive and v == min_value)):
        raise param_error(name, owner, expected, value)
    if max_value is not None and (v > max_value or (not max_inclusive and v == max_value)):
        raise param_error(name, owner, expected, value)
    return v


def check_bool(value: Any, name: str, owner: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise param_error(name, owner, "a bool", value, type_error=True)
    return bool(value)


def check_choice(value: Any, name: str, owner: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        expected = "one of " + ", ".join(repr(c) for c in choices)
        raise param_error(name, owner, expected, value, type_error=not isinstance(value, str))
    return value


def has_control_chars(value: str) -> bool:
    """True if ``value`` holds whitespace or a control character (CR, LF, NUL, DEL, ...)."""
    return any(ord(c) < 0x21 or 0x7F <= ord(c) < 0xA0 for c in value)


def check_http_url(value: Any, name: str, owner: str) -> str:
    """An ``http://`` or ``https://`` URL with a host and no whitespace or control character.

    CR, LF and other control characters are refused here, at construction, so
    they can never reach an HTTP request line or header. The received value is
    shown redacted (:func:`confroute.errors.redact`): a URL may carry a key.
    """
    expected = "an http:// or https:// URL with a host and no whitespace or control characters"
    if not isinstance(value, str):
        raise param_error(name, owner, expected, value, type_error=True)
    from urllib.parse import urlsplit

    shown = redact(value)
    bad = has_control_chars(value)
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        ok = False
    if bad or not ok:
        raise param_error(name, owner, expected, shown)
    return value


def _bounds_text(min_value: float | None, max_value: float | None) -> str:
    if min_value is not None and max_value is not None:
        return f" in [{min_value}, {max_value}]"
    if min_value is not None:
        return f" >= {min_value}"
    if max_value is not None:
        return f" <= {max_value}"
    return ""


def check_prompts(prompts: Any, owner: str, name: str = "prompts") -> list[Prompt]:
    """Validate a batch of prompts.

    A prompt is a non-empty string or a non-empty chat conversation: a sequence of
    mappings with string ``role`` and ``content`` keys. A single prompt (str or
    conversation) is *not* accepted where a batch is expected, to avoid iterating
    over characters by accident.
    """
    if isinstance(prompts, (str, bytes)):
        raise param_error(
            name, owner, "a list of prompts (wrap a single prompt in a list)", prompts,
            type_error=True,
        )
    if isinstance(prompts, Mapping) or not isinstance(prompts, Sequence):
        try:
            prompts = list(prompts)
        except TypeError:
            raise param_error(name, owner, "a list of prompts", prompts, type_error=True) from None
    if len(prompts) == 0:
        raise param_error(name, owner, "a non-empty list of prompts", prompts)
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        out.append(check_prompt(p, f"{name}[{i}]", owner))
    return out


def check_prompt(prompt: Any, name: str, owner: str) -> Prompt:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise param_error(name, owner, "a non-empty string", prompt)
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        if len(prompt) == 0:
            raise param_error(name, owner, "a non-empty string or conversation", prompt)
        msgs = []
        for j, m in enumerate(prompt):
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise param_error(
                    f"{name}[{j}]", owner,
                    "a message mapping with string 'role' and 'content'", m, type_error=True,
                )
            msgs.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in msgs):
            raise param_error(name, owner, "a conversation with some non-empty content", prompt)
        return tuple(msgs)
    raise param_error(name, owner, "a string or a list of chat messages", prompt, type_error=True)


def check_array(
    values: Any,
    name: str,
    owner: str,
    *,
    ndim: int | tuple[int, ...] = 1,
    allow_nan: bool = False,
    allow_empty: bool = False,
    dtype: Any = float,
) -> np.ndarray:
    """Convert to a numpy array and check dimension and finiteness."""
    try:
        arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        raise param_error(name, owner, "array-like of numbers", values, type_error=True) from None
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be a {expected} array. "
            f"Got an array of shape {arr.shape}."
        )
    if not allow_empty and arr.size == 0:
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be non-empty. Got an empty array."
        )
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) if not allow_nan else np.isinf(arr)
        if bad.any():
            what = "finite values" if not allow_nan else "values that are finite or NaN"
            idx = int(np.flatnonzero(bad.ravel())[0])
            raise InvalidParameterError(
                f"The '{name}' parameter of {owner} must contain only {what}. "
                f"Got {arr.ravel()[idx]!r} at flat index {idx}."
            )
    return arr


def check_labels(labels: Any, name: str, owner: str, *, require_both: bool = True) -> np.ndarray:
    """Binary labels (1 = edge answer good) as an int array."""
    arr = check_array(labels, name, owner, dtype=float)
    if not np.isin(arr, (0.0, 1.0)).all():
        bad = arr[~np.isin(arr, (0.0, 1.0))][0]
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must contain only 0/1 (or bool) labels. "
            f"Got {bad!r}."
        )
    out = arr.astype(np.int64)
    if require_both and len(np.unique(out)) < 2:
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must contain both classes (some good and some "
            f"bad edge answers) to fit. Got only class {int(out[0])} in {len(out)} labels."
        )
    return out


def check_same_length(owner: str, **arrays: Any) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"'{k}' has {n}" for k, n in lengths.items())
        raise InvalidParameterError(f"The inputs of {owner} must have the same length: {desc}.")
    return next(iter(lengths.values()))


def check_path(value: Any, owner: str, name: str = "path") -> Path:
    """A file path argument: a non-empty str or path-like that is not a directory."""
    fs = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(fs, str):
        raise param_error(name, owner, "a str or path-like file path", value, type_error=True)
    if not fs or "\x00" in fs:
        raise param_error(name, owner, "a non-empty file path without NUL characters", value)
    p = Path(fs)
    if p.is_dir():
        raise param_error(name, owner, "a file path, not a directory", fs)
    return p


def check_path_within(value: Any, base: Any, name: str, owner: str) -> Path:
    """A relative file name that stays inside the folder ``base`` once resolved.

    Symbolic links and ``..`` components are resolved first, so neither can
    lead outside ``base``. Returns the resolved path.
    """
    if not isinstance(value, str) or not value or "\x00" in value:
        raise param_error(name, owner, "a non-empty file name", value,
                          type_error=not isinstance(value, str))
    root = Path(base).resolve()
    target = (root / value).resolve()
    if not target.is_relative_to(root) or target == root:
        raise param_error(name, owner, f"a file inside the model folder {str(root)!r}", value)
    return target


def check_existing_dir(value: Any, name: str, owner: str) -> Path:
    """A path-like naming an existing directory; ``..`` and links are resolved first."""
    fs = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(fs, str) or not fs or "\x00" in fs:
        raise param_error(name, owner, "a path to an existing directory", value,
                          type_error=not isinstance(fs, str))
    resolved = Path(fs).expanduser().resolve()
    if not resolved.is_dir():
        raise param_error(name, owner, "a path to an existing directory", fs)
    return resolved
