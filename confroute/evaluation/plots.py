"""PNG plots for evaluation reports (matplotlib, imported inside each function)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from confroute._serialization import write_atomic
from confroute.evaluation import metrics as M

__all__ = ["plot_reliability", "plot_routing_curves"]


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ModuleNotFoundError:
        from confroute.errors import MissingDependencyError

        raise MissingDependencyError(
            'Plots need matplotlib: pip install "confroute[plot]" (or pass --no-plots).'
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; return its path."""
    fig.tight_layout()
    out = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=110, format=out.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return write_atomic(out, buf.getvalue(), owner="plot")


def plot_routing_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    oracle: tuple[np.ndarray, np.ndarray],
    random: tuple[np.ndarray, np.ndarray],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Mean served quality vs the fraction of queries sent to the cloud.

    Parameters
    ----------
    curves : mapping of str to (fractions, quality)
        One curve per estimator (may be empty, e.g. for a recorded pair).
    oracle, random : (fractions, quality)
    path : path of the PNG to write
    title : str
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(*oracle, color="black", linestyle="--", label="oracle")
    ax.plot(*random, color="grey", linestyle=":", label="random")
    for name, (f, q) in curves.items():
        ax.plot(f, q, label=name)
    ax.set_xlabel("fraction of queries sent to the cloud")
    ax.set_ylabel("mean quality")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def plot_reliability(
    data: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    n_bins: int = 10,
    title: str = "",
) -> Path:
    """Reliability diagrams, one panel per estimator.

    Parameters
    ----------
    data : mapping of str to (p_calibrated, p_naive, labels)
        Arrays of shape (n,); NaN probabilities are left out.
    path : path of the PNG to write
    n_bins : int
        Uniform bins.
    title : str
    """
    plt = _pyplot()
    k = max(1, len(data))
    cols = min(3, k)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, (p_cal, p_naive, y)) in zip(axes.ravel(), data.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for p, label, marker in ((p_naive, "naive (min-max)", "x"), (p_cal, "isotonic", "o")):
            ok = ~np.isnan(p)
            if ok.sum() == 0:
                continue
            mp, fg, _counts = M.reliability_curve(p[ok], y[ok], n_bins=n_bins)
            ax.plot(mp, fg, marker=marker, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted P(good)", fontsize=8)
        ax.set_ylabel("fraction good", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes.ravel()[len(data):]:
        ax.axis("off")
    if title:
        fig.suptitle(f"{title}: reliability (test part)", fontsize=10)
    return _save(plt, fig, path)
