"""Scikit-learn glue: every configurable confroute part is a ``BaseEstimator``.

Constructors store their keyword arguments unchanged; ``get_params`` reads them
back by the constructor's signature, so :func:`sklearn.base.clone`, ``Pipeline``
and ``GridSearchCV`` work. Importing this module imports scikit-learn, so only
modules that define estimators (calibration, policies, estimators, predictive,
models) import it; ``import confroute`` and the CLI parser do not.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from confroute.errors import InvalidParameterError, NotFittedError, SerializationError, describe

__all__ = ["ParamCheck", "ParamsMixin", "read_state", "validate_params"]


ParamCheck = Callable[[Any, str, str], Any]
"""A parameter check ``(value, name, owner) -> validated value``; raises a typed error."""


def validate_params(obj: Any, table: Mapping[str, ParamCheck]) -> dict[str, Any]:
    """Run the declared parameter table of ``obj`` and return the validated values."""
    owner = type(obj).__name__
    return {name: check(getattr(obj, name), name, owner) for name, check in table.items()}


def read_state(
    state: Any, spec: Mapping[str, str], owner: str
) -> dict[str, Any]:
    """Check a ``get_state`` dict against ``spec`` (key -> kind).

    Kinds: ``"float"`` (finite), ``"unit"`` (finite, in [0, 1]), ``"int"`` (a count,
    >= 0), ``"bool"``, ``"array"`` (1-D, finite) and ``"unit_array"`` (1-D, in [0, 1]).
    Parts call it from ``set_state``; their own cross-checks (monotone knots,
    positive scales...) run afterwards.

    Raises :class:`~confroute.errors.SerializationError` naming the bad key, since a
    bad state almost always comes from a corrupted or foreign save file.
    """
    if not isinstance(state, Mapping):
        raise SerializationError(
            f"The 'state' parameter of {owner}.set_state must be a dict. "
            f"Got {type(state).__name__}."
        )
    out: dict[str, Any] = {}
    for key, kind in spec.items():
        if key not in state:
            raise SerializationError(
                f"The 'state' parameter of {owner}.set_state is missing the key {key!r}."
            )
        try:
            out[key] = _state_value(state[key], kind)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"The 'state' parameter of {owner}.set_state has a bad value for {key!r}: "
                f"expected {_STATE_KINDS[kind]}, got {_describe_state(state[key])} ({exc})."
            ) from None
    return out


_STATE_KINDS = {
    "float": "a finite float", "unit": "a float in [0, 1]", "int": "an int >= 0",
    "bool": "a bool", "array": "a 1-D array of finite floats",
    "unit_array": "a 1-D array of floats in [0, 1]",
}


def _describe_state(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return describe(value)


def _state_value(value: Any, kind: str) -> Any:
    """One state value converted to ``kind``; raises ValueError/TypeError when it does not fit."""
    if kind in ("array", "unit_array"):
        if isinstance(value, (str, bytes, Mapping)):
            raise TypeError("not an array")
        arr = np.array(value, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError("not 1-D")
        if not np.isfinite(arr).all():
            raise ValueError("non-finite values")
        if kind == "unit_array" and ((arr < 0) | (arr > 1)).any():
            raise ValueError("values outside [0, 1]")
        return arr
    if kind in ("float", "unit"):
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)):
            raise TypeError("not a number")
        v = float(value)
        if not np.isfinite(v) or (kind == "unit" and not 0.0 <= v <= 1.0):
            raise ValueError("out of range")
        return v
    if kind == "int":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise TypeError("not an int")
        if not np.isfinite(value) or int(value) != value or value < 0:
            raise ValueError("not a count")
        return int(value)
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError("not a bool")
        return bool(value)
    raise AssertionError(kind)  # pragma: no cover - programming error in a spec table


class ParamsMixin(BaseEstimator):
    """A scikit-learn ``BaseEstimator`` with confroute's typed errors and short repr.

    ``get_params`` / ``set_params`` / ``__repr__`` come from the ``__init__``
    signature; an unknown parameter raises :class:`~confroute.errors.InvalidParameterError`
    (a ``ValueError``, as scikit-learn raises). :func:`sklearn.utils.validation.check_is_fitted`
    asks the object's own ``_check_fitted`` when it has one (so a policy that needs
    no fit counts as fitted), and otherwise looks for learned attributes ending in ``_``.
    """

    def __sklearn_is_fitted__(self) -> bool:
        check = getattr(self, "_check_fitted", None)
        if check is None:
            return any(k.endswith("_") and not k.startswith("__") for k in vars(self))
        try:
            check()
        except NotFittedError:
            return False
        return True

    @classmethod
    def _param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__:
            return []
        sig = inspect.signature(init)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._param_names():
            value = getattr(self, name)
            out[name] = value
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                for k, v in value.get_params(deep=True).items():
                    out[f"{name}__{k}"] = v
        return out

    def set_params(self, **params: Any) -> ParamsMixin:
        valid = set(self._param_names())
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            head, _, tail = key.partition("__")
            if head not in valid:
                raise InvalidParameterError(
                    f"Invalid parameter {head!r} for {type(self).__name__}. "
                    f"Valid parameters: {', '.join(sorted(valid))}."
                )
            if tail:
                nested.setdefault(head, {})[tail] = value
            else:
                setattr(self, head, value)
        for head, sub in nested.items():
            getattr(self, head).set_params(**sub)
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        parts = []
        for name in self._param_names():
            value = getattr(self, name, None)
            default = sig.parameters[name].default
            try:
                same = bool(value == default)
            except Exception:  # arrays and other odd types: always show
                same = False
            if not same:
                parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"
