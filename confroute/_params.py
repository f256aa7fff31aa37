"""Scikit-learn glue: every configurable confroute part is a ``BaseEstimator``.

Constructors store their keyword arguments unchanged; ``get_params`` reads them
back by the constructor's signature, so :func:`sklearn.base.clone`, ``Pipeline``
and ``GridSearchCV`` work. Importing this module imports scikit-learn, so only
modules that define estimators (calibration, policies, estimators, predictive,
models) import it; ``import confroute`` and the CLI parser do not.
"""

from __future__ import annotations

import inspect
from typing import Any

from sklearn.base import BaseEstimator

from confroute.errors import InvalidParameterError, NotFittedError

__all__ = ["ParamsMixin"]


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
