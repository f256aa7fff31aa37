"""Where confroute keeps files it derives once and reuses (converted models, ...)."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from confroute._validation import param_error

__all__ = ["cache_dir"]


def cache_dir(sub: str) -> Path:
    """Return (and create) the confroute cache sub-directory ``sub``.

    The root is, in order of precedence: ``$CONFROUTE_CACHE_DIR``,
    ``$XDG_CACHE_HOME/confroute``, ``~/.cache/confroute``.

    Parameters
    ----------
    sub : str
        Relative sub-directory name, e.g. ``"models"``. Must not be absolute
        nor climb out of the root with ``..``.

    Returns
    -------
    Path
        The existing directory ``<root>/<sub>``.
    """
    if not isinstance(sub, str):
        raise param_error("sub", "cache_dir", "a relative directory name", sub, type_error=True)
    parts = PurePath(sub).parts
    if not sub.strip() or PurePath(sub).is_absolute() or ".." in parts:
        raise param_error("sub", "cache_dir", "a non-empty relative path without '..'", sub)
    explicit = os.environ.get("CONFROUTE_CACHE_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "confroute"
    path = root / sub
    path.mkdir(parents=True, exist_ok=True)
    return path
