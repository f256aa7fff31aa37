"""Query embeddings for pre-generation routers, with an optional on-disk cache.

The cache is a sqlite file keyed by ``(embedder name, sha256(text))``; vectors
are stored as little-endian float32 blobs and read back with ``np.frombuffer``
(no pickle), so a cache file from elsewhere cannot execute code.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from confroute._params import ParamsMixin
from confroute._validation import check_int, param_error
from confroute.errors import EstimationError, InvalidParameterError

__all__ = ["QueryEmbedder", "TextEncoder"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS embeddings ("
    " embedder TEXT NOT NULL, key TEXT NOT NULL, dim INTEGER NOT NULL, vec BLOB NOT NULL,"
    " PRIMARY KEY (embedder, key))"
)
_SQL_CHUNK = 500  # well under SQLite's bound-variable limit


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that embeds texts: ``encode(texts) -> ndarray (n, d)`` and a ``name``.

    :class:`confroute.models.embedded.Embedder` is the default implementation.
    """

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class QueryEmbedder(ParamsMixin):
    """Embed query texts in batches, reusing cached vectors.

    Parameters
    ----------
    embedder : TextEncoder or None, default None
        The text encoder. None loads
        :func:`confroute.models.embedded.load_default_embedder` (all-MiniLM-L6-v2)
        on first use.
    cache_path : path-like or None, default None
        sqlite file caching vectors by embedder name and text hash; None disables
        the cache.
    batch_size : int, default 512
        Number of uncached texts handed to ``embedder.encode`` at once (and
        written to the cache in one transaction).

    Notes
    -----
    Only texts absent from the cache are encoded; repeated texts within one call
    are encoded once. Vectors are returned as float32, exactly as the encoder
    produced them (the default embedder L2-normalises).
    """

    def __init__(
        self,
        embedder: Any = None,
        cache_path: str | os.PathLike[str] | None = None,
        batch_size: int = 512,
    ) -> None:
        self.embedder = embedder
        self.cache_path = cache_path
        self.batch_size = batch_size

    # Private state (not parameters): the resolved encoder, what it was resolved from,
    # and a lock serialising cache access from several threads.
    _encoder: Any = None
    _encoder_src: Any = None
    _lock: threading.Lock | None = None

    def _resolve(self) -> Any:
        if self._encoder is not None and self._encoder_src is self.embedder:
            return self._encoder
        enc = self.embedder
        if enc is None:
            from confroute.models.embedded import load_default_embedder

            enc = load_default_embedder()
        if not callable(getattr(enc, "encode", None)) or not hasattr(enc, "name"):
            raise param_error(
                "embedder", "QueryEmbedder",
                "an object with encode(texts) -> ndarray (n, d) and a 'name' attribute, or None",
                enc, type_error=True,
            )
        self._encoder = enc
        self._encoder_src = self.embedder
        return enc

    @property
    def name(self) -> str:
        """Name of the underlying encoder (part of the cache key)."""
        return str(self._resolve().name)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts : sequence of str, length n

        Returns
        -------
        ndarray of float32 of shape (n, d)

        Raises
        ------
        InvalidParameterError, InvalidTypeError
            On an empty or non-string input.
        EstimationError
            If the encoder returns a wrong shape, inconsistent dimensions or
            non-finite values.
        """
        owner = "QueryEmbedder"
        bs = check_int(self.batch_size, "batch_size", owner, min_value=1)
        if isinstance(texts, (str, bytes)):
            raise param_error("texts", owner, "a list of strings (wrap a single text in a list)",
                              texts, type_error=True)
        tlist = list(texts)
        if not tlist:
            raise param_error("texts", owner, "a non-empty list of strings", tlist)
        for i, t in enumerate(tlist):
            if not isinstance(t, str):
                raise param_error(f"texts[{i}]", owner, "a string", t, type_error=True)
        enc = self._resolve()
        ename = str(enc.name)
        keys = [_text_key(t) for t in tlist]
        found: dict[str, np.ndarray] = {}
        if self.cache_path is not None:
            found = self._cache_get(ename, sorted(set(keys)))
        missing: dict[str, str] = {}
        for k, t in zip(keys, tlist):
            if k not in found:
                missing.setdefault(k, t)
        mkeys = list(missing)
        for start in range(0, len(mkeys), bs):
            chunk = mkeys[start:start + bs]
            vecs = self._call_encoder(enc, [missing[k] for k in chunk])
            new = dict(zip(chunk, vecs))
            found.update(new)
            if self.cache_path is not None:
                self._cache_put(ename, new)
        dims = {v.shape[0] for v in found.values()}
        if len(dims) != 1:
            raise EstimationError(
                f"Embedder {ename!r} produced vectors of several dimensions {sorted(dims)}; "
                "clear the cache if the embedder changed under the same name."
            )
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    @staticmethod
    def _call_encoder(enc: Any, texts: list[str]) -> np.ndarray:
        out = np.asarray(enc.encode(texts), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(texts) or out.shape[1] == 0:
            raise EstimationError(
                f"Embedder {getattr(enc, 'name', enc)!r} returned an array of shape {out.shape} "
                f"for {len(texts)} texts; expected ({len(texts)}, d)."
            )
        if not np.isfinite(out).all():
            raise EstimationError(
                f"Embedder {getattr(enc, 'name', enc)!r} returned non-finite values."
            )
        return out

    # ------------------------------------------------------------------ cache

    def _connect(self) -> sqlite3.Connection:
        assert self.cache_path is not None
        p = Path(self.cache_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(str(p), timeout=30.0)
            con.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise InvalidParameterError(
                f"The 'cache_path' parameter of QueryEmbedder must point to a sqlite embedding "
                f"cache. Opening {str(p)!r} failed: {exc}."
            ) from None
        return con

    def _cache_get(self, ename: str, keys: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._get_lock(), closing(self._connect()) as con:
            for start in range(0, len(keys), _SQL_CHUNK):
                chunk = keys[start:start + _SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                cur = con.execute(
                    f"SELECT key, dim, vec FROM embeddings WHERE embedder = ? AND key IN ({marks})",
                    [ename, *chunk],
                )
                for key, dim, blob in cur:
                    if not isinstance(blob, bytes) or len(blob) != 4 * int(dim) or dim <= 0:
                        continue  # corrupted entry: treat as a miss, it gets overwritten
                    vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                    if np.isfinite(vec).all():
                        out[str(key)] = vec
        return out

    def _cache_put(self, ename: str, vecs: dict[str, np.ndarray]) -> None:
        rows = [
            (ename, k, int(v.shape[0]), np.ascontiguousarray(v, dtype="<f4").tobytes())
            for k, v in vecs.items()
        ]
        with self._get_lock(), closing(self._connect()) as con, con:
            con.executemany(
                "INSERT OR REPLACE INTO embeddings (embedder, key, dim, vec) VALUES (?, ?, ?, ?)",
                rows,
            )

    def _get_lock(self) -> threading.Lock:
        if self._lock is None:
            self._lock = threading.Lock()
        return self._lock
