"""MLflow runs and metric histories as pandas, for the notebooks.

Training runs are recognised by the ``coordexp.loss`` tag, which only the train stage sets: the
evaluate and report stages resume the same run and retag ``coordexp.stage``. Rows and histories
are ordered by start time and step, so a rerun draws the same figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from coordexp.evaluate.metrics import HEADLINE_METRICS
from coordexp.report.training import LOSS_COMPONENTS, NONFINITE_ATTR

_NONFINITE_TEXT = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}
"""How a logged non-finite value reads in the history CSV (lower-cased); an empty cell is "not logged"."""

_RUN_COLUMNS = ["run_id", "run_name", "status", "loss_kind", "exp_name"]


def client(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri``."""
    # lazy: mlflow takes seconds to import; the plotting helpers of the report do not need it
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


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
    curves = set(counts[counts > 1].index) | {
        k for k in counts.index if k.startswith("eval_") or k in dict(LOSS_COMPONENTS)
    }
    summary = long["key"].isin(HEADLINE_METRICS) | (long["key"] == "ckpt_bbox_mAP")
    long = long[long["key"].isin(curves) & ~summary]
    long = long.assign(
        split=np.where(long["key"].str.startswith("eval_"), "eval", "train"),
        key=long["key"].str.replace(r"^eval_", "", regex=True),
    )
    long = long.drop_duplicates(["split", "key", "step"], keep="last")
    wide = long.pivot_table(index=["step", "split"], columns="key", values="value", aggfunc="last").reset_index()
    wide.columns.name = None
    wide = wide.sort_values(["split", "step"], kind="stable").reset_index(drop=True)
    wide.attrs[NONFINITE_ATTR] = cells
    return wide


def load_history(
    csv_path: str | Path | None = None, tracking_uri: str | None = None, run_id: str | None = None
) -> tuple[pd.DataFrame, str]:
    """The training history and where it came from: the CSV the train stage wrote (a DVC output,
    so the report is a function of tracked files) or, without it, the MLflow run's histories."""
    if csv_path is not None and Path(csv_path).is_file() and Path(csv_path).stat().st_size > 0:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        df = pd.read_csv(csv_path).sort_values(["split", "step"], kind="stable").reset_index(drop=True)
        cells = [
            (col, int(raw.loc[i, "step"]) if raw.loc[i, "step"].isdigit() else raw.loc[i, "step"])
            for col in raw.columns
            if col not in ("step", "split")
            for i in np.flatnonzero(raw[col].str.strip().str.lower().isin(_NONFINITE_TEXT))
        ]
        df.attrs[NONFINITE_ATTR] = cells
        return df, str(csv_path)
    if tracking_uri and run_id:
        return history_from_mlflow(tracking_uri, run_id), f"mlflow run {run_id}"
    return pd.DataFrame(columns=["step", "split"]), "nothing"


def runs_table(tracking_uri: str, experiment: str, *, training_only: bool = True) -> pd.DataFrame:
    """Every run of ``experiment`` as one row: run id, name, status, tags, ``cfg.*`` params, metrics.

    Training runs are those tagged ``coordexp.loss`` (set by the train stage only; evaluate and
    report resume the same run and overwrite ``coordexp.stage``). Rows are ordered by start time so
    the table (and its figures) is stable from one rerun to the next. Metrics are named as in MLflow,
    which are also their names in ``eval.json`` (``f1_at_0.5``).
    """
    # lazy: mlflow takes seconds to import; the plotting helpers of the report do not need it
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame(columns=_RUN_COLUMNS)
    df = mlflow.search_runs([exp.experiment_id], output_format="pandas", order_by=["attributes.start_time ASC"])
    if df.empty:
        return pd.DataFrame(columns=_RUN_COLUMNS)
    if training_only:
        if "tags.coordexp.loss" not in df:
            return pd.DataFrame(columns=_RUN_COLUMNS)
        df = df[df["tags.coordexp.loss"].notna()]
    out = pd.DataFrame(
        {
            "run_id": df["run_id"],
            "run_name": df.get("tags.mlflow.runName"),
            "status": df["status"],
            "start_time": df["start_time"],
            "loss_kind": df.get("tags.coordexp.loss"),
            "exp_name": df["tags.dvc.exp_name"] if "tags.dvc.exp_name" in df else None,
            "params_hash": df.get("tags.coordexp.params_hash"),
            "git_commit": df.get("tags.coordexp.git_commit"),
        }
    )
    params = df[[c for c in df.columns if c.startswith("params.cfg.")]].rename(columns=lambda c: c[len("params.") :])
    metrics = df[[c for c in df.columns if c.startswith("metrics.")]].rename(columns=lambda c: c[len("metrics.") :])
    params = params.apply(_numeric_if_possible)
    out = pd.concat([out, params, metrics], axis=1)
    digests = _dataset_digests([exp.experiment_id])
    out["data_digest"] = [digests.get(r) for r in out["run_id"]]
    out["label"] = [label_of(r) for r in out.to_dict("records")]
    return out.sort_values("start_time", kind="stable").reset_index(drop=True)


def _dataset_digests(experiment_ids: list[str]) -> dict[str, str]:
    """Run id -> ``name:digest, ...`` of the MLflow dataset inputs a run logged (the train stage's
    train/val JSONL and the evaluate stage's split, with their DVC md5; sorted; absent when none): the
    most direct statement of which data a run saw, used to group comparable runs."""
    import mlflow

    out = {}
    for run in mlflow.search_runs(experiment_ids, output_format="list"):
        inputs = getattr(run, "inputs", None)
        found = sorted(_dataset_key(d) for d in (getattr(inputs, "dataset_inputs", None) or []))
        if found:
            out[run.info.run_id] = ", ".join(found)
    return out


def _dataset_key(d) -> str:
    """``name:digest``, plus ``(N records)`` when the stage used part of the file (a limit)."""
    records = {t.key: t.value for t in (d.tags or [])}.get("coordexp.records")
    key = f"{d.dataset.name}:{d.dataset.digest}"
    return f"{key} ({records} records)" if records else key


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
