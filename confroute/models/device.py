"""The one place where ``device="auto"`` is resolved (torch is imported on call)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confroute._validation import param_error

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["check_available", "input_device", "mps_available", "resolve_device"]

_EXPECTED = "'auto' or a torch device string such as 'cpu' or 'cuda:0'"


def mps_available() -> bool:
    """Whether this torch build has Apple's Metal (MPS) back-end and it is usable."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return backend is not None and bool(backend.is_available())


def resolve_device(
    device: Any, owner: str, *, mps: bool = True, available: bool = True
) -> torch.device:
    """Turn ``"auto"``, a device string or a ``torch.device`` into a ``torch.device``.

    ``"auto"`` picks, in order: ``cuda`` when ``torch.cuda.is_available()``;
    ``mps`` when Apple's Metal back-end is available **and** the caller's model
    supports it (``mps=True``); else ``cpu``. Any other string is parsed by
    ``torch.device``.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"``, a device string (``"cpu"``, ``"cuda:0"``, ``"mps"``) or a device.
    owner : str
        Name of the class or function whose parameter this is (for error messages).
    mps : bool, default=True
        Whether ``"auto"`` may choose MPS. Callers whose computation has not been
        validated on MPS pass False and get CUDA or CPU, as before.
    available : bool, default=True
        Also check that a device named explicitly exists on this machine (see
        :func:`check_available`); False only parses it.

    Returns
    -------
    torch.device

    Raises
    ------
    InvalidTypeError
        If ``device`` is neither a string nor a ``torch.device``.
    InvalidParameterError
        If the string is not a device torch knows, or (``available=True``) the
        device does not exist here.
    """
    import torch

    if isinstance(device, torch.device):
        return check_available(device, owner) if available else device
    if not isinstance(device, str):
        raise param_error("device", owner, _EXPECTED, device, type_error=True)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps and mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise param_error("device", owner, _EXPECTED, device) from None
    return check_available(parsed, owner) if available else parsed


def check_available(device: torch.device, owner: str, name: str = "device") -> torch.device:
    """``device`` itself when this machine has it, else a typed error naming ``name``.

    Checked before anything is loaded: without it, a CUDA device on a CPU-only torch
    build fails deep inside torch with a bare ``AssertionError``.

    Raises
    ------
    InvalidParameterError
        If ``device`` is CUDA and torch has no usable CUDA device (or fewer than
        ``index + 1``), or MPS and Apple's Metal back-end is not available.
    """
    import torch

    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = ("this torch build has no CUDA support" if torch.version.cuda is None
                     else "no CUDA device is visible")
            raise param_error(name, owner, f"a device this machine has ({build}, torch "
                              f"{torch.__version__}): 'cpu' or 'auto'", str(device))
        if device.index is not None and device.index >= count:
            raise param_error(name, owner, f"a CUDA device index below {count} (the number "
                              "of visible CUDA devices)", str(device))
    elif device.type == "mps" and not mps_available():
        raise param_error(name, owner, "a device this machine has (MPS is not available "
                          "here): 'cpu' or 'auto'", str(device))
    return device


def input_device(model: Any) -> torch.device:
    """The device a loaded model's inputs go to, without moving anything.

    For a model dispatched over several devices by ``device_map`` (accelerate hooks,
    ``hf_device_map``), the execution device of its input embeddings -- the first
    device of the map, where the first layer runs; otherwise the device of its
    input-embedding weight (of its first parameter when it has none). A parameter
    offloaded to disk sits on the ``meta`` device and is skipped.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model (``get_input_embeddings``) or any module with parameters.

    Returns
    -------
    torch.device
    """
    import torch

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embed, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    weight = getattr(embed, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    device_map = getattr(model, "hf_device_map", None) or {}
    for value in device_map.values():
        if value not in ("disk", "meta"):
            return torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
