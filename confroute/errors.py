"""Exception hierarchy of confroute.

Every error raised on purpose by the library is a :class:`ConfrouteError`. Each
subclass also derives from the built-in exception a Python user would expect
(``ValueError`` for bad values, ``TypeError`` for bad types, ...), so
``except ValueError`` keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
    "redact",
    "url_secrets",
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


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&](?:api[_-]?key|key|token|access[_-]?token|secret|password|sig)=)[^&#\s]*",
    re.IGNORECASE,
)


def url_secrets(url: Any) -> list[str]:
    """The secret parts of a URL: its user, password and secret-looking query values.

    Parameters
    ----------
    url : str
        Any URL (anything else gives an empty list).

    Returns
    -------
    list of str
        Non-empty strings to pass to :func:`redact`, percent-decoded and raw.
    """
    from urllib.parse import parse_qsl, unquote, urlsplit

    if not isinstance(url, str):
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    raw_userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    found = [p for p in raw_userinfo.split(":") if p]
    found += [unquote(p) for p in list(found)]
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if _SECRET_QUERY.match(f"?{name}=") and value:
            found.append(value)
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret replaced by ``***``.

    Removes each string of ``secrets`` (API keys, header values; ``None`` and
    empty strings are skipped), the user information of every URL
    (``http://user:KEY@host`` becomes ``http://***@host``) and the value of
    secret-looking query parameters (``?api_key=``, ``token``, ...). It is the
    one helper used wherever a string may leave the process: error messages,
    logs, served bodies, reprs.

    Parameters
    ----------
    text : str
    secrets : iterable of str or None

    Returns
    -------
    str
    """
    text = str(text)
    for secret in sorted((s for s in secrets if isinstance(s, str) and s), key=len,
                         reverse=True):
        text = text.replace(secret, "***")
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    return _SECRET_QUERY.sub(lambda m: m.group("name") + "***", text)
