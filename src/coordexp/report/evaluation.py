"""The eval-report notebook: the metrics of ``eval.json``, mAP by coordinate readout and by object score,
the reliability of the headline score, per-class AP, PR curves, predictions drawn over the ground truth,
and coordinate errors of matched objects.

GT objects carry coord-token strings and predictions carry bins as numbers (fractional when read from the
distribution); both are compared in bins (``0..K-1``), so an error of 1 is one bin whatever the image size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.patches import Polygon, Rectangle

from coordexp.core import imaging, paths
from coordexp.core.codec import decode_xy, parse_coord_token
from coordexp.core.geometry import geometry_of
from coordexp.evaluate.metrics import HEADLINE_METRICS, match_image
from coordexp.report.figures import grid, note

GT_COLOR, PRED_COLOR = "black", "#e7298a"


def metrics_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Scalar metrics of ``reports/metrics/eval.json`` as a two-column table (headline ones first)."""
    scal = {
        k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str)) and not isinstance(v, bool)
    }
    order = [k for k in HEADLINE_METRICS if k in scal] + sorted(k for k in scal if k not in HEADLINE_METRICS)
    return pd.DataFrame({"metric": order, "value": [scal[k] for k in order]}).set_index("metric")


def plot_per_class_ap(
    per_class: Mapping[str, float | None], per_class50: Mapping[str, float | None] | None = None
) -> plt.Figure:
    """Bars of AP@[.5:.95] (and AP@.5 beside them when given) per class; undefined AP is a gap."""
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
        ax.bar(
            x + w / 2,
            [np.nan if per_class50.get(n) is None else per_class50.get(n) for n in names],
            width=w,
            label="AP@.5",
            color="C1",
        )
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


def object_bins(obj: Mapping[str, Any]) -> tuple[str, list[float]]:
    """``(kind, [bins])`` of a GT (coord-token strings) or predicted object (ints, or floats for a coordinate
    read from the distribution: :mod:`coordexp.evaluate.readout`)."""
    kind, coords = geometry_of(obj)
    return kind, [parse_coord_token(c) if isinstance(c, str) else c for c in coords]


