"""Turn pluggable parts (estimators, calibrators, policies, ...) into JSON specs and back.

A spec names a registered class (``kind`` + ``name``), its constructor
parameters and, for fitted parts, their learned state. Only registered classes
can be rebuilt, so a saved file can never make the loader run arbitrary code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from confroute._registry import Registry
from confroute.errors import SerializationError, describe

__all__ = ["PART_MODULES", "check_policy_state", "import_parts", "part_from_spec",
           "part_to_spec"]

#: The modules that register the classes of each kind of part (a kind's own module
#: first, then modules of higher layers that add classes to it, such as the query-router
#: estimator). Imported on demand here, above all of them, so no part module has to
#: import upwards to make its registry complete.
PART_MODULES: dict[str, tuple[str, ...]] = {
    "estimator": ("confroute.estimators", "confroute.predictive.routers"),
    "calibrator": ("confroute.calibration",),
    "policy": ("confroute.policies",),
    "equivalence": ("confroute.estimators.equivalence",),
    "query_router": ("confroute.predictive.routers",),
}


def import_parts(kind: str) -> None:
    """Import every module that registers classes of ``kind`` (see :data:`PART_MODULES`).

    Raises
    ------
    SerializationError
        ``kind`` is not a kind of part.
    """
    import importlib

    if kind not in PART_MODULES:
        raise SerializationError(
            f"Unknown kind of part {kind!r}. Valid kinds: {', '.join(sorted(PART_MODULES))}."
        )
    for module in PART_MODULES[kind]:
        importlib.import_module(module)


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


def _value_from_json(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        # Every numeric parameter check refuses NaN and infinities: refuse them at load.
        raise SerializationError(f"Saved parameter {where} is {value!r}; expected a finite value.")
    if isinstance(value, dict):
        if set(value) <= {"__seq__", "tuple"} and isinstance(value.get("__seq__"), list):
            items = [_value_from_json(v, f"{where}[{i}]") for i, v in enumerate(value["__seq__"])]
            return tuple(items) if value.get("tuple") is True else items
        if set(value) == {"__dict__"} and isinstance(value["__dict__"], dict):
            return {k: _value_from_json(v, f"{where}.{k}") for k, v in value["__dict__"].items()}
        if set(value) == {"__part__"}:
            return part_from_spec(value["__part__"])
        raise SerializationError(
            f"Unexpected object in saved parameter {where}: keys {sorted(value)[:10]}."
        )
    return value


def check_policy_state(state: Any, where: str) -> None:
    """Range-check a saved policy's learned state before it is restored.

    Every policy's learned values live on the probability scale (thresholds on
    ``p_good``, fractions, error bounds) or are counts, so, generically: each
    float and each array element must be finite and in [0, 1], each int >= 0.

    Raises
    ------
    SerializationError
        Naming the first bad key.
    """
    if not isinstance(state, dict):
        raise SerializationError(f"Saved state of {where} is not a mapping.")
    for key, value in state.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, int):
            ok = value >= 0
        elif isinstance(value, (float, np.ndarray)):
            arr = np.asarray(value)
            ok = arr.dtype.kind in "biuf" and bool(
                np.all(np.isfinite(arr)) and np.all((arr >= 0) & (arr <= 1))
            )
        else:
            ok = True  # left to the policy's own set_state checks
        if not ok:
            raise SerializationError(
                f"Saved state of {where} has {key!r} = {describe(value)}; a policy's learned "
                "values must be finite probabilities in [0, 1] or counts >= 0."
            )


def part_from_spec(spec: Any, expected_kind: str | None = None) -> Any:
    """Rebuild a registered part from :func:`part_to_spec`'s output, validating everything.

    Raises
    ------
    SerializationError
        Unknown class, parameters that do not fit, non-finite parameters, or an
        invalid learned state.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or not isinstance(
        spec.get("name"), str
    ):
        raise SerializationError("Malformed part in saved file: expected kind, name and params.")
    kind, name = spec["kind"], spec["name"]
    if expected_kind is not None and kind != expected_kind:
        raise SerializationError(f"Saved part is a {kind!r}, expected a {expected_kind!r}.")
    import_parts(kind)
    try:
        cls = Registry.for_kind(kind).get_class(name)
    except Exception as exc:
        raise SerializationError(f"Saved file names an unknown {kind} {name!r}: {exc}") from None
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise SerializationError(f"Saved parameters of {kind} {name!r} are not a mapping.")
    kwargs = {k: _value_from_json(v, f"{kind} {name!r}.{k}") for k, v in params.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"Saved parameters do not fit {kind} {name!r}: {exc}") from None
    if "state" in spec:
        if not hasattr(obj, "set_state"):
            raise SerializationError(f"Saved {kind} {name!r} has state but cannot take it.")
        if kind == "policy":
            check_policy_state(spec["state"], f"{kind} {name!r}")
        try:
            obj.set_state(spec["state"])
        except SerializationError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
            raise SerializationError(f"Saved state of {kind} {name!r} is invalid: {exc}") from None
    return obj
