"""Small data files for ``dvc plots``: training curves, the PR curve, per-class AP and mAP by coordinate readout.

``dvc plots show`` / ``dvc plots diff`` draw a CSV column against another and cannot filter rows, so
the mixed train/eval rows of ``reports/train_history.csv`` are split into one file per split, and the
evaluation's COCO numbers are flattened into two tables. The columns are fixed (a metric a run did
not log is an empty column), so every declared plot in ``dvc.yaml`` finds its fields in every
experiment, also the CE baseline's. The files are a function of DVC-tracked inputs only and are
written with a fixed float format, so an unchanged input rewrites the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from coordexp.core.io import atomic_open

TRAIN_CURVES: tuple[str, ...] = (
    "loss",
    "coord_softce_w1/text_ce",
    "coord_softce_w1/soft_ce",
    "coord_softce_w1/w1",
    "coord_softce_w1/gate",
    "coord_softce_w1/coord_vocab_mass",
    "token_acc",
    "learning_rate",
    "learning_rate/vit",
    "learning_rate/aligner",
)
"""Columns of ``reports/plots/train.csv`` (after ``step``): the loss terms, coord-vocab mass, token
accuracy and the three learning rates (decoder, vision tower, merger)."""

EVAL_CURVES: tuple[str, ...] = TRAIN_CURVES[:7]
"""Columns of ``reports/plots/eval.csv``: the teacher-forced eval metrics (no learning rates)."""

FILES: dict[str, str] = {
    "train": "train.csv",
    "eval": "eval.csv",
    "pr_curve": "pr_curve.csv",
    "per_class_ap": "per_class_ap.csv",
    "readouts": "readouts.csv",
}
"""The files under ``<report.out_dir>/plots`` (``dvc.yaml``'s top-level ``plots`` name them)."""

FLOAT_FORMAT = "%.8g"
"""Eight significant digits: what the history CSV holds, and stable across reruns."""


def history_frames(hist: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, eval)`` rows of a history (``step``, ``split``, metric columns), each with ``step``
    and the fixed curve columns, sorted by step."""
    out = []
    for split, cols in (("train", TRAIN_CURVES), ("eval", EVAL_CURVES)):
        rows = hist[hist["split"] == split] if "split" in hist else hist.iloc[0:0]
        frame = pd.DataFrame({"step": pd.to_numeric(rows.get("step"), errors="coerce")}, index=rows.index)
        for c in cols:
            frame[c] = pd.to_numeric(rows[c], errors="coerce") if c in rows else np.nan
        frame = frame.dropna(subset=["step"]).astype({"step": int})
        frame = frame[frame[list(cols)].notna().any(axis=1)] if len(frame) else frame
        out.append(frame.sort_values("step", kind="stable").reset_index(drop=True))
    return out[0], out[1]


def pr_curve_frame(recall: Sequence[float], curves: dict[str, Sequence[float]]) -> pd.DataFrame:
    """The class-mean interpolated precision at IoU 0.5 over COCO's 101 recall points.

    One curve per experiment is what ``dvc plots diff`` can overlay readably; its area is the
    mAP50. Per-class curves stay in the ``eval_pr_curves`` figure. A recall point where no class
    has a defined precision (``-1``) is left out.
    """
    r = np.asarray(recall, dtype=float)
    if not curves:
        return pd.DataFrame({"recall": pd.Series(dtype=float), "precision": pd.Series(dtype=float)})
    p = np.asarray([curves[k] for k in sorted(curves)], dtype=float)
    p = np.where(p > -1, p, np.nan)
    defined = np.isfinite(p).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(defined > 0, np.nansum(p, axis=0) / np.maximum(defined, 1), np.nan)
    keep = np.isfinite(mean)
    return pd.DataFrame({"recall": r[keep], "precision": mean[keep]})


def per_class_ap_frame(per_class: dict[str, float], per_class50: dict[str, float]) -> pd.DataFrame:
    """One row per class with ground truth: ``class``, ``AP`` (AP@[.5:.95]) and ``AP50``, by name."""
    names = sorted(per_class)
    return pd.DataFrame(
        {
            "class": names,
            "AP": [per_class[n] for n in names],
            "AP50": [per_class50.get(n, np.nan) for n in names],
        }
    )


READOUTS: tuple[str, ...] = ("argmax", "expectation", "median", "local_expectation")
"""Rows of ``reports/plots/readouts.csv``, in this order whatever ``eval.json`` holds (a missing one is empty),
so ``dvc plots diff`` lines the experiments up readout by readout."""


def readouts_frame(metrics: dict) -> pd.DataFrame:
    """One row per coordinate readout: ``readout``, ``bbox_mAP50``, ``bbox_mAP`` from ``eval.json``'s
    ``readouts`` block: the same generation with coordinates read four ways, one bar each per experiment."""
    block = metrics.get("readouts") or {}
    return pd.DataFrame(
        {
            "readout": list(READOUTS),
            "bbox_mAP50": [(block.get(r) or {}).get("bbox_mAP50", np.nan) for r in READOUTS],
            "bbox_mAP": [(block.get(r) or {}).get("bbox_mAP", np.nan) for r in READOUTS],
        }
    ).astype({"bbox_mAP50": float, "bbox_mAP": float})


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


def write_plot_data(history_csv: Path, eval_dir: Path, out_dir: Path, eval_json: Path) -> list[Path]:
    """Write the plot files from the train stage's history, the evaluate stage's COCO files and ``eval.json``.

    Reads ``coco_gt.json`` / ``coco_results.json`` of ``eval_dir`` and scores them again with
    pycocotools (a second of work on the val split), so the evaluate stage's outputs stay as they are.
    """
    # lazy: pycocotools is only needed here, not by the notebooks that import this package
    from coordexp.evaluate.metrics import coco_map
    from coordexp.report.runs import load_history

    hist, _ = load_history(history_csv)
    train, ev = history_frames(hist)
    gt = json.loads((eval_dir / "coco_gt.json").read_text())
    results = json.loads((eval_dir / "coco_results.json").read_text())
    box = coco_map(gt, results, "bbox")
    frames = {
        "train": train,
        "eval": ev,
        "pr_curve": pr_curve_frame(box.recall_thresholds, box.pr_curves_50),
        "per_class_ap": per_class_ap_frame(box.per_class_ap, box.per_class_ap50),
        "readouts": readouts_frame(json.loads(eval_json.read_text())),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, frame in frames.items():
        path = out_dir / FILES[key]
        with atomic_open(path, newline="") as fh:
            fh.write(_csv(frame))
        written.append(path)
    return written
