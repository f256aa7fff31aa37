"""Safe persistence: versioned JSON with arrays inlined as checked base64.

No pickle anywhere: a file is parsed as JSON, arrays are rebuilt with
``np.frombuffer`` from an allow-listed dtype, and only registered classes are
instantiated. A checksum over the payload detects truncation and tampering.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from confroute.errors import SerializationError

__all__ = ["FORMAT_VERSION", "decode", "encode", "read_file", "write_file"]

FORMAT_NAME = "confroute"
FORMAT_VERSION = 1
_ALLOWED_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                   "bool"}


def encode(obj: Any) -> Any:
    """Turn a nested structure of dicts, lists, scalars and ndarrays into JSON values."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in _ALLOWED_DTYPES:
            raise SerializationError(f"Cannot save an array of dtype {obj.dtype.name}.")
        data = np.ascontiguousarray(obj).astype(obj.dtype.newbyteorder("<"), copy=False)
        return {
            "__ndarray__": {
                "dtype": obj.dtype.name,
                "shape": list(obj.shape),
                "data": base64.b64encode(data.tobytes()).decode("ascii"),
            }
        }
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise SerializationError(f"Cannot save a value of type {type(obj).__name__}.")


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            spec = obj["__ndarray__"]
            try:
                dtype = str(spec["dtype"])
                shape = tuple(int(s) for s in spec["shape"])
                raw = base64.b64decode(spec["data"], validate=True)
            except (KeyError, TypeError, ValueError) as exc:
                raise SerializationError(f"Malformed array in saved file: {exc}") from None
            if dtype not in _ALLOWED_DTYPES:
                raise SerializationError(f"Saved array has a disallowed dtype {dtype!r}.")
            dt = np.dtype(dtype).newbyteorder("<")
            count = int(np.prod(shape)) if shape else 1
            if len(raw) != count * dt.itemsize:
                raise SerializationError(
                    f"Saved array is truncated: expected {count * dt.itemsize} bytes for shape "
                    f"{shape}, found {len(raw)}."
                )
            return np.frombuffer(raw, dtype=dt).astype(np.dtype(dtype)).reshape(shape)
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def _digest(payload: Any) -> str:
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def write_file(path: str | os.PathLike[str], kind: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (already :func:`encode`-able) as a versioned, checksummed file."""
    p = Path(path)
    body = encode(payload)
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind,
           "sha256": _digest(body), "payload": body}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, p)
    return p


def read_file(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Read a file written by :func:`write_file`, verifying format, version, kind and checksum."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SerializationError(
            f"No saved {kind} at {str(p)!r}: the file does not exist."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SerializationError(f"Cannot read saved {kind} at {str(p)!r}: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SerializationError(
            f"The file {str(p)!r} is not valid JSON (truncated or corrupted?): {exc}"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise SerializationError(f"The file {str(p)!r} is not a confroute save file.")
    if doc.get("version") != FORMAT_VERSION:
        raise SerializationError(
            f"The file {str(p)!r} has format version {doc.get('version')!r}; this confroute "
            f"reads version {FORMAT_VERSION}."
        )
    if doc.get("kind") != kind:
        raise SerializationError(
            f"The file {str(p)!r} holds a {doc.get('kind')!r}, not a {kind!r}."
        )
    body = doc.get("payload")
    if not isinstance(body, dict) or doc.get("sha256") != _digest(body):
        raise SerializationError(
            f"The file {str(p)!r} failed its checksum: it was modified or corrupted after saving."
        )
    out = decode(body)
    assert isinstance(out, dict)
    return out
