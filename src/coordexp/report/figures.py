"""Figures that reproduce byte for byte: one style, one dpi, no varying metadata.

Figures are committed (the README shows them) and DVC re-runs the ``report`` stage whenever an
input changes, so an unchanged input must give byte-identical files: :func:`save_figure` fixes the
dpi and strips the time stamps and version strings that matplotlib writes into PNG and PDF
metadata, and :func:`style` pins the rcParams a user's matplotlibrc could change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from IPython import get_ipython
from IPython.display import display

FIG_DPI = 100
"""One fixed resolution for every saved figure (a different dpi would change the bytes)."""

PNG_METADATA: dict[str, Any] = {"Software": None}
"""Drop matplotlib's version string from PNGs so an upgrade alone does not rewrite every figure."""

PDF_METADATA: dict[str, Any] = {"CreationDate": None, "Producer": None, "Creator": None}
"""No creation date (different on every run) and no version strings in PDFs."""


def style() -> None:
    """Fixed rcParams, so figures do not depend on a user's matplotlibrc."""
    plt.rcdefaults()
    plt.rcParams.update(
        {
            "figure.dpi": FIG_DPI,
            "savefig.dpi": FIG_DPI,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "figure.autolayout": False,
            "svg.hashsalt": "coordexp",
            "pdf.compression": 6,
        }
    )


def save_figure(fig: plt.Figure, name: str, out_dir: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<name>.<fmt>`` with fixed dpi and metadata; returns the paths.

    Metadata that changes between runs (PDF CreationDate, version strings) is removed, so rerunning a
    notebook on unchanged inputs rewrites the same bytes and ``git status`` stays clean.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        meta = PDF_METADATA if fmt == "pdf" else PNG_METADATA if fmt == "png" else None
        fig.savefig(path, format=fmt, dpi=FIG_DPI, metadata=meta, bbox_inches=None)
        written.append(path)
    return written


def publish(fig: plt.Figure, name: str, out_dir: str | Path) -> list[Path]:
    """Save ``fig`` (see :func:`save_figure`), show it once in a notebook, and close it.

    Closing before displaying stops the inline backend from showing the figure a second time at
    the end of the cell, and keeps memory flat in a long report.
    """
    written = save_figure(fig, name, out_dir)
    if get_ipython() is not None:
        display(fig)
    plt.close(fig)
    return written


def note(ax: plt.Axes, text: str, fontsize: float = 9, y: float = 0.5) -> None:
    """Write a visible note in an axis that has nothing (or not enough) to plot."""
    ax.text(
        0.5,
        y,
        text,
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=fontsize,
        bbox={"boxstyle": "round", "fc": "#fff3cd", "ec": "#c9a227"},
    )


def grid(n: int, ncols: int = 3, size: tuple[float, float] = (3.6, 2.8)) -> tuple[plt.Figure, np.ndarray]:
    """A figure with ``n`` visible subplots in ``ncols`` columns; the axes that fill the last row are hidden."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat[:n]
