"""Helpers for the report notebooks: MLflow runs and histories as pandas, plots, reproducible figures.

The notebooks in ``notebooks/`` stay short and readable by keeping the data wrangling and the
plotting here, where it is tested. Three rules shape this module:

* **Reproducible figures.** Figures are committed (the README shows them) and DVC re-runs the
  ``report`` stage whenever an input changes, so an unchanged input must give byte-identical
  files: :func:`save_figure` fixes the dpi and strips the time stamps and version strings that
  matplotlib writes into PNG and PDF metadata.
* **Never crash on thin data.** A report of a 30-step smoke run, a run without eval steps or an
  experiment with a single run must still render: plotting helpers draw what exists and write a
  visible note instead of raising.
* **Run identity from tags, not from stage names.** Later stages resume the training run and
  retag ``coordexp.stage``, so training runs are recognised by the ``coordexp.loss`` tag that only
  the train stage sets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from coordexp.errors import StageError

FIG_DPI = 100
"""One fixed resolution for every saved figure (a different dpi would change the bytes)."""

PNG_METADATA: dict[str, Any] = {"Software": None}
"""Drop matplotlib's version string from PNGs so an upgrade alone does not rewrite every figure."""

PDF_METADATA: dict[str, Any] = {"CreationDate": None, "Producer": None, "Creator": None}
"""No creation date (different on every run) and no version strings in PDFs."""

LOSS_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("loss", "total loss"),
    ("coord_softce_w1/text_ce", "text CE (coord targets masked)"),
    ("coord_softce_w1/soft_ce", "soft CE (coord)"),
    ("coord_softce_w1/w1", "W1 (coord)"),
    ("coord_softce_w1/gate", "gate: -log coord mass"),
    ("coord_softce_w1/coord_vocab_mass", "coord-vocab mass at coord positions"),
    ("token_acc", "token accuracy"),
    ("learning_rate", "learning rate"),
)
"""Curves of the training diagnostics, in display order: (history column, title)."""

TOKEN_TYPE_PREFIX = "token_type/"

EXPECTED_FIGURES: dict[str, tuple[str, ...]] = {
    "training_diagnostics": ("train_curves", "train_grad_norm"),
    "eval_report": ("eval_per_class_ap", "eval_pr_curves", "eval_predictions_grid", "eval_coord_errors",
                    "eval_coord_distribution"),
    "compare_runs": ("compare_map_vs_weights", "compare_train_curves", "compare_loss_kinds"),
}
"""Figures each notebook always saves (stem names; each as .png and .pdf). ``training_diagnostics``
also saves ``train_token_types`` when the run logged token-type metrics."""

OPTIONAL_FIGURES: dict[str, tuple[str, ...]] = {"training_diagnostics": ("train_token_types",)}

HEADLINE_METRICS: tuple[str, ...] = ("bbox_mAP", "bbox_mAP50", "bbox_mAP75", "segm_mAP", "f1@0.5", "f1@0.3",
                                     "parse_rate", "nan_scores")

ABLATION_PARAMS: tuple[str, ...] = (
    "cfg.train.coord_soft_ce_w1.enabled",
    "cfg.train.coord_soft_ce_w1.soft_ce_weight",
    "cfg.train.coord_soft_ce_w1.w1_weight",
    "cfg.train.coord_soft_ce_w1.gate_weight",
    "cfg.train.coord_soft_ce_w1.temperature",
    "cfg.train.coord_soft_ce_w1.target_sigma",
    "cfg.train.coord_soft_ce_w1.target_truncate",
    "cfg.preprocess.object_ordering",
)
"""Params shown in the runs table even when they do not vary (the knobs of the Stage-1 ablation)."""

LOSS_WEIGHTS: tuple[str, ...] = ABLATION_PARAMS[1:4]


# --------------------------------------------------------------------------------------------
# figures


def style() -> None:
    """Fixed rcParams, so figures do not depend on a user's matplotlibrc."""
    plt.rcdefaults()
    plt.rcParams.update({
        "figure.dpi": FIG_DPI, "savefig.dpi": FIG_DPI, "font.size": 9, "axes.titlesize": 10,
        "axes.grid": True, "grid.alpha": 0.3, "figure.autolayout": False, "svg.hashsalt": "coordexp",
        "pdf.compression": 6,
    })


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
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(fig)
    except ImportError:  # pragma: no cover - IPython is there whenever a notebook runs
        pass
    plt.close(fig)
    return written


def note(ax: plt.Axes, text: str, fontsize: float = 9, y: float = 0.5) -> None:
    """Write a visible note in an axis that has nothing (or not enough) to plot."""
    ax.text(0.5, y, text, ha="center", va="center", transform=ax.transAxes, fontsize=fontsize,
            bbox={"boxstyle": "round", "fc": "#fff3cd", "ec": "#c9a227"})


