"""The one place where ``device="auto"`` is resolved (torch is imported on call)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from confroute._validation import param_error

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["mps_available", "resolve_device"]

_EXPECTED = "'auto' or a torch device string such as 'cpu' or 'cuda:0'"


def mps_available() -> bool:
    """Whether this torch build has Apple's Metal (MPS) back-end and it is usable."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return backend is not None and bool(backend.is_available())


def resolve_device(device: Any, owner: str, *, mps: bool = True) -> torch.device:
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

    Returns
    -------
    torch.device

    Raises
    ------
    InvalidTypeError
        If ``device`` is neither a string nor a ``torch.device``.
    InvalidParameterError
        If the string is not a device torch knows.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise param_error("device", owner, _EXPECTED, device, type_error=True)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps and mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise param_error("device", owner, _EXPECTED, device) from None
