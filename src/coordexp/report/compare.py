"""The compare-runs notebook: the finished runs of an experiment side by side (params, metrics,
curves) and the CE baseline against Stage-1, within groups of comparable runs.

A 60-step run on 24 images and a 2000-step run on 3000 are not two samples of one thing: their
metrics differ because of the data and the budget, not the loss. So runs are grouped by what must be
equal for a comparison to mean something (:data:`COMPARABLE_BY`: the data, the number of steps, the
base checkpoint), every mean is taken within one group, and the params that differ between runs are
listed in full, so a reader sees what else changed.

Works on the frames of :mod:`coordexp.report.runs`. An experiment with a single run, or with no
evaluated run yet, still gives every figure, with a note saying what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    "cfg.train.tuner",
)
"""Params shown in the runs table even when they do not vary (the knobs of the Stage-1 ablation)."""

LOSS_WEIGHTS: tuple[str, ...] = ABLATION_PARAMS[1:4]

COMPARABLE_BY: dict[str, tuple[str, ...]] = {
    "data": (
        "data_digest",
        "cfg.preprocess.splits.",
        "cfg.preprocess.max_side",
        "cfg.preprocess.min_box_side",
        "train_summary.train_samples",
    ),
    "steps": ("cfg.train.max_steps",),
    "base": ("cfg.build_base.",),
}
"""Columns (exact names, or prefixes ending in ``.``) whose values must be equal for two runs to be
compared: the data (the digests of the MLflow dataset inputs the run logged, i.e. the contract
JSONL it trained and was evaluated on, plus the source files, the image size and the number of
training records that survived preprocessing), the training budget, and the base checkpoint (every
``build_base`` param). The digests are of the preprocessed records, so runs whose objects were
ordered differently are conservatively in different groups; their metrics are still in one table."""

_NOT_COMPARABILITY = ("cfg.build_base.out_dir",)
"""Where a base is written does not change it."""


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that ended well (``FINISHED``): a running run's metrics still move and a failed run's
    are not a result, so neither is compared nor counted in the compare stage's digest."""
    if "status" not in runs or runs.empty:
        return runs.iloc[0:0].copy() if len(runs.columns) else runs
    return runs[runs["status"] == "FINISHED"].reset_index(drop=True)


def _jsonable(v):
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v if isinstance(v, (int, str, bool)) else str(v)


def runs_digest(runs: pd.DataFrame) -> str:
    """A SHA-256 of what the compare notebook shows of ``runs``: each run's id, status, tags, params
    and latest metric values, independent of row and column order.

    A new finished run, a re-evaluated run or a changed tag changes it. End times are left out on
    purpose: the evaluate and report stages resume the training run and end it again, which would
    re-render the comparison although nothing it shows changed.
    """
    cols = sorted(c for c in runs.columns if c not in ("start_time", "end_time"))
    records = sorted(
        ({c: _jsonable(r[c]) for c in cols} for r in runs.to_dict("records")), key=lambda r: str(r.get("run_id"))
    )
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()


def comparability_columns(runs: pd.DataFrame) -> dict[str, list[str]]:
    """The columns of ``runs`` behind each part of :data:`COMPARABLE_BY`."""
    out = {}
    for part, keys in COMPARABLE_BY.items():
        out[part] = [
            c
            for c in runs.columns
            if c not in _NOT_COMPARABILITY and any(c == k or (k.endswith(".") and c.startswith(k)) for k in keys)
        ]
    return out


def _describe(row: Mapping, cols: Sequence[str], strip: str = "") -> str:
    parts = []
    for c in sorted(cols):
        v = _jsonable(row.get(c))
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # MLflow gives counts back as floats: 3000, not 3000.0
        if v is not None:
            parts.append(f"{c.removeprefix(strip)}={v}")
    return ", ".join(parts) if parts else "(not logged)"