def grid(n: int, ncols: int = 3, size: tuple[float, float] = (3.6, 2.8)) -> tuple[plt.Figure, np.ndarray]:
    """A figure with at least ``n`` subplots in ``ncols`` columns; unused axes are hidden by the caller."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat[:n]


# --------------------------------------------------------------------------------------------
# MLflow


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def read_run_id(path: str | Path) -> str | None:
    """The training run id that the train stage wrote (``artifacts/train/mlflow_run_id``)."""
    p = Path(path)
    return p.read_text().strip() or None if p.is_file() else None


def metric_name(mlflow_key: str) -> str:
    """The metric's name in ``eval.json`` for its MLflow key: MLflow forbids ``@``, so the evaluate
    stage logs ``f1@0.5`` as ``f1_at_0.5``; tables here use one spelling, the file's."""
    return mlflow_key.replace("_at_", "@")


def metric_history(tracking_uri: str, run_id: str, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """Long table (key, step, value, timestamp) of a run's metric histories (all keys by default)."""
    c = client(tracking_uri)
    run = c.get_run(run_id)
    keys = sorted(run.data.metrics) if keys is None else [k for k in keys if k in run.data.metrics]
    rows = [(k, m.step, m.value, m.timestamp) for k in keys for m in c.get_metric_history(run_id, k)]
    df = pd.DataFrame(rows, columns=["key", "step", "value", "timestamp"])
    return df.sort_values(["key", "step", "timestamp"], kind="stable").reset_index(drop=True)


def history_from_mlflow(tracking_uri: str, run_id: str) -> pd.DataFrame:
    """Wide history like ``reports/train_history.csv``: step, split (train|eval), one column per metric.

    ``eval_*`` keys become the eval split without the prefix; summary metrics logged once (mAP,
    ``train_summary.*``) are left out, they are not curves.
    """
    long = metric_history(tracking_uri, run_id)
    if long.empty:
        return pd.DataFrame(columns=["step", "split"])
    long = long[~long["key"].str.startswith(("train_summary.", "system/"))]
    bad = long[~np.isfinite(long["value"].to_numpy(dtype=float))]
    cells = [(k[5:] if k.startswith("eval_") else k, int(st)) for k, st in zip(bad["key"], bad["step"])]
    counts = long.groupby("key")["step"].nunique()
    curves = set(counts[counts > 1].index) | {k for k in counts.index if k.startswith("eval_") or k in dict(LOSS_COMPONENTS)}
    summary = long["key"].map(metric_name).isin(HEADLINE_METRICS) | (long["key"] == "ckpt_bbox_mAP")
    long = long[long["key"].isin(curves) & ~summary]
    long = long.assign(split=np.where(long["key"].str.startswith("eval_"), "eval", "train"),
                       key=long["key"].str.replace(r"^eval_", "", regex=True))
    long = long.drop_duplicates(["split", "key", "step"], keep="last")
    wide = long.pivot_table(index=["step", "split"], columns="key", values="value", aggfunc="last").reset_index()
    wide.columns.name = None
    wide = wide.sort_values(["split", "step"], kind="stable").reset_index(drop=True)
    wide.attrs[NONFINITE_ATTR] = cells
    return wide


def load_history(csv_path: str | Path | None = None, tracking_uri: str | None = None,
                 run_id: str | None = None) -> tuple[pd.DataFrame, str]:
    """The training history and where it came from: the CSV the train stage wrote (a DVC output,
    so the report is a function of tracked files) or, without it, the MLflow run's histories."""
    if csv_path is not None and Path(csv_path).is_file() and Path(csv_path).stat().st_size > 0:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        df = pd.read_csv(csv_path).sort_values(["split", "step"], kind="stable").reset_index(drop=True)
        cells = [(col, int(raw.loc[i, "step"]) if raw.loc[i, "step"].isdigit() else raw.loc[i, "step"])
                 for col in raw.columns if col not in ("step", "split")
                 for i in np.flatnonzero(raw[col].str.strip().str.lower().isin(_NONFINITE_TEXT))]
        df.attrs[NONFINITE_ATTR] = cells
        return df, str(csv_path)
    if tracking_uri and run_id:
        return history_from_mlflow(tracking_uri, run_id), f"mlflow run {run_id}"
    return pd.DataFrame(columns=["step", "split"]), "nothing"


def runs_table(tracking_uri: str, experiment: str, *, training_only: bool = True) -> pd.DataFrame:
    """Every run of ``experiment`` as one row: run id, name, status, tags, ``cfg.*`` params, metrics.

    Training runs are those tagged ``coordexp.loss`` (set by the train stage only; evaluate and
    report resume the same run and overwrite ``coordexp.stage``). Rows are ordered by start time so
    the table (and its figures) is stable from one rerun to the next.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame(columns=["run_id", "run_name", "status", "loss_kind", "exp_name"])
    df = mlflow.search_runs([exp.experiment_id], output_format="pandas", order_by=["attributes.start_time ASC"])
    if df.empty:
        return pd.DataFrame(columns=["run_id", "run_name", "status", "loss_kind", "exp_name"])
    if training_only:
        if "tags.coordexp.loss" not in df:
            return pd.DataFrame(columns=["run_id", "run_name", "status", "loss_kind", "exp_name"])
        df = df[df["tags.coordexp.loss"].notna()]
    out = pd.DataFrame({
        "run_id": df["run_id"],
        "run_name": df.get("tags.mlflow.runName"),
        "status": df["status"],
        "start_time": df["start_time"],
        "loss_kind": df.get("tags.coordexp.loss"),
        "exp_name": df["tags.dvc.exp_name"] if "tags.dvc.exp_name" in df else None,
        "params_hash": df.get("tags.coordexp.params_hash"),
        "git_commit": df.get("tags.coordexp.git_commit"),
    })
    params = df[[c for c in df.columns if c.startswith("params.cfg.")]].rename(columns=lambda c: c[len("params."):])
    metrics = df[[c for c in df.columns if c.startswith("metrics.")]].rename(columns=lambda c: metric_name(c[len("metrics."):]))
    params = params.apply(_numeric_if_possible)
    out = pd.concat([out, params, metrics], axis=1)
    out["label"] = [label_of(r) for r in out.to_dict("records")]
    return out.sort_values("start_time", kind="stable").reset_index(drop=True)


def _numeric_if_possible(s: pd.Series) -> pd.Series:
    """MLflow returns params as strings; weights must be numbers to be plotted on an axis."""
    conv = pd.to_numeric(s, errors="coerce")
    return conv if conv.notna().sum() == s.notna().sum() else s


def label_of(row: Mapping[str, Any]) -> str:
    """A short human label: the DVC experiment name, else the run name, plus the id's first 6 chars."""
    name = row.get("exp_name")
    if not isinstance(name, str) or not name:
        name = row.get("run_name") or "run"
    return f"{name} ({str(row.get('run_id', ''))[:6]})"


def varying_params(runs: pd.DataFrame) -> list[str]:
    """``cfg.*`` columns whose value differs between runs (what an ablation changed)."""
    cols = [c for c in runs.columns if c.startswith("cfg.")]
    return [c for c in cols if runs[c].astype(str).nunique(dropna=False) > 1]


def runs_overview(runs: pd.DataFrame) -> pd.DataFrame:
    """The compact table for the notebook: label, loss kind, ablation knobs, varying params, headline metrics."""
    keep = [c for c in ("label", "loss_kind", "status") if c in runs]
    keep += [c for c in ABLATION_PARAMS if c in runs]
    keep += [c for c in varying_params(runs) if c not in keep]
    keep += [c for c in HEADLINE_METRICS if c in runs]
    keep += [c for c in ("train_summary.final_train_loss", "train_summary.final_eval_loss") if c in runs]
    table = runs[keep].copy()
    table.columns = [c.replace("cfg.train.coord_soft_ce_w1.", "").replace("cfg.", "") for c in keep]
    return table


# --------------------------------------------------------------------------------------------
# training diagnostics


def split_history(hist: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    train = hist[hist["split"] == "train"].sort_values("step", kind="stable")
    ev = hist[hist["split"] == "eval"].sort_values("step", kind="stable")
    return train, ev


def plot_curve(ax: plt.Axes, hist: pd.DataFrame, column: str, title: str | None = None) -> bool:
    """Train (line) and eval (markers) of one column on ``ax``; a note when neither has values."""
    train, ev = split_history(hist)
    drawn = False
    for part, kw in ((train, {"color": "C0", "label": "train", "lw": 1.4}),
                     (ev, {"color": "C3", "label": "eval", "marker": "o", "ms": 4, "lw": 1.0, "ls": "--"})):
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
    fig, axes = grid(len(columns), ncols)
    for ax, (col, title) in zip(axes, columns):
        plot_curve(ax, hist, col, title)
        if col == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    return fig


def token_type_columns(hist: pd.DataFrame) -> list[tuple[str, str]]:
    cols = sorted(c for c in hist.columns if c.startswith(TOKEN_TYPE_PREFIX) and hist[c].notna().any())
    return [(c, c[len(TOKEN_TYPE_PREFIX):]) for c in cols]


def final_values(hist: pd.DataFrame, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Last non-missing value of each metric per split, with its step, first value and min/max."""
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


NONFINITE_ATTR = "nonfinite"
"""``DataFrame.attrs`` key where the loaders record ``(column, step)`` of logged NaN/inf values: in
the wide history a NaN also means "not logged at this row", so the loaders note real ones."""

_NONFINITE_TEXT = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}


def nonfinite_cells(hist: pd.DataFrame) -> list[tuple[str, Any]]:
    """``(column, step)`` of every NaN or infinite value that was actually logged.

    Frames from :func:`load_history` carry them in ``attrs``; for a frame built by hand, infinities
    count, and so does a NaN *inside* a series (between its first and last logged value of a split).
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
            warnings.append(f"coord-vocab mass is falling: peak {m.max():.3f}, last {m.iloc[-1]:.3f} "
                            "(probability leaks out of the coord vocabulary; raise gate_weight?)")
    if "loss" in ev:
        e = ev["loss"].dropna()
        if len(e) >= 2 and np.isfinite(e.min()) and e.iloc[-1] > e.min() * (1 + eval_rise):
            warnings.append(f"eval loss is rising: best {e.min():.4f} at step {int(ev.loc[e.idxmin(), 'step'])}, "
                            f"last {e.iloc[-1]:.4f} (over-fitting?)")
    if len(ev) == 0:
        warnings.append("no eval steps were logged (train.eval_steps > train.max_steps?)")
    return warnings


def plot_grad_norm(hist: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    plot_curve(ax, hist, "grad_norm", "gradient norm (before clipping)")
    train, _ = split_history(hist)
    if "grad_norm" in train and (train["grad_norm"].dropna() > 0).all() and train["grad_norm"].notna().any():
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# evaluation


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def metrics_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Scalar metrics of ``reports/metrics/eval.json`` as a two-column table (headline ones first)."""
    scal = {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    order = [k for k in HEADLINE_METRICS if k in scal] + sorted(k for k in scal if k not in HEADLINE_METRICS)
    return pd.DataFrame({"metric": order, "value": [scal[k] for k in order]}).set_index("metric")


def plot_per_class_ap(per_class: Mapping[str, float | None], per_class50: Mapping[str, float | None] | None = None) -> plt.Figure:
    names = sorted(per_class)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(names) + 2), 3.6))
    if not names:
        note(ax, "no class has ground truth: per-class AP undefined")
        return fig
    x = np.arange(len(names))
    ap = [np.nan if per_class[n] is None else per_class[n] for n in names]
    w = 0.4 if per_class50 else 0.8
    ax.bar(x - (w / 2 if per_class50 else 0), ap, width=w, label="AP@[.5:.95]", color="C0")
    if per_class50:
        ax.bar(x + w / 2, [np.nan if per_class50.get(n) is None else per_class50.get(n) for n in names], width=w,
               label="AP@.5", color="C1")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP")
    ax.set_title("per-class bbox AP")
    ax.legend(fontsize=7)
    if np.nanmax(np.nan_to_num(ap, nan=0.0)) == 0:
        note(ax, "every class has AP 0 (an under-trained model?)")
    fig.tight_layout()
    return fig


def plot_pr_curves(recall: Sequence[float], curves: Mapping[str, Sequence[float]]) -> plt.Figure:
    """Interpolated precision-recall at IoU 0.5, one line per class (``-1`` = undefined is dropped)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    r = np.asarray(recall, dtype=float)
    drawn = 0
    for i, (name, p) in enumerate(sorted(curves.items())):
        p = np.asarray(p, dtype=float)
        ok = p > -1
        if ok.any():
            ax.plot(r[ok], p[ok], label=name, lw=1.2, color=plt.cm.tab20(i % 20))
            drawn += 1
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("PR curves, IoU 0.5")
    if drawn:
        ax.legend(fontsize=6, ncol=2, loc="lower left")
    if not drawn or all(np.all(np.asarray(p) <= 0) for p in curves.values()):
        note(ax, "no true positive at IoU 0.5: precision is 0 everywhere")
    fig.tight_layout()
    return fig


def object_bins(obj: Mapping[str, Any]) -> tuple[str, list[int]]:
    """``(kind, [bins])`` of a GT (coord-token strings) or predicted (ints) object."""
    from coordexp.codec import parse_coord_token
    from coordexp.eval.metrics import object_geometry

    kind, coords = object_geometry(obj)
    return kind, [c if isinstance(c, int) else parse_coord_token(c) for c in coords]


def box_bins(kind: str, bins: Sequence[int]) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` in bins: the box itself, or the box around a polygon's / line's points."""
    if kind == "bbox_2d":
        return tuple(int(b) for b in bins[:4])  # type: ignore[return-value]
    xs, ys = bins[0::2], bins[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def match_objects(gt_records: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]],
                  iou_thr: float = 0.1) -> pd.DataFrame:
    """Per-coordinate errors (prediction - GT, in bins) of GT/prediction pairs matched per image.

    Matching is one-to-one Hungarian on box IoU among same-``desc`` pairs with IoU >= ``iou_thr``
    (:func:`coordexp.eval.metrics.match_image`). Errors are compared on ``(x1, y1, x2, y2)`` bins:
    the box itself for ``bbox_2d``, the enclosing box for polygons and lines (vertex order is not
    comparable between a prediction and its GT). One row per coordinate: image_id, desc, kind,
    iou, coord, axis (x|y), gt_bin, pred_bin, error.
    """
    from coordexp.eval.metrics import match_image

    preds = {int(p["id"]): p for p in predictions}
    rows = []
    for rec in gt_records:
        pred = preds.get(int(rec["id"]))
        if not pred:
            continue
        g = [(o["desc"],) + object_bins(o) for o in rec["objects"]]
        p = []
        for o in pred.get("objects", []):
            try:
                p.append((o["desc"],) + object_bins(o))
            except (ValueError, KeyError, TypeError):
                continue
        gb = [(d, box_bins(k, b)) for d, k, b in g]
        pb = [(d, box_bins(k, b)) for d, k, b in p]
        for gi, pi, iou in match_image(gb, pb, iou_thr):
            for j, coord in enumerate(("x1", "y1", "x2", "y2")):
                gv, pv = gb[gi][1][j], pb[pi][1][j]
                rows.append({"image_id": int(rec["id"]), "desc": g[gi][0], "kind": g[gi][1], "iou": iou,
                             "coord": coord, "axis": coord[0], "gt_bin": gv, "pred_bin": pv, "error": pv - gv})
    cols = ["image_id", "desc", "kind", "iou", "coord", "axis", "gt_bin", "pred_bin", "error"]
    return pd.DataFrame(rows, columns=cols)


def plot_coord_errors(errors: pd.DataFrame, n_gt: int | None = None) -> plt.Figure:
    """Histograms of signed coordinate errors in bins, one panel per axis."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, axis in zip(axes, ("x", "y")):
        e = errors.loc[errors["axis"] == axis, "error"].to_numpy(dtype=float) if len(errors) else np.array([])
        ax.set_title(f"{axis} error (pred - GT), bins")
        ax.set_xlabel("bins")
        if len(e):
            lim = max(5.0, float(np.percentile(np.abs(e), 99)))
            ax.hist(np.clip(e, -lim, lim), bins=41, range=(-lim, lim), color="C0" if axis == "x" else "C2")
            ax.axvline(0, color="k", lw=0.8)
            ax.text(0.02, 0.95, f"n={len(e)}\nmean={e.mean():.1f}\nMAE={np.abs(e).mean():.1f}", va="top",
                    transform=ax.transAxes, fontsize=7)
        else:
            note(ax, "no prediction matched a GT object\n(same desc, IoU >= threshold)")
    axes[0].set_ylabel("coordinates")
    if n_gt is not None:
        fig.suptitle(f"matched objects: {len(errors) // 4 if len(errors) else 0} of {n_gt} GT", fontsize=9)
    fig.tight_layout()
    return fig


def _draw_object(ax: plt.Axes, kind: str, pts: Sequence[float], color: str, ls: str, label: str | None) -> None:
    """Outline one object; a white halo keeps it visible on shapes of any colour."""
    from matplotlib import patheffects
    from matplotlib.patches import Polygon, Rectangle

    halo = [patheffects.Stroke(linewidth=3.2, foreground="white"), patheffects.Normal()]
    if kind == "bbox_2d":
        x1, y1, x2, y2 = pts[:4]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, ls=ls, lw=1.4, path_effects=halo))
    elif kind == "poly":
        ax.add_patch(Polygon(np.reshape(pts, (-1, 2)), closed=True, fill=False, ec=color, ls=ls, lw=1.4,
                             path_effects=halo))
    else:
        ax.plot(pts[0::2], pts[1::2], color=color, ls=ls, lw=1.6, path_effects=halo)
    if label:
        ax.text(pts[0], pts[1], label, color="white", fontsize=5, va="bottom",
                bbox={"fc": color, "ec": "none", "pad": 0.5, "alpha": 0.85})


GT_COLOR, PRED_COLOR = "black", "#e7298a"


def plot_predictions_grid(gt_records: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]],
                          image_root: str | Path, n: int = 6, ncols: int = 3) -> plt.Figure:
    """Val images with ground truth (black, solid) and predictions (pink, dashed, with desc and score)."""
    from PIL import Image

    from coordexp.codec import decode_xy

    preds = {int(p["id"]): p for p in predictions}
    recs = list(gt_records)[:n]
    fig, axes = grid(max(1, len(recs)), ncols, size=(3.2, 3.5))
    if not recs:
        note(axes[0], "no val records")
        return fig
    for ax, rec in zip(axes, recs):
        w, h = rec["width"], rec["height"]
        with Image.open(Path(image_root) / rec["images"][0]) as im:
            ax.imshow(np.asarray(im.convert("RGB")), extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
        for o in rec["objects"]:
            kind, bins = object_bins(o)
            _draw_object(ax, kind, decode_xy(bins, w, h), GT_COLOR, "-", None)
        pred = preds.get(int(rec["id"]), {})
        n_pred = 0
        for o in pred.get("objects", []):
            try:
                kind, bins = object_bins(o)
                pts = decode_xy(bins, w, h)
            except (ValueError, KeyError, TypeError):
                continue
            score = o.get("score")
            s = f" {score:.2f}" if isinstance(score, (int, float)) and math.isfinite(score) else ""
            _draw_object(ax, kind, pts, PRED_COLOR, "--", f"{o.get('desc', '?')}{s}")
            n_pred += 1
        ok = pred.get("ok")
        ax.set_title(f"id {rec['id']}: {len(rec['objects'])} GT, {n_pred} pred{'' if ok else ' (parse problems)'}",
                     fontsize=7)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    fig.suptitle("black: ground truth; pink dashed: prediction (desc score)", fontsize=8)
    fig.tight_layout()
    return fig


def gaussian_target(center: int, sigma: float, truncate: int, k: int = 1000) -> np.ndarray:
    """The Stage-1 soft target over ``k`` bins: a Gaussian around ``center`` cut at ``truncate``,
    normalised (same definition as :func:`coordexp.losses.soft_target_table`, in numpy)."""
    i = np.arange(k, dtype=np.float64)
    d = i - center
    w = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= truncate)
    return w / w.sum()


def coord_distributions(checkpoint: str | Path, record: Any, image_root: str | Path, n_positions: int = 4,
                        temperature: float = 1.0) -> list[dict[str, Any]]:
    """Teacher-forced coord distributions of ``checkpoint`` on one record.

    Encodes the record with the training template, runs one forward pass, and for the first
    ``n_positions`` coord labels returns ``{"position", "target_bin", "probs"[1000], "coord_mass"}``:
    the softmax over the 1000 coord logits in bin order (temperature as in training), and the
    probability mass the full-vocabulary softmax puts on coord tokens at that position.
    Logits at ``t - 1`` predict the label at ``t`` (swift passes labels unshifted).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from coordexp.losses import coord_ids_in_bin_order
    from coordexp.template import encode_record, load_template
    from coordexp.vocab import coord_id_map

    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    # one forward pass: keep the report readable (no swift banner, no weight-loading progress bar)
    from swift.utils import get_logger

    get_logger().setLevel(logging.ERROR)  # initialise swift's logger first, or it resets the level later
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    ckpt = Path(checkpoint)
    tpl = load_template(ckpt, mode="train")
    enc = encode_record(tpl, record, image_root)
    batch = tpl.data_collator([enc])
    cmap = coord_id_map(ckpt, tpl.processor.tokenizer if hasattr(tpl.processor, "tokenizer") else None)
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), local_files_only=True).eval()
    ordered = coord_ids_in_bin_order(cmap)
    labels = batch["labels"][0]
    cpos = [int(t) for t in torch.nonzero((labels >= 0) & (cmap[labels.clamp(min=0)] >= 0)).flatten()[:n_positions]]
    inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    out = []
    for t in cpos:
        z = logits[t - 1]
        full = torch.softmax(z, dim=-1)
        probs = torch.softmax(z[ordered] / temperature, dim=-1)
        out.append({"position": t, "target_bin": int(cmap[labels[t]]), "probs": probs.numpy().astype(np.float64),
                    "coord_mass": float(full[ordered].sum())})
    return out


def plot_coord_distributions(dists: Sequence[Mapping[str, Any]], sigma: float, truncate: int,
                             window: int = 60) -> plt.Figure:
    """Predicted coord distribution (bars) against the soft target (line), zoomed around the GT bin,
    with the full 0..999 range in an inset line so mass far from the target is visible too. The y axis
    is logarithmic: an untrained model's near-uniform 1e-3 would be invisible next to a 0.2 peak."""
    floor = 1e-5
    fig, axes = grid(max(1, len(dists)), 2, size=(4.4, 3.0))
    if not dists:
        note(axes[0], "no coord label in the sample")
        return fig
    for ax, d in zip(axes, dists):
        k = d["target_bin"]
        p = np.asarray(d["probs"])
        q = gaussian_target(k, sigma, truncate, len(p))
        lo, hi = max(0, k - window), min(len(p) - 1, k + window)
        x = np.arange(lo, hi + 1)
        ax.step(x, np.maximum(p[lo:hi + 1], floor), where="mid", color="C0", lw=1.0, label="predicted")
        ax.plot(x, np.where(q[lo:hi + 1] > 0, q[lo:hi + 1], np.nan), color="C3", lw=1.3,
                label=f"target (sigma={sigma:g}, trunc={truncate})")
        ax.axhline(1.0 / len(p), color="0.5", lw=0.6, ls="--", label="uniform")
        ax.set_yscale("log")
        ax.set_ylim(floor, 1.0)
        ax.axvline(k, color="k", lw=0.6, ls=":")
        ax.set_title(f"position {d['position']}: GT bin {k}, argmax {int(p.argmax())}, "
                     f"coord mass {d['coord_mass']:.2f}", fontsize=7)
        ax.set_xlabel("bin")
        ax.legend(fontsize=6, loc="upper right")
        ins = ax.inset_axes([0.03, 0.66, 0.3, 0.3])
        ins.plot(np.arange(len(p)), p, color="C0", lw=0.6)
        ins.axvline(k, color="C3", lw=0.6)
        ins.set_xticks([0, 999])
        ins.set_yticks([])
        ins.tick_params(labelsize=5)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# run comparison


def plot_metric_vs_params(runs: pd.DataFrame, metric: str = "bbox_mAP",
                          params: Sequence[str] = LOSS_WEIGHTS + ("cfg.train.coord_soft_ce_w1.target_sigma",)) -> plt.Figure:
    """``metric`` against each loss weight / ablation knob of the Stage-1 runs, one scatter per knob.

    CE-baseline runs do not use these knobs, so they are a horizontal line (their mean) rather than
    points at a meaningless weight.
    """
    fig, axes = grid(len(params), 4, size=(3.3, 2.8))
    for ax, p in zip(axes, params):
        short = p.replace("cfg.train.coord_soft_ce_w1.", "")
        ax.set_title(f"{metric} vs {short}")
        ax.set_xlabel(short)
        ax.set_ylabel(metric)
        if p not in runs or metric not in runs or runs[metric].notna().sum() == 0:
            note(ax, f"no evaluated run\nwith {metric}", fontsize=7)
            continue
        d = runs.dropna(subset=[metric])
        s1 = d[d["loss_kind"] == "stage1_softce_w1"]
        base = d[d["loss_kind"] == "ce_baseline"]
        if len(s1):
            ax.scatter(pd.to_numeric(s1[p], errors="coerce"), s1[metric], color="C0", s=28, label="Stage-1 runs")
        if len(base):
            ax.axhline(base[metric].mean(), color="C3", ls="--", lw=1.0, label=f"CE baseline (n={len(base)})")
        ax.legend(fontsize=6, loc="lower right")
        if s1[p].astype(str).nunique() < 2:
            note(ax, f"one value of {short} so far:\nnot enough runs for a trend", fontsize=7, y=0.85)
    fig.tight_layout()
    return fig


def histories_for_runs(tracking_uri: str, run_ids: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """Long metric histories (run_id, key, step, value) of several runs, for overlaid curves."""
    frames = []
    for rid in run_ids:
        h = metric_history(tracking_uri, rid, keys)
        h.insert(0, "run_id", rid)
        frames.append(h)
    if not frames:
        return pd.DataFrame(columns=["run_id", "key", "step", "value", "timestamp"])
    return pd.concat(frames, ignore_index=True)


def plot_overlaid_curves(hist: pd.DataFrame, labels: Mapping[str, str],
                         keys: Sequence[str] = ("loss", "eval_loss", "coord_softce_w1/w1", "coord_softce_w1/coord_vocab_mass")) -> plt.Figure:
    fig, axes = grid(len(keys), 2, size=(4.4, 2.9))
    for ax, key in zip(axes, keys):
        d = hist[hist["key"] == key] if len(hist) else hist
        for i, rid in enumerate(labels):
            s = d[d["run_id"] == rid].sort_values("step", kind="stable")
            if len(s):
                ax.plot(s["step"], s["value"], label=labels[rid], color=plt.cm.tab10(i % 10), lw=1.2,
                        marker="o" if len(s) < 4 else None, ms=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        if len(d):
            ax.legend(fontsize=6)
        else:
            note(ax, f"{key}\nnot logged by any run")
    if len(labels) < 2:
        fig.suptitle("only one training run in the experiment: nothing to compare yet", fontsize=8)
    fig.tight_layout()
    return fig


def loss_kind_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, min, max and count of the headline metrics per ``coordexp.loss`` kind (empty when no
    run has been evaluated yet)."""
    present = [m for m in HEADLINE_METRICS if m in runs and runs[m].notna().any()]
    if runs.empty or not present:
        return pd.DataFrame(index=pd.Index([], name="loss_kind"))
    return runs.groupby("loss_kind")[present].agg(["mean", "min", "max", "count"])


def plot_loss_kinds(runs: pd.DataFrame, metrics: Sequence[str] = ("bbox_mAP", "bbox_mAP50", "f1@0.5", "parse_rate")) -> plt.Figure:
    """CE baseline vs Stage-1: mean of each metric over the runs of each ``coordexp.loss`` kind,
    with every run as a dot (so one lucky seed does not pass for a trend)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    kinds = ["ce_baseline", "stage1_softce_w1"]
    present = [m for m in metrics if m in runs]
    if not present or runs.empty:
        note(ax, "no evaluated runs")
        return fig
    x = np.arange(len(present))
    w = 0.38
    for i, kind in enumerate(kinds):
        s = runs[runs["loss_kind"] == kind]
        if s.empty:
            continue
        means = [s[m].mean() for m in present]
        off = (i - 0.5) * w
        ax.bar(x + off, means, width=w, label=f"{kind} (n={len(s)})", color=("C3", "C0")[i], alpha=0.8)
        for j, m in enumerate(present):
            ax.scatter(np.full(len(s), x[j] + off), s[m], color="k", s=8, zorder=3)
    ax.set_xticks(x, present)
    ax.set_ylim(0, 1)
    ax.set_title("CE baseline vs Stage-1 (bars: mean over runs, dots: runs)")
    ax.legend(fontsize=7)
    missing = [k for k in kinds if not (runs["loss_kind"] == k).any()]
    if missing:
        note(ax, "not enough runs: no " + " / ".join(missing) + " run yet\n"
             "(dvc exp run -S train.coord_soft_ce_w1.enabled=false for the baseline)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# the report stage


NOTEBOOKS: tuple[str, ...] = ("training_diagnostics", "eval_report", "compare_runs")
KERNEL = "python3"


class ReportError(StageError):
    """A notebook failed or did not produce its figures; the message names the notebook and cell."""


def notebook_parameters(params: Any, root: Path, figures_dir: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """papermill parameters of each notebook, all derived from ``params.yaml`` (paths relative to the root)."""
    from coordexp import paths, tracking
    from coordexp.training import FINAL_DIR, RUN_ID_FILE

    def rel(p: Path) -> str:
        p = Path(p)
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    common = {
        "run_id": run_id,
        "run_id_file": rel(paths.resolve(params.train.out_dir, root) / RUN_ID_FILE),
        "params_file": rel(paths.params_file(root)),
        "tracking_uri": tracking.tracking_uri(params, root),
        "experiment": params.tracking.experiment,
        "figures_dir": rel(figures_dir),
    }
    pre = paths.resolve(params.preprocess.out_dir, root)
    return {
        "training_diagnostics": {**common,
                                 "history_csv": rel(paths.resolve(params.report.out_dir, root) / "train_history.csv")},
        "eval_report": {**common, "metrics_json": rel(paths.metrics_dir(root) / "eval.json"),
                        "eval_dir": rel(paths.resolve(params.evaluate.out_dir, root)),
                        "val_jsonl": rel(pre / f"{params.evaluate.split}.jsonl"),
                        "checkpoint": rel(paths.resolve(params.train.out_dir, root) / FINAL_DIR)},
        "compare_runs": dict(common),
    }


def check_figures(figures_dir: Path, notebook: str) -> list[Path]:
    """The expected figures of ``notebook`` (PNG and PDF), or :class:`ReportError` naming the missing ones."""
    expected = [figures_dir / f"{stem}.{ext}" for stem in EXPECTED_FIGURES[notebook] for ext in ("png", "pdf")]
    missing = [p.name for p in expected if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise ReportError(f"notebook {notebook} did not save {missing} in {figures_dir}")
    return expected


def render_reports(params: Any, root: Path) -> dict[str, Any]:
    """Execute the three notebooks with papermill, convert them to HTML, log everything to MLflow.

    Outputs (under ``report.out_dir``): ``notebooks/<name>.ipynb`` (executed), ``html/<name>.html``
    and ``figures/*.{png,pdf}`` (saved by the notebooks). The three folders are emptied first so a
    figure that a notebook stopped producing does not linger in the committed report.
    """
    import shutil

    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    from coordexp import paths, tracking
    from coordexp.training import run_id_of

    out = paths.resolve(params.report.out_dir, root)
    nb_dir, html_dir, fig_dir = out / "notebooks", out / "html", out / "figures"
    run_id = run_id_of(params, root)
    if not run_id:
        raise FileNotFoundError(f"{paths.resolve(params.train.out_dir, root)}/mlflow_run_id: missing; run "
                                "`dvc repro train` first")
    for need in (paths.metrics_dir(root) / "eval.json",
                 paths.resolve(params.evaluate.out_dir, root) / "predictions.jsonl"):
        if not need.is_file():
            raise FileNotFoundError(f"{need}: missing; run `dvc repro evaluate` first")
    tracking.check_reachable(tracking.tracking_uri(params, root))
    for d in (nb_dir, html_dir, fig_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    nb_params = notebook_parameters(params, root, fig_dir, run_id)
    exporter = HTMLExporter()
    figures: list[Path] = []
    for name in NOTEBOOKS:
        src, dst = root / "notebooks" / f"{name}.ipynb", nb_dir / f"{name}.ipynb"
        print(f"[report] executing {src.relative_to(root)} -> {dst.relative_to(root)}", flush=True)
        try:
            pm.execute_notebook(str(src), str(dst), parameters=nb_params[name], kernel_name=KERNEL, cwd=str(root),
                                progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as exc:
            raise ReportError(f"notebook {name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                              f"(the executed notebook with the traceback is {dst})") from None
        body, _ = exporter.from_notebook_node(nbformat.read(dst, as_version=4))
        (html_dir / f"{name}.html").write_text(body, encoding="utf-8")
        figures += check_figures(fig_dir, name)
    with tracking.stage_run(params, "report", run_id=run_id, run_name="report"):
        import mlflow

        mlflow.log_artifacts(str(fig_dir), "report/figures")
        mlflow.log_artifacts(str(html_dir), "report/html")
    all_figs = sorted(p.name for p in fig_dir.iterdir())
    return {"run_id": run_id, "notebooks": list(NOTEBOOKS), "figures": all_figs}
