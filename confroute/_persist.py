"""Turn pluggable parts (estimators, calibrators, policies, ...) into JSON specs and back.

A spec names a registered class (``kind`` + ``name``), its constructor
parameters and, for fitted parts, their learned state. Only registered classes
can be rebuilt, so a saved file can never make the loader run arbitrary code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from confroute._registry import Registry
from confroute.errors import SerializationError

__all__ = ["part_from_spec", "part_to_spec"]


def part_to_spec(obj: Any, where: str = "part") -> dict[str, Any]:
    found = Registry.find(obj)
    if found is None:
        raise SerializationError(
            f"Cannot save {where}: {type(obj).__name__} is not a registered class. Register it "
            f"with the registry of its kind (e.g. @estimator_registry.register('my_name'))."
        )
    kind, name = found
    params = obj.get_params(deep=False)
    spec: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "params": {k: _value_to_json(v, f"{where}.{k}") for k, v in params.items()},
    }
    if hasattr(obj, "get_state"):
        state = obj.get_state()
        if state is not None:
            spec["state"] = state
    return spec


def _value_to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float, np.ndarray, np.generic)):
        return value
    if isinstance(value, (list, tuple)):
        return {"__seq__": [_value_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if isinstance(value, dict):
        return {"__dict__": {str(k): _value_to_json(v, f"{where}.{k}") for k, v in value.items()}}
    if Registry.find(value) is not None:
        return {"__part__": part_to_spec(value, where)}
    raise SerializationError(
        f"Cannot save {where}: a value of type {type(value).__name__} is neither plain data nor "
        f"a registered part. Pass it again when loading instead."
    )


def _value_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__seq__" in value:
            items = [_value_from_json(v) for v in value["__seq__"]]
            return tuple(items) if value.get("tuple") else items
        if "__dict__" in value:
            return {k: _value_from_json(v) for k, v in value["__dict__"].items()}
        if "__part__" in value:
            return part_from_spec(value["__part__"])
        raise SerializationError(f"Unexpected object in saved parameters: keys {sorted(value)}.")
    return value


def part_from_spec(spec: Any, expected_kind: str | None = None) -> Any:
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or not isinstance(
        spec.get("name"), str
    ):
        raise SerializationError("Malformed part in saved file: expected kind, name and params.")
    kind, name = spec["kind"], spec["name"]
    if expected_kind is not None and kind != expected_kind:
        raise SerializationError(f"Saved part is a {kind!r}, expected a {expected_kind!r}.")
    try:
        cls = Registry.for_kind(kind).get_class(name)
    except Exception as exc:
        raise SerializationError(f"Saved file names an unknown {kind} {name!r}: {exc}") from None
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise SerializationError(f"Saved parameters of {kind} {name!r} are not a mapping.")
    kwargs = {k: _value_from_json(v) for k, v in params.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise SerializationError(f"Saved parameters do not fit {kind} {name!r}: {exc}") from None
    if "state" in spec:
        if not hasattr(obj, "set_state"):
            raise SerializationError(f"Saved {kind} {name!r} has state but cannot take it.")
        try:
            obj.set_state(spec["state"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(f"Saved state of {kind} {name!r} is invalid: {exc}") from None
    return obj
