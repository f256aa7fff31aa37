"""Loading for :class:`~confroute.models.hf.HFLanguageModel`: the causal LM and its
tokenizer as users load them.

A path or hub id is loaded with ``AutoModelForCausalLM.from_pretrained`` and the
caller's own ``from_pretrained`` arguments (``device_map``, ``quantization_config``,
``attn_implementation``, ``revision``, ``trust_remote_code``...), checked first so
that a bad one fails before any weight is read. A model object the caller already
loaded is used as it is: never moved to another device, never cast (a sharded or
quantised model would break, and ``.to`` would change the caller's own object).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confroute._validation import check_bool, check_path_within, param_error
from confroute.errors import MissingDependencyError, ModelLoadError
from confroute.models.device import check_available, input_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "check_from_pretrained_kwargs",
    "default_dtype",
    "load_model",
    "load_tokenizer",
    "target_device",
]

_OWNER = "HFLanguageModel"
# What the tokenizer shares with the model when both come from the same place.
_TOKENIZER_KEYS = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _map_device(value: Any, name: str) -> torch.device | None:
    """The device one ``device_map`` entry names (None for ``"disk"``), checked."""
    import torch

    if isinstance(value, str) and value in ("disk", "meta"):
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except (RuntimeError, TypeError, ValueError):
        raise param_error(name, _OWNER, "a device map: a strategy "
                          f"{_MAP_STRATEGIES}, a device, or a dict of module name to device "
                          "(a GPU index, 'cpu', 'cuda:1', 'disk')", value) from None
    return check_available(device, _OWNER, name)


def target_device(device: torch.device, device_map: Any) -> torch.device:
    """Where the weights mostly go: the first accelerator ``device_map`` names
    (CUDA for a strategy such as ``"auto"`` when CUDA is available), else ``device``."""
    import torch

    if device_map is None:
        return device
    if isinstance(device_map, str) and device_map in _MAP_STRATEGIES:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    values = device_map.values() if isinstance(device_map, Mapping) else [device_map]
    devices = [d for d in (_map_device(v, "device_map") for v in values) if d is not None]
    for d in devices:
        if d.type != "cpu":
            return d
    return torch.device("cpu")


def default_dtype(device: torch.device) -> Any:
    """float32 on CPU; bfloat16 on CUDA (float16 where the GPU has no bfloat16);
    elsewhere the checkpoint's own dtype (``"auto"``)."""
    import torch

    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "auto"


def check_from_pretrained_kwargs(
    kwargs: dict[str, Any], *, is_object: bool, device_is_auto: bool
) -> dict[str, Any]:
    """Check the ``from_pretrained`` arguments before anything is loaded.

    Returns
    -------
    dict
        The arguments, with ``trust_remote_code=False`` and ``local_files_only=True``
        unless the caller set them.

    Raises
    ------
    InvalidParameterError, InvalidTypeError
        Naming the argument: given with a model object; ``device_map`` together
        with an explicit ``device``; a device the machine does not have; a value of
        the wrong type.
    MissingDependencyError
        A bitsandbytes ``quantization_config`` without bitsandbytes installed.
    """
    if is_object and kwargs:
        key = sorted(kwargs)[0]
        raise param_error(key, _OWNER, "omitted when 'model' is a loaded model object "
                          "(from_pretrained arguments apply to a path or hub id only)",
                          kwargs[key])
    out = dict(kwargs)
    if "torch_dtype" in out:
        raise param_error("torch_dtype", _OWNER, "omitted (use 'dtype')", out["torch_dtype"])
    device_map = out.get("device_map")
    if device_map is not None:
        if not device_is_auto:
            raise param_error("device", _OWNER, "'auto' when 'device_map' is given (the "
                              "map places the weights)", "an explicit device")
        if isinstance(device_map, Mapping):
            for module, value in device_map.items():
                _map_device(value, f"device_map[{module!r}]")
        elif not (isinstance(device_map, str) and device_map in _MAP_STRATEGIES):
            _map_device(device_map, "device_map")
    for key in ("attn_implementation", "revision", "cache_dir", "offload_folder"):
        if out.get(key) is not None and not isinstance(out[key], (str, Path)):
            raise param_error(key, _OWNER, "a string or None", out[key], type_error=True)
    out["trust_remote_code"] = check_bool(out.get("trust_remote_code", False),
                                          "trust_remote_code", _OWNER)
    out["local_files_only"] = check_bool(out.get("local_files_only", True),
                                         "local_files_only", _OWNER)
    _check_quantization(out.get("quantization_config"))
    return out


def _check_quantization(config: Any) -> None:
    if config is None:
        return
    if isinstance(config, Mapping):
        method = config.get("quant_method", "bitsandbytes" if (
            config.get("load_in_8bit") or config.get("load_in_4bit")) else None)
    elif hasattr(config, "quant_method"):
        method = str(getattr(config.quant_method, "value", config.quant_method))
    else:
        raise param_error("quantization_config", _OWNER, "a transformers quantization config "
                          "(e.g. BitsAndBytesConfig) or a dict", config, type_error=True)
    if method == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "The 'quantization_config' parameter of HFLanguageModel asks for bitsandbytes "
                "8-bit/4-bit weights, and bitsandbytes is not installed: "
                "pip install 'confroute[quantization]' (or pip install bitsandbytes)."
            ) from None