def box_bins(kind: str, bins: Sequence[float]) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` in bins: the box itself, or the box around a polygon's / line's points.

    Unlike :func:`coordexp.core.geometry.enclosing_box`, no side is widened to one unit: errors stay
    whole bins, and a line along an axis has a zero-area box that matches nothing.
    """
    if kind == "bbox_2d":
        return tuple(bins[:4])
    xs, ys = bins[0::2], bins[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def match_objects(
    gt_records: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]], iou_thr: float = 0.1
) -> pd.DataFrame:
    """Per-coordinate errors (prediction - GT, in bins) of GT/prediction pairs matched per image.

    Matching is one-to-one Hungarian on box IoU among same-``desc`` pairs with IoU >= ``iou_thr``
    (:func:`coordexp.evaluate.metrics.match_image`). Errors are compared on ``(x1, y1, x2, y2)`` bins:
    the box itself for ``bbox_2d``, the enclosing box for polygons and lines (vertex order is not
    comparable between a prediction and its GT). One row per coordinate: image_id, desc, kind,
    iou, coord, axis (x|y), gt_bin, pred_bin, error.
    """
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
                rows.append(
                    {
                        "image_id": int(rec["id"]),
                        "desc": g[gi][0],
                        "kind": g[gi][1],
                        "iou": iou,
                        "coord": coord,
                        "axis": coord[0],
                        "gt_bin": gv,
                        "pred_bin": pv,
                        "error": pv - gv,
                    }
                )
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
            ax.text(
                0.02,
                0.95,
                f"n={len(e)}\nmean={e.mean():.1f}\nMAE={np.abs(e).mean():.1f}",
                va="top",
                transform=ax.transAxes,
                fontsize=7,
            )
        else:
            note(ax, "no prediction matched a GT object\n(same desc, IoU >= threshold)")
    axes[0].set_ylabel("coordinates")
    if n_gt is not None:
        fig.suptitle(f"matched objects: {len(errors) // 4 if len(errors) else 0} of {n_gt} GT", fontsize=9)
    fig.tight_layout()
    return fig


def _draw_object(ax: plt.Axes, kind: str, pts: Sequence[float], color: str, ls: str, label: str | None) -> None:
    """Outline one object; a white halo keeps it visible on shapes of any colour."""
    halo = [patheffects.Stroke(linewidth=3.2, foreground="white"), patheffects.Normal()]
    if kind == "bbox_2d":
        x1, y1, x2, y2 = pts[:4]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, ls=ls, lw=1.4, path_effects=halo))
    elif kind == "poly":
        ax.add_patch(
            Polygon(np.reshape(pts, (-1, 2)), closed=True, fill=False, ec=color, ls=ls, lw=1.4, path_effects=halo)
        )
    else:
        ax.plot(pts[0::2], pts[1::2], color=color, ls=ls, lw=1.6, path_effects=halo)
    if label:
        ax.text(
            pts[0],
            pts[1],
            label,
            color="white",
            fontsize=5,
            va="bottom",
            bbox={"fc": color, "ec": "none", "pad": 0.5, "alpha": 0.85},
        )


def plot_predictions_grid(
    gt_records: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    n: int = 6,
    ncols: int = 3,
) -> plt.Figure:
    """Val images with ground truth (black, solid) and predictions (pink, dashed, with desc and score)."""
    preds = {int(p["id"]): p for p in predictions}
    recs = list(gt_records)[:n]
    fig, axes = grid(max(1, len(recs)), ncols, size=(3.2, 3.5))
    if not recs:
        note(axes[0], "no val records")
        return fig
    for ax, rec in zip(axes, recs):
        w, h = rec["width"], rec["height"]
        with imaging.load(paths.inside(image_root, rec["images"][0], where=f"record {rec['id']}: image")) as im:
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
        ax.set_title(
            f"id {rec['id']}: {len(rec['objects'])} GT, {n_pred} pred{'' if ok else ' (parse problems)'}", fontsize=7
        )
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    fig.suptitle("black: ground truth; pink dashed: prediction (desc score)", fontsize=8)
    fig.tight_layout()
    return fig


READOUT_METRICS: tuple[str, ...] = ("bbox_mAP", "bbox_mAP50", "bbox_mAP75", "f1_at_0.5")
"""What each coordinate readout is judged by in ``eval.json``'s ``readouts`` block."""


def readouts_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One row per coordinate readout of ``eval.json`` (``readouts``): the same generation, each coordinate
    read from the coord distribution another way, so the rows differ only by how coordinates are read.
    The headline readout (``readout``) is marked. Empty when the evaluation predates readouts."""
    block = metrics.get("readouts") or {}
    rows = [{"readout": name, **{m: vals.get(m) for m in READOUT_METRICS}} for name, vals in block.items()]
    df = pd.DataFrame(rows, columns=["readout", *READOUT_METRICS]).set_index("readout")
    df.insert(0, "headline", [name == metrics.get("readout") for name in df.index])
    return df


def scores_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One row per object-score definition of ``eval.json`` (``scores``): AP depends on the ranking only,
    so these rows tell which confidence orders detections best. The headline score (``score``) is marked."""
    block = metrics.get("scores") or {}
    cols = sorted({k for vals in block.values() for k in vals})
    df = pd.DataFrame([{"score": n, **v} for n, v in block.items()], columns=["score", *cols]).set_index("score")
    df.insert(0, "headline", [name == metrics.get("score") for name in df.index])
    return df


def plot_readouts(metrics: Mapping[str, Any]) -> plt.Figure:
    """mAP, mAP50, mAP75 and F1@0.5 per readout, side by side: what reading coordinates from the distribution
    (expectation, median, a local expectation) buys over the emitted arg-max token, on one generation."""
    table = readouts_table(metrics)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    if table.empty:
        note(ax, "eval.json has no per-readout metrics\n(evaluate again with this version of the workbench)")
        return fig
    x = np.arange(len(READOUT_METRICS))
    w = 0.8 / len(table)
    for i, (name, row) in enumerate(table.iterrows()):
        vals = [np.nan if row[m] is None else float(row[m]) for m in READOUT_METRICS]
        label = f"{name} (headline)" if row["headline"] else name
        bars = ax.bar(x + (i - (len(table) - 1) / 2) * w, vals, width=w, label=label, color=f"C{i}")
        if row["headline"]:
            for b in bars:
                b.set_edgecolor("k")
                b.set_linewidth(1.2)
    ax.set_xticks(x, READOUT_METRICS)
    top = np.nanmax(table[list(READOUT_METRICS)].to_numpy(dtype=float)) if len(table) else 1.0
    ax.set_ylim(0, min(1.0, 1.15 * top) if np.isfinite(top) and top > 0 else 1.0)
    ax.set_title(f"coordinate readouts of one generation (decoding: {metrics.get('decoding', '?')})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_reliability(calibration: Mapping[str, Any] | None) -> plt.Figure:
    """Reliability diagram of the headline object score: per score bin, the fraction of predictions matched
    to a ground-truth object at IoU >= 0.5 against the mean score (the diagonal is perfect calibration), with
    the share of predictions per bin below; the fitted curve, when a fit ran, is scored on the half it was
    not fitted on."""
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(4.8, 5.2), height_ratios=(3, 1), sharex=True)
    bins = list((calibration or {}).get("bins") or [])
    if not bins:
        note(ax, "no calibration in eval.json\n(evaluate again with this version of the workbench)")
        return fig
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    for key, label, color in (("bins", "raw score", "C0"), ("bins_fitted", "fitted (held-out half)", "C1")):
        rows = [b for b in (calibration.get(key) or []) if b.get("count")]
        if not rows:
            continue
        ece = calibration.get("ece" if key == "bins" else "ece_fitted")
        lab = f"{label}, ECE {ece:.3f}" if isinstance(ece, (int, float)) else label
        ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], "o-", color=color, label=lab)
    total = sum(b.get("count", 0) for b in bins) or 1
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    axn.bar(centers, [b.get("count", 0) / total for b in bins], width=[b["hi"] - b["lo"] for b in bins], color="C0")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="matched at IoU>=0.5")
    ax.set_title(f"reliability of the object score {calibration.get('score', '')}".strip(), fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    axn.set(xlabel="score", ylabel="share")
    return fig