def group_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``group`` (G1, G2, ... in order of each group's first run) and one column per
    part of :data:`COMPARABLE_BY` (``data``, ``steps``, ``base``) describing its values in full.

    Two runs share a group exactly when every comparability column is equal (missing equals missing).
    """
    out = runs.copy()
    cols = comparability_columns(out)
    strips = {"data": "cfg.preprocess.", "steps": "cfg.train.", "base": "cfg.build_base."}
    for part in COMPARABLE_BY:
        out[part] = [_describe(r, cols[part], strips[part]) for r in out.to_dict("records")]
    keys = [tuple(r[p] for p in COMPARABLE_BY) for r in out.to_dict("records")]
    first: dict[tuple, str] = {}
    for k in keys:
        first.setdefault(k, f"G{len(first) + 1}")
    out["group"] = [first[k] for k in keys]
    return out


def groups_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group of comparable runs: how many runs, their labels, and the data, steps and
    base that define it (in full)."""
    g = runs if "group" in runs else group_runs(runs)
    if g.empty:
        return pd.DataFrame(columns=["group", "runs", "n_runs", *COMPARABLE_BY]).set_index("group")
    rows = []
    for name, d in g.groupby("group", sort=False):
        rows.append(
            {
                "group": name,
                "n_runs": len(d),
                "runs": ", ".join(d["label"].astype(str)) if "label" in d else "",
                **{p: d[p].iloc[0] for p in COMPARABLE_BY},
            }
        )
    return pd.DataFrame(rows).set_index("group")


def params_that_differ(runs: pd.DataFrame) -> pd.DataFrame:
    """Every ``cfg.*`` param whose value differs between runs, one row per (param, run), values in
    full: the long format never truncates, however many params or runs there are."""
    g = runs if "group" in runs else group_runs(runs)
    changed = varying_params(g)
    rows = [
        {
            "param": c.removeprefix("cfg."),
            "group": r.get("group"),
            "run": r.get("label", r.get("run_id")),
            "value": "null" if _jsonable(r[c]) is None else str(r[c]),
        }
        for c in changed
        for r in g.to_dict("records")
    ]
    return pd.DataFrame(rows, columns=["param", "group", "run", "value"])


def varying_params(runs: pd.DataFrame) -> list[str]:
    """``cfg.*`` columns whose value differs between runs (what an ablation changed)."""
    cols = [c for c in runs.columns if c.startswith("cfg.")]
    return [c for c in cols if runs[c].astype(str).nunique(dropna=False) > 1]


def runs_overview(runs: pd.DataFrame) -> pd.DataFrame:
    """The compact table for the notebook: label, loss kind, ablation knobs, varying params, headline metrics."""
    keep = [c for c in ("group", "label", "workspace", "loss_kind", "status") if c in runs]
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
    """``metric`` against each loss weight / ablation knob of the Stage-1 runs, one scatter per knob,
    one colour per group of comparable runs.

    CE-baseline runs do not use these knobs, so they are a horizontal line (their mean within their
    group, in the group's colour) rather than points at a meaningless weight.
    """
    g = runs if "group" in runs or runs.empty else group_runs(runs)
    fig, axes = grid(len(params), 4, size=(3.3, 2.8))
    for ax, p in zip(axes, params):
        short = p.replace("cfg.train.coord_soft_ce_w1.", "")
        ax.set_title(f"{metric} vs {short}")
        ax.set_xlabel(short)
        ax.set_ylabel(metric)
        if p not in g or metric not in g or g[metric].notna().sum() == 0:
            note(ax, f"no evaluated run\nwith {metric}", fontsize=7)
            continue
        d = g.dropna(subset=[metric])
        for i, (name, dg) in enumerate(d.groupby("group", sort=False)):
            color = plt.cm.tab10(i % 10)
            s1 = dg[dg["loss_kind"] == "stage1_softce_w1"]
            base = dg[dg["loss_kind"] == "ce_baseline"]
            if len(s1):
                ax.scatter(
                    pd.to_numeric(s1[p], errors="coerce"), s1[metric], color=color, s=28, label=f"{name} Stage-1"
                )
            if len(base):
                ax.axhline(
                    base[metric].mean(), color=color, ls="--", lw=1.0, label=f"{name} CE baseline (n={len(base)})"
                )
        ax.legend(fontsize=6, loc="lower right")
        s1_all = d[d["loss_kind"] == "stage1_softce_w1"]
        values_per_group = s1_all.groupby("group")[p].nunique() if len(s1_all) else pd.Series(dtype=int)
        if values_per_group.empty or values_per_group.max() < 2:
            note(ax, f"one value of {short} per group so far:\nnot enough runs for a trend", fontsize=7, y=0.85)
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
    """Mean, min, max and count of the headline metrics per group of comparable runs and
    ``coordexp.loss`` kind (empty when no run has been evaluated yet). Never across groups."""
    present = [m for m in HEADLINE_METRICS if m in runs and runs[m].notna().any()]
    if runs.empty or not present:
        return pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=["group", "loss_kind"]))
    g = runs if "group" in runs else group_runs(runs)
    return g.groupby(["group", "loss_kind"], sort=False)[present].agg(["mean", "min", "max", "count"])