def _check_source(source: str, kwargs: dict[str, Any]) -> None:
    """A typed error, before loading, for a missing folder or an uncached hub id."""
    if Path(source).expanduser().exists():
        return
    if not _HUB_ID.match(source) or source.startswith((".", "~")):
        raise ModelLoadError(
            f"Could not load a causal LM from {source!r} (local files only): no such "
            "directory, and it is not a Hugging Face Hub id ('org/name')."
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not (kwargs["local_files_only"] or offline):
        return
    from huggingface_hub import try_to_load_from_cache

    filename = str(kwargs.get("gguf_file") or "config.json")
    cached = try_to_load_from_cache(source, filename, cache_dir=kwargs.get("cache_dir"),
                                    revision=kwargs.get("revision"))
    if isinstance(cached, str):
        return
    why = ("HF_HUB_OFFLINE=1 is set" if offline
           else "downloads are off (local_files_only=True, the default)")
    raise ModelLoadError(
        f"The 'model' parameter of HFLanguageModel names the Hugging Face Hub id {source!r}, "
        f"which is not in the local cache, and {why}. To fix: download it once with "
        f"`hf download {source}` on a machine with network access (or pass "
        "local_files_only=False to HFLanguageModel and leave HF_HUB_OFFLINE unset), or "
        "pass the local folder that holds the model."
    )


def load_model(
    model: Any, device: torch.device, dtype: torch.dtype | None, gguf_file: Any,
    kwargs: dict[str, Any],
) -> tuple[Any, str | None]:
    """The causal LM in eval mode, and the path or hub id it was loaded from.

    A path or hub id is loaded with ``kwargs`` (checked by
    :func:`check_from_pretrained_kwargs`) straight onto ``device``, or where
    ``kwargs["device_map"]`` places it. A model object is returned as it is.
    """
    import torch

    if isinstance(model, (str, Path)):
        return _from_pretrained(str(model), device, dtype, gguf_file, kwargs), str(model)
    if isinstance(model, torch.nn.Module) and hasattr(model, "generate"):
        if dtype is not None and getattr(model, "dtype", dtype) != dtype:
            raise param_error("dtype", _OWNER, f"None or the given model's own dtype "
                              f"({model.dtype}): a loaded model object is never cast; cast "
                              "it before passing it", dtype)
        model.eval()
        return model, None
    raise param_error("model", _OWNER, "a transformers causal LM, a local path or a hub id",
                      model, type_error=True)


def _from_pretrained(
    source: str, device: torch.device, dtype: torch.dtype | None, gguf_file: Any,
    kwargs: dict[str, Any],
) -> Any:
    if gguf_file is not None:
        # resolved (links, "..") and refused when it leaves the model folder
        check_path_within(gguf_file, source, "gguf_file", _OWNER)
    _check_source(source, {**kwargs, "gguf_file": gguf_file})
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    load = dict(kwargs)
    if gguf_file is not None:
        load["gguf_file"] = gguf_file
    elif load.get("device_map") is None:
        load["device_map"] = {"": str(device)}  # straight onto the device, no CPU copy
    load["dtype"] = dtype if dtype is not None else default_dtype(
        target_device(device, load.get("device_map")))
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(source, **load)
    except ImportError as exc:
        raise MissingDependencyError(f"Loading {source!r} with {sorted(kwargs)} needs a "
                                     f"package that is not installed: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        # SafetensorError: a truncated or corrupted weights file
        raise ModelLoadError(
            f"The 'model' parameter of HFLanguageModel: could not load a causal LM from "
            f"{source!r} (local files only unless local_files_only=False): {exc}"
        ) from exc
    if gguf_file is not None and input_device(loaded) != device:
        loaded = loaded.to(device)  # our own freshly loaded object
    loaded.eval()
    return loaded


def load_tokenizer(
    tokenizer: Any, source: str | None, model: Any, gguf_file: Any, kwargs: dict[str, Any]
) -> Any:
    """The tokenizer object, or loaded from ``tokenizer``, ``source`` or the model's config."""
    if tokenizer is None:
        if source is None:
            cfg_path = getattr(getattr(model, "config", None), "_name_or_path", "")
            if cfg_path and Path(cfg_path).is_dir():
                source = cfg_path
            else:
                raise param_error(
                    "tokenizer", _OWNER,
                    "given when 'model' is an object not loaded from a local directory",
                    tokenizer,
                )
        tokenizer = source
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        load: dict[str, Any] = {"local_files_only": True}
        load.update({k: kwargs[k] for k in _TOKENIZER_KEYS if k in kwargs})
        if gguf_file is not None and check_path_within(
            gguf_file, tokenizer, "gguf_file", _OWNER
        ).exists():
            load["gguf_file"] = gguf_file
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer), **load)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"Could not load a tokenizer from {str(tokenizer)!r} (local files only): {exc}"
            ) from exc
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise param_error("tokenizer", _OWNER, "a transformers tokenizer, a path or None",
                          tokenizer, type_error=True)
    return tokenizer
