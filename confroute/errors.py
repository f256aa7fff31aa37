"""Exception hierarchy of confroute.

Every error raised on purpose by the library is a :class:`ConfrouteError`. Each
subclass also derives from the built-in exception a Python user would expect
(``ValueError`` for bad values, ``TypeError`` for bad types, ...), so
``except ValueError`` keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CloudError",
    "ConfigError",
    "ConfrouteError",
    "EstimationError",
    "InvalidParameterError",
    "InvalidTypeError",
    "LedgerUnavailableError",
    "MissingDependencyError",
    "ModelLoadError",
    "NotFittedError",
    "SerializationError",
]


class ConfrouteError(Exception):
    """Base class of every error raised on purpose by confroute."""


class InvalidParameterError(ConfrouteError, ValueError):
    """A parameter or input has a value outside what is accepted."""


class ConfigError(InvalidParameterError):
    """A configuration file (``confroute.toml``) has a bad, unknown or missing key.

    The message names the key path (e.g. ``clouds[1].timeout``) and never echoes
    a value that may be a secret.
    """


class InvalidTypeError(ConfrouteError, TypeError):
    """A parameter or input has the wrong type."""


class NotFittedError(ConfrouteError, ValueError, AttributeError):
    """An object that must be fitted first was used before ``fit``.

    Every instance is also a :class:`sklearn.exceptions.NotFittedError` when
    scikit-learn is installed, so ``except sklearn.exceptions.NotFittedError``
    catches it. To keep ``import confroute`` free of scikit-learn, the class
    itself does not derive from scikit-learn's: calling ``NotFittedError(...)``
    (or a subclass) builds an instance of a same-named subclass that derives from
    both, created on first use (scikit-learn is imported then, on an error path
    only). Instances pickle back to the same hybrid.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> NotFittedError:
        return super().__new__(_with_sklearn_base(cls), *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        plain = type(self).__dict__.get("_confroute_class", type(self))
        return (plain, self.args, self.__dict__ or None)


_HYBRIDS: dict[type, type] = {}


def _with_sklearn_base(cls: type[NotFittedError]) -> type[NotFittedError]:
    """``cls``, or its cached subclass that also derives from sklearn's NotFittedError."""
    hybrid = _HYBRIDS.get(cls)
    if hybrid is not None:
        return hybrid
    try:
        from sklearn.exceptions import NotFittedError as SklearnNotFittedError
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        return cls
    if issubclass(cls, SklearnNotFittedError):
        return cls
    hybrid = type(cls.__name__, (cls, SklearnNotFittedError), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_confroute_class": cls,
    })
    _HYBRIDS[cls] = hybrid
    return hybrid


class ModelLoadError(ConfrouteError, RuntimeError):
    """A model could not be located or loaded."""


class MissingDependencyError(ConfrouteError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""


class SerializationError(ConfrouteError, ValueError):
    """A saved file is corrupted, truncated, tampered with or of an unknown version."""


class LedgerUnavailableError(ConfrouteError, ConnectionError):
    """A shared budget ledger's store (Redis) cannot be reached when it must be."""


class EstimationError(ConfrouteError, RuntimeError):
    """An uncertainty estimate could not be computed from what was given."""


class CloudError(ConfrouteError, RuntimeError):
    """A call to a remote (cloud) model failed after its retries.

    Attributes
    ----------
    reason : str
        Short machine-readable reason (``"timeout"``, ``"http_500"``, ...).
    status : int or None
        HTTP status of the last attempt, if any.
    attempts : int
        How many attempts were made.
    """

    def __init__(
        self, message: str, *, reason: str = "error", status: int | None = None, attempts: int = 1
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.attempts = attempts


def describe(value: Any) -> str:
    """Short, safe description of a received value for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(value).__name__})" if not isinstance(value, (int, float)) else text
