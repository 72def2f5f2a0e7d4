"""The compare-runs notebook: the runs of an experiment side by side (params, metrics, curves) and
the CE baseline against Stage-1.

Works on the frames of :mod:`coordexp.report.runs`. An experiment with a single run, or with no
evaluated run yet, still gives every figure, with a note saying what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from coordexp.evaluate.metrics import HEADLINE_METRICS
from coordexp.report.figures import grid, note

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


def plot_metric_vs_params(
    runs: pd.DataFrame,
    metric: str = "bbox_mAP",
    params: Sequence[str] = LOSS_WEIGHTS + ("cfg.train.coord_soft_ce_w1.target_sigma",),
) -> plt.Figure:
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


def plot_overlaid_curves(
    hist: pd.DataFrame,
    labels: Mapping[str, str],
    keys: Sequence[str] = ("loss", "eval_loss", "coord_softce_w1/w1", "coord_softce_w1/coord_vocab_mass"),
) -> plt.Figure:
    """One panel per metric key, one line per run of ``labels`` (run id -> label), from
    :func:`coordexp.report.runs.histories_for_runs`."""
    fig, axes = grid(len(keys), 2, size=(4.4, 2.9))
    for ax, key in zip(axes, keys):
        d = hist[hist["key"] == key] if len(hist) else hist
        for i, rid in enumerate(labels):
            s = d[d["run_id"] == rid].sort_values("step", kind="stable")
            if len(s):
                ax.plot(
                    s["step"],
                    s["value"],
                    label=labels[rid],
                    color=plt.cm.tab10(i % 10),
                    lw=1.2,
                    marker="o" if len(s) < 4 else None,
                    ms=3,
                )
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


def plot_loss_kinds(
    runs: pd.DataFrame, metrics: Sequence[str] = ("bbox_mAP", "bbox_mAP50", "f1_at_0.5", "parse_rate")
) -> plt.Figure:
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
        note(
            ax,
            "not enough runs: no " + " / ".join(missing) + " run yet\n"
            "(dvc exp run -S train.coord_soft_ce_w1.enabled=false for the baseline)",
        )
    fig.tight_layout()
    return fig
