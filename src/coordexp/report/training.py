"""The training-diagnostics notebook: loss-component curves, gradient norm, final values, warnings.

A history is the wide table of ``reports/train_history.csv`` (or its MLflow equivalent, see
:func:`coordexp.report.runs.load_history`): ``step``, ``split`` (train|eval) and one column per
metric. Every helper accepts a history with missing columns or no rows, because a short smoke run
logs only part of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from coordexp.report.figures import grid, note

LOSS_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("loss", "total loss"),
    ("coord_softce_w1/text_ce", "text CE (coord targets masked)"),
    ("coord_softce_w1/soft_ce", "soft CE (coord)"),
    ("coord_softce_w1/w1", "W1 (coord)"),
    ("coord_softce_w1/gate", "gate: -log coord mass"),
    ("coord_softce_w1/coord_vocab_mass", "coord-vocab mass at coord positions"),
    ("token_acc", "token accuracy"),
    ("learning_rate", "learning rate"),
    ("coord_diag/top1_acc", "coord top-1 bin accuracy"),
    ("coord_diag/top5_acc", "coord top-5 bin accuracy"),
    ("coord_diag/within2_acc", "coord arg-max within +-2 bins"),
    ("coord_diag/p_target", "coord p(target bin)"),
    ("coord_diag/expected_mae", "coord |expected bin - target|"),
    ("coord_diag/spread", "coord spread (std, bins)"),
)
"""Curves of the training diagnostics, in display order: (history column, title). The ``coord_diag/`` ones
are logged with ``train.coord_diag`` (:data:`coordexp.train.loss.COORD_DIAG`); a run without them shows a
"not logged" panel."""

TOKEN_TYPE_PREFIX = "token_type/"

NONFINITE_ATTR = "nonfinite"
"""``DataFrame.attrs`` key where the loaders record ``(column, step)`` of logged NaN/inf values: in
the wide history a NaN also means "not logged at this row", so the loaders note real ones."""


def split_history(hist: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train rows, eval rows)``, each ordered by step."""
    train = hist[hist["split"] == "train"].sort_values("step", kind="stable")
    ev = hist[hist["split"] == "eval"].sort_values("step", kind="stable")
    return train, ev


def plot_curve(ax: plt.Axes, hist: pd.DataFrame, column: str, title: str | None = None) -> bool:
    """Train (line) and eval (markers) of one column on ``ax``; a note when neither has values."""
    train, ev = split_history(hist)
    drawn = False
    for part, kw in (
        (train, {"color": "C0", "label": "train", "lw": 1.4}),
        (ev, {"color": "C3", "label": "eval", "marker": "o", "ms": 4, "lw": 1.0, "ls": "--"}),
    ):
        if column in part and part[column].notna().any():
            d = part[["step", column]].dropna()
            ax.plot(d["step"], d[column], **kw)
            drawn = True
    ax.set_title(title or column)
    ax.set_xlabel("step")
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        note(ax, f"{column}\nnot logged")
    return drawn


def plot_curves(hist: pd.DataFrame, columns: Sequence[tuple[str, str]] = LOSS_COMPONENTS, ncols: int = 4) -> plt.Figure:
    """One panel per ``(column, title)``; the learning rate in scientific notation."""
    fig, axes = grid(len(columns), ncols)
    for ax, (col, title) in zip(axes, columns):
        plot_curve(ax, hist, col, title)
        if col == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    return fig


def token_type_columns(hist: pd.DataFrame) -> list[tuple[str, str]]:
    """``(column, title)`` of the per-token-type metrics that were logged (empty when the run had them off)."""
    cols = sorted(c for c in hist.columns if c.startswith(TOKEN_TYPE_PREFIX) and hist[c].notna().any())
    return [(c, c[len(TOKEN_TYPE_PREFIX) :]) for c in cols]


