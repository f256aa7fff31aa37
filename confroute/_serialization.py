"""Safe persistence: versioned JSON with arrays inlined as checked base64.

No pickle anywhere: a file is parsed as JSON, arrays are rebuilt with
``np.frombuffer`` from an allow-listed dtype, and only registered classes are
instantiated. A SHA-256 checksum over the payload detects truncation and
corruption; an optional HMAC-SHA256 (``signing_key`` or the environment variable
``CONFROUTE_SIGNING_KEY``) detects tampering by anyone without the key.

Writes are atomic and safe under concurrent writers (:func:`write_atomic`): a
reader sees the old file or the new one, never a partial one, even when the
writing process is killed. Reads are defensive: a size cap, a bounded nesting
depth checked before parsing, and every array's shape and dtype checked before
anything is allocated.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import hmac
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from confroute._validation import check_int, check_path, param_error
from confroute.errors import SerializationError, describe

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "SIGNING_KEY_ENV",
    "decode",
    "encode",
    "read_file",
    "write_atomic",
    "write_file",
]

FORMAT_NAME = "confroute"
FORMAT_VERSION = 1
#: Default cap on the size of a file :func:`read_file` accepts (64 MiB).
DEFAULT_MAX_BYTES = 64 * 2**20
#: Deepest JSON nesting :func:`read_file` accepts (a router file needs about 15).
MAX_DEPTH = 64
#: Environment variable holding the default HMAC key for :func:`write_file` / :func:`read_file`.
SIGNING_KEY_ENV = "CONFROUTE_SIGNING_KEY"
#: Temporary files of an interrupted write older than this are removed by a later write.
STALE_TEMP_SECONDS = 600.0
_TEMP_SUFFIX = ".confroute-tmp"
_ALLOWED_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                   "bool"}
_MAX_NDIM = 32
# A JSON string literal, written as an unrolled loop so long base64 strings scan fast.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


# ---------------------------------------------------------------------------- arrays
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


def _array_spec(spec: Any) -> tuple[np.dtype[Any], tuple[int, ...], str]:
    """Check an inlined array's dtype and shape (before any allocation)."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise SerializationError(
            "Malformed array in saved file: expected a mapping with exactly dtype, shape and "
            f"data. Got {describe(spec)}."
        )
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if not isinstance(dtype, str) or dtype not in _ALLOWED_DTYPES:
        raise SerializationError(f"Saved array has a disallowed dtype {describe(dtype)}.")
    if (
        not isinstance(shape, list) or len(shape) > _MAX_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise SerializationError(
            f"Saved array has an invalid shape: expected a list of at most {_MAX_NDIM} "
            f"non-negative integers. Got {describe(shape)}."
        )
    if not isinstance(data, str):
        raise SerializationError(f"Saved array data must be a base64 string. Got {describe(data)}.")
    return np.dtype(dtype), tuple(shape), data


def _decode_array(spec: Any) -> np.ndarray:
    dtype, shape, data = _array_spec(spec)
    # Python ints: a huge shape cannot overflow into a small, matching byte count.
    expected = math.prod(shape) * dtype.itemsize
    if expected != (len(data) // 4) * 3 - data[-2:].count("="):
        raise SerializationError(
            f"Saved array is truncated or padded: expected {expected} bytes for shape {shape}."
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise SerializationError(f"Malformed array data in saved file: {exc}") from None
    if len(raw) != expected:
        raise SerializationError(
            f"Saved array is truncated: expected {expected} bytes for shape {shape}, "
            f"found {len(raw)}."
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`; every inlined array is checked before allocation."""
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return _decode_array(obj["__ndarray__"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- integrity
def _canonical(payload: Any) -> bytes:
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return canon.encode("ascii")


def _digest(payload: Any) -> str:
    return hashlib.sha256(_canonical(payload)).hexdigest()


def _signature(key: bytes, kind: str, payload: Any) -> str:
    signed = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "payload": payload}
    return hmac.new(key, _canonical(signed), hashlib.sha256).hexdigest()


def _signing_key(signing_key: Any, owner: str) -> bytes | None:
    """The explicit key, else the environment's, else None; str keys are UTF-8 encoded."""
    key = signing_key if signing_key is not None else os.environ.get(SIGNING_KEY_ENV) or None
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise param_error("signing_key", owner, "a str, bytes or None", signing_key,
                          type_error=True)
    if len(key) == 0:
        raise param_error("signing_key", owner, "a non-empty key", key)
    return bytes(key)


# ---------------------------------------------------------------------------- writing
def _remove_stale_temps(p: Path) -> None:
    """Remove temporaries of ``p`` left by killed writers (older than STALE_TEMP_SECONDS)."""
    pattern = os.path.join(glob.escape(str(p.parent)), f".{glob.escape(p.name)}.*{_TEMP_SUFFIX}")
    cutoff = time.time() - STALE_TEMP_SECONDS
    for stale in glob.glob(pattern):
        with contextlib.suppress(OSError):  # another writer may remove it first
            if os.stat(stale).st_mtime < cutoff:
                os.unlink(stale)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike[str], data: str | bytes, *, owner: str = "write_atomic"
) -> Path:
    """Replace ``path`` with ``data`` atomically and durably.

    A unique temporary file is created next to the target (``tempfile.mkstemp``,
    so concurrent writers never share one), written, flushed and fsynced, then
    renamed over the target with ``os.replace`` and the directory fsynced. The
    temporary is removed on any failure; temporaries of killed writers older
    than ``STALE_TEMP_SECONDS`` are removed by a later write to the same path.
    Missing parent directories are created.

    Parameters
    ----------
    path : str or path-like
        Target file.
    data : str or bytes
        Content; ``str`` is written as UTF-8.
    owner : str
        Name used in error messages (the public function that writes).

    Returns
    -------
    Path
        The target path.

    Raises
    ------
    InvalidTypeError, InvalidParameterError
        ``path`` is not a path or is a directory.
    SerializationError
        The file cannot be written there (unwritable or uncreatable parent, disk full...).
    """
    p = check_path(path, owner)
    if not isinstance(data, (str, bytes, bytearray)):
        raise param_error("data", owner, "a str or bytes", data, type_error=True)
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(p)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=_TEMP_SUFFIX, dir=p.parent)
    except OSError as exc:
        raise SerializationError(
            f"The 'path' parameter of {owner} must be a writable location: cannot write "
            f"{str(p)!r} ({exc.strerror or exc})."
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as exc:  # KeyboardInterrupt too: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SerializationError(
                f"The 'path' parameter of {owner} must be a writable location: cannot write "
                f"{str(p)!r} ({exc.strerror or exc})."
            ) from None
        raise
    _fsync_dir(p.parent)
    return p


def write_file(
    path: str | os.PathLike[str],
    kind: str,
    payload: dict[str, Any],
    *,
    signing_key: str | bytes | None = None,
) -> Path:
    """Write ``payload`` (already :func:`encode`-able) as a versioned, checksummed file.

    Parameters
    ----------
    path : str or path-like
        Target file, replaced atomically (see :func:`write_atomic`).
    kind : str
        What the file holds (``"router"``, ...); checked by :func:`read_file`.
    payload : dict
        Plain data and ndarrays.
    signing_key : str or bytes or None, default None
        Key of an HMAC-SHA256 over the canonical payload (with format, version and
        kind). None: the environment variable ``CONFROUTE_SIGNING_KEY`` when set,
        else the file is unsigned (checksummed only).

    Returns
    -------
    Path
    """
    owner = f"{kind} save"
    check_path(path, owner)
    key = _signing_key(signing_key, owner)
    body = encode(payload)
    doc: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind,
                           "sha256": _digest(body)}
    if key is not None:
        doc["hmac_sha256"] = _signature(key, kind, body)
    doc["payload"] = body
    return write_atomic(path, json.dumps(doc, indent=1, ensure_ascii=False), owner=owner)


# ---------------------------------------------------------------------------- reading
def _read_capped(p: Path, kind: str, max_bytes: int) -> bytes:
    try:
        with p.open("rb") as fh:
            blob = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise SerializationError(
            f"No saved {kind} at {str(p)!r}: the file does not exist."
        ) from None
    except OSError as exc:
        raise SerializationError(f"Cannot read saved {kind} at {str(p)!r}: {exc}") from None
    if len(blob) > max_bytes:
        raise SerializationError(
            f"The file {str(p)!r} is larger than max_bytes={max_bytes} bytes; pass a larger "
            "max_bytes to load it if you trust it."
        )
    return blob


def _json_depth(blob: bytes) -> int:
    """Deepest bracket nesting of a JSON text, without recursion (strings ignored)."""
    chars = np.frombuffer(_STRING.sub(b"", blob), dtype=np.uint8)
    opens = (chars == ord("[")) | (chars == ord("{"))
    where = np.flatnonzero(opens | (chars == ord("]")) | (chars == ord("}")))
    step = np.where(opens[where], 1, -1).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def _parse(blob: bytes, p: Path, max_depth: int) -> Any:
    depth = _json_depth(blob)
    if depth > max_depth:
        raise SerializationError(
            f"The file {str(p)!r} nests JSON {depth} levels deep; at most {max_depth} are "
            "accepted (a confroute file needs far fewer)."
        )
    try:
        return json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints
        raise SerializationError(
            f"The file {str(p)!r} is not valid JSON (truncated or corrupted?): {exc}"
        ) from None


def _check_header(doc: Any, p: Path, kind: str) -> tuple[dict[str, Any], Any]:
    """The verified payload and the signature field (None when unsigned)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise SerializationError(f"The file {str(p)!r} is not a confroute save file.")
    if doc.get("version") != FORMAT_VERSION:
        raise SerializationError(
            f"The file {str(p)!r} has format version {describe(doc.get('version'))}; this "
            f"confroute reads version {FORMAT_VERSION}."
        )
    if doc.get("kind") != kind:
        raise SerializationError(
            f"The file {str(p)!r} holds a {describe(doc.get('kind'))}, not a {kind!r}."
        )
    body = doc.get("payload")
    if not isinstance(body, dict) or doc.get("sha256") != _digest(body):
        raise SerializationError(
            f"The file {str(p)!r} failed its checksum: it was modified or corrupted after saving."
        )
    return body, doc.get("hmac_sha256")


def read_file(
    path: str | os.PathLike[str],
    kind: str,
    *,
    signing_key: str | bytes | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> dict[str, Any]:
    """Read a file written by :func:`write_file`, verifying it before decoding anything.

    Checks, in order: ``path`` is a file path; the file is at most ``max_bytes``;
    its JSON nests at most ``max_depth`` levels (scanned before parsing); format,
    version, kind and checksum; the HMAC signature when a key is known; then every
    inlined array's dtype and shape.

    Parameters
    ----------
    path : str or path-like
    kind : str
        Expected content (``"router"``, ...).
    signing_key : str or bytes or None, default None
        When given (or ``CONFROUTE_SIGNING_KEY`` is set), unsigned files and files
        whose HMAC does not match are refused.
    max_bytes : int, default DEFAULT_MAX_BYTES (64 MiB)
        Largest file accepted.
    max_depth : int, default MAX_DEPTH (64)
        Deepest JSON nesting accepted.

    Returns
    -------
    dict
        The payload, arrays rebuilt as ndarrays.

    Raises
    ------
    InvalidTypeError, InvalidParameterError
        Bad ``path``, ``signing_key``, ``max_bytes`` or ``max_depth``.
    SerializationError
        Anything wrong with the file.
    """
    owner = f"{kind} load"
    p = check_path(path, owner)
    check_int(max_bytes, "max_bytes", owner, min_value=1)
    check_int(max_depth, "max_depth", owner, min_value=2, max_value=512)
    key = _signing_key(signing_key, owner)
    body, sig = _check_header(_parse(_read_capped(p, kind, max_bytes), p, max_depth), p, kind)
    if key is not None:
        mac = _signature(key, kind, body)
        if not isinstance(sig, str):
            raise SerializationError(
                f"The file {str(p)!r} is not signed, but a signing key was given: refusing an "
                "unsigned file."
            )
        if not hmac.compare_digest(sig.encode("ascii", "replace"), mac.encode("ascii")):
            raise SerializationError(
                f"The file {str(p)!r} failed its signature check: it was altered or signed "
                "with another key."
            )
    out = decode(body)
    assert isinstance(out, dict)
    return out
