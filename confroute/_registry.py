"""Name -> class resolution for pluggable parts (one registry per kind).

A user may pass either an object or a registered name; unknown names list the
valid ones. The registry is also the allow-list of classes that may be rebuilt
from a saved file, so loading never instantiates anything unregistered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from confroute.errors import InvalidParameterError, InvalidTypeError, describe

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Registry of the classes of one kind (estimators, calibrators, ...)."""

    _all: ClassVar[dict[str, Registry[Any]]] = {}

    def __init__(self, kind: str, base: type[T]) -> None:
        self.kind = kind
        self.base = base
        self._classes: dict[str, type[T]] = {}
        Registry._all[kind] = self

    @classmethod
    def for_kind(cls, kind: str) -> Registry[Any]:
        """The registry of ``kind`` (its defining module must have been imported).

        Loading a saved file imports the defining modules first
        (:func:`confroute._persist.import_parts`); this module imports none, so the
        parts' modules can import it without a circle.
        """
        try:
            return cls._all[kind]
        except KeyError:
            raise InvalidParameterError(
                f"Unknown kind of part {kind!r}. Known kinds: {', '.join(sorted(cls._all))}."
            ) from None

    @classmethod
    def find(cls, obj: Any) -> tuple[str, str] | None:
        """(kind, name) under which ``type(obj)`` is registered, or None."""
        for kind, reg in cls._all.items():
            for name, klass in reg._classes.items():
                if type(obj) is klass:
                    return kind, name
        return None

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} registered twice")
            self._classes[name] = cls
            cls._registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get_class(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise InvalidParameterError(
                f"Unknown {self.kind} {name!r}. Valid names: {', '.join(self.names())}."
            ) from None

    def resolve(self, obj: Any, param: str, owner: str, **kwargs: Any) -> T:
        """Return ``obj`` if it is an instance, or build the class registered as ``obj``."""
        if isinstance(obj, self.base):
            return obj
        if isinstance(obj, str):
            return self._build(obj, param, owner, kwargs)
        raise InvalidTypeError(
            f"The '{param}' parameter of {owner} must be a {self.base.__name__} or one of "
            f"{', '.join(repr(n) for n in self.names())}. Got {describe(obj)}."
        )

    def _build(self, name: str, param: str, owner: str, kwargs: dict[str, Any]) -> T:
        """Instantiate the class registered as ``name``; a missing argument is a typed error."""
        import inspect

        cls = self.get_class(name)
        try:
            bound = inspect.signature(cls).bind_partial(**kwargs)
        except TypeError:  # unknown keyword: let the constructor say which
            return cls(**kwargs)
        missing = [
            p.name for p in inspect.signature(cls).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name not in bound.arguments
        ]
        if missing:
            args = ", ".join(f"{m}=..." for m in missing)
            raise InvalidParameterError(
                f"The '{param}' parameter of {owner} names {self.kind} {name!r}, which needs "
                f"the argument(s) {', '.join(repr(m) for m in missing)}; a name alone cannot "
                f"provide them. Pass an instance instead, e.g. "
                f"{param}={cls.__name__}({args}). Got {name!r}."
            )
        return cls(**kwargs)

    def name_of(self, obj: Any) -> str:
        for name, cls in self._classes.items():
            if type(obj) is cls:
                return name
        raise InvalidTypeError(
            f"{type(obj).__name__} is not a registered {self.kind}; register it with "
            f"@{self.kind}_registry.register('name') to save it."
        )