def plot_loss_kinds(
    runs: pd.DataFrame, metrics: Sequence[str] = ("bbox_mAP", "bbox_mAP50", "f1_at_0.5", "parse_rate")
) -> plt.Figure:
    """CE baseline vs Stage-1 within each group of comparable runs (one panel per group): the mean
    of each metric over the runs of each ``coordexp.loss`` kind, with every run as a dot (so one
    lucky seed does not pass for a trend)."""
    present = [m for m in metrics if m in runs]
    if not present or runs.empty:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        note(ax, "no evaluated runs")
        return fig
    g = runs if "group" in runs else group_runs(runs)
    groups = list(dict.fromkeys(g["group"]))
    fig, axes = grid(len(groups), 2, size=(6.0, 3.6))
    kinds = ["ce_baseline", "stage1_softce_w1"]
    x = np.arange(len(present))
    w = 0.38
    for ax, name in zip(axes, groups):
        dg = g[g["group"] == name]
        for i, kind in enumerate(kinds):
            s = dg[dg["loss_kind"] == kind]
            if s.empty:
                continue
            off = (i - 0.5) * w
            means = [s[m].mean() for m in present]
            ax.bar(x + off, means, width=w, label=f"{kind} (n={len(s)})", color=("C3", "C0")[i], alpha=0.8)
            for j, m in enumerate(present):
                ax.scatter(np.full(len(s), x[j] + off), s[m], color="k", s=8, zorder=3)
        ax.set_xticks(x, present)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: CE baseline vs Stage-1 (bars: mean, dots: runs)", fontsize=8)
        ax.legend(fontsize=7)
        missing = [k for k in kinds if not (dg["loss_kind"] == k).any()]
        if missing:
            note(
                ax,
                f"not enough runs in {name}: no " + " / ".join(missing) + " run\n"
                "(dvc exp run -S train.coord_soft_ce_w1.enabled=false for the baseline)",
                fontsize=7,
            )
    fig.tight_layout()
    return fig


READOUT_PREFIX = "readouts/"
"""MLflow metric names of the evaluate stage's per-readout block: ``readouts/<readout>/<metric>``."""


def readouts_by_loss(runs: pd.DataFrame, metric: str = "bbox_mAP50") -> pd.DataFrame:
    """Mean ``metric`` per group of comparable runs, ``coordexp.loss`` kind and coordinate readout (columns),
    with the number of runs: what reading coordinates from the distribution buys each loss, never averaged
    across groups. Empty when no run logged per-readout metrics."""
    cols = [c for c in runs.columns if c.startswith(READOUT_PREFIX) and c.endswith(f"/{metric}")]
    if runs.empty or not cols or not runs[cols].notna().any().any():
        return pd.DataFrame()
    g = runs if "group" in runs else group_runs(runs)
    names = {c: c[len(READOUT_PREFIX) : -len(metric) - 1] for c in cols}
    out = g.groupby(["group", "loss_kind"], sort=False)[cols].mean().rename(columns=names)
    out["n_runs"] = g.groupby(["group", "loss_kind"], sort=False)[cols[0]].count()
    return out


def plot_readouts_by_loss(runs: pd.DataFrame, metric: str = "bbox_mAP50") -> plt.Figure:
    """Stage-1 against the CE baseline under each coordinate readout, one panel per group of comparable
    runs: the figure that shows what distribution supervision buys at inference. Soft CE and W1 make the
    coord distribution ordinal, so its expectation or median should gain over the arg-max for Stage-1 and
    not for plain CE; the bars show whether they do (means over runs; every run is a dot)."""
    table = readouts_by_loss(runs, metric)
    if table.empty:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        note(ax, f"no run logged {metric} per readout yet\n(evaluate with this version of the workbench)")
        return fig
    g = runs if "group" in runs else group_runs(runs)
    readouts = [c for c in table.columns if c != "n_runs"]
    groups = list(dict.fromkeys(table.index.get_level_values("group")))
    fig, axes = grid(len(groups), 2, size=(6.0, 3.6))
    kinds = ["ce_baseline", "stage1_softce_w1"]
    x = np.arange(len(readouts))
    w = 0.38
    for ax, name in zip(axes, groups):
        dg = g[g["group"] == name]
        for i, kind in enumerate(kinds):
            s = dg[dg["loss_kind"] == kind]
            if s.empty or (name, kind) not in table.index:
                continue
            off = (i - 0.5) * w
            ax.bar(
                x + off,
                table.loc[(name, kind), readouts].to_numpy(dtype=float),
                width=w,
                alpha=0.8,
                color=("C3", "C0")[i],
                label=f"{kind} (n={int(table.loc[(name, kind), 'n_runs'])})",
            )
            for j, r in enumerate(readouts):
                ax.scatter(np.full(len(s), x[j] + off), s[f"{READOUT_PREFIX}{r}/{metric}"], color="k", s=8, zorder=3)
        ax.set_xticks(x, readouts)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: {metric} by coordinate readout", fontsize=8)
        ax.legend(fontsize=7)
        missing = [
            k
            for k in kinds
            if not ((dg["loss_kind"] == k) & dg[f"{READOUT_PREFIX}{readouts[0]}/{metric}"].notna()).any()
        ]
        if missing:
            note(
                ax,
                f"no evaluated {' / '.join(missing)} run in {name}\n"
                "(dvc exp run -S train.coord_soft_ce_w1.enabled=false for the baseline)",
                fontsize=7,
            )
    fig.tight_layout()
    return fig