def final_values(hist: pd.DataFrame, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Per metric and split: the first and the last non-missing value, and the step of the last."""
    train, ev = split_history(hist)
    cols = list(columns) if columns is not None else [c for c in hist.columns if c not in ("step", "split")]
    rows = []
    for col in cols:
        row: dict[str, Any] = {"metric": col}
        for name, part in (("train", train), ("eval", ev)):
            s = part[["step", col]].dropna() if col in part else pd.DataFrame(columns=["step", col])
            row[f"{name}_first"] = s[col].iloc[0] if len(s) else np.nan
            row[f"{name}_final"] = s[col].iloc[-1] if len(s) else np.nan
            row[f"{name}_final_step"] = s["step"].iloc[-1] if len(s) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("metric")


def nonfinite_cells(hist: pd.DataFrame) -> list[tuple[str, Any]]:
    """``(column, step)`` of every NaN or infinite value that was actually logged.

    Frames from :func:`coordexp.report.runs.load_history` carry them in ``attrs``; for a frame built
    by hand, infinities count, and so does a NaN *inside* a series (between its first and last
    logged value of a split).
    """
    if NONFINITE_ATTR in hist.attrs:
        return list(hist.attrs[NONFINITE_ATTR])
    found: list[tuple[str, Any]] = []
    cols = [c for c in hist.columns if c not in ("step", "split")]
    for _, part in hist.groupby("split", sort=True):
        for col in cols:
            v = pd.to_numeric(part[col], errors="coerce").to_numpy(dtype=float)
            logged = np.flatnonzero(~np.isnan(v))
            if not len(logged):
                continue
            idx = np.arange(len(v))
            gap = np.isnan(v) & (idx > logged[0]) & (idx < logged[-1])
            for i in np.flatnonzero(gap | np.isinf(v)):
                found.append((col, part["step"].iloc[i]))
    return found


def diagnose(hist: pd.DataFrame, *, mass_drop: float = 0.05, eval_rise: float = 0.02) -> list[str]:
    """Warnings a reader should act on, in plain words (empty list: nothing suspicious).

    * a NaN or infinite value in any logged metric;
    * coord-vocab mass falling: the last train value is ``mass_drop`` (absolute) below its peak,
      i.e. probability is leaking out of the coord vocabulary at coord positions;
    * eval loss rising: the last eval loss exceeds the best one by more than ``eval_rise`` (relative),
      the usual sign of over-fitting.
    """
    warnings: list[str] = []
    if hist.empty:
        return ["no training history was found"]
    bad: dict[str, list[Any]] = {}
    for col, step in nonfinite_cells(hist):
        bad.setdefault(col, []).append(step)
    for col, steps in bad.items():
        warnings.append(f"non-finite values in {col} (steps {steps[:5]})")
    train, ev = split_history(hist)
    mass_col = "coord_softce_w1/coord_vocab_mass"
    if mass_col in train:
        m = train[mass_col].dropna()
        if len(m) >= 2 and m.max() - m.iloc[-1] > mass_drop:
            warnings.append(
                f"coord-vocab mass is falling: peak {m.max():.3f}, last {m.iloc[-1]:.3f} "
                "(probability leaks out of the coord vocabulary; raise gate_weight?)"
            )
    if "loss" in ev:
        e = ev["loss"].dropna()
        if len(e) >= 2 and np.isfinite(e.min()) and e.iloc[-1] > e.min() * (1 + eval_rise):
            warnings.append(
                f"eval loss is rising: best {e.min():.4f} at step {int(ev.loc[e.idxmin(), 'step'])}, "
                f"last {e.iloc[-1]:.4f} (over-fitting?)"
            )
    if len(ev) == 0:
        warnings.append("no eval steps were logged (train.eval_steps > train.max_steps?)")
    return warnings


def plot_grad_norm(hist: pd.DataFrame) -> plt.Figure:
    """The gradient norm before clipping; on a log axis when every logged value is positive."""
    fig, ax = plt.subplots(figsize=(5, 3))
    plot_curve(ax, hist, "grad_norm", "gradient norm (before clipping)")
    train, _ = split_history(hist)
    if "grad_norm" in train and (train["grad_norm"].dropna() > 0).all() and train["grad_norm"].notna().any():
        ax.set_yscale("log")
    fig.tight_layout()
    return fig
