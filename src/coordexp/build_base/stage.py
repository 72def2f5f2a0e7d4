"""The ``build_base`` stage: the base checkpoint Stage-1 starts from, logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from coordexp.build_base.build import build_base
from coordexp.core import paths
from coordexp.core.config import Params
from coordexp.pipeline import tracking


def run(params: Params, root: Path) -> dict[str, Any]:
    """Build ``build_base.out_dir`` from the params (tiny model or expanded local checkpoint); returns the summary."""
    cfg = params.build_base
    out_dir = paths.resolve(cfg.out_dir, root)
    train_jsonl = paths.resolve(params.preprocess.out_dir, root) / "train.jsonl"
    expand = cfg.expand.model_dump()
    if expand.get("source"):
        expand["source"] = str(paths.resolve(expand["source"], root))
    with tracking.stage_run(params, "build_base"):
        summary = build_base(cfg.mode, out_dir, train_jsonl=train_jsonl, tiny=cfg.tiny.model_dump(), expand=expand)
        mlflow.log_metrics({f"build_base.{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))})
    return summary
