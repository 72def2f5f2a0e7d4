"""The ``preprocess`` stage: COCO inputs -> contract JSONL (coord-token mode), rejects and counts, logged to MLflow.

Each split's JSONL is an MLflow dataset input of the run (its repository path, its DVC md5), so the
lineage preprocess -> train -> evaluate can be followed in the UI by digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from coordexp.core import paths
from coordexp.core.config import Params
from coordexp.pipeline import tracking
from coordexp.preprocess import coco


def run(params: Params, root: Path) -> dict[str, Any]:
    """Convert every split of ``preprocess.splits``; returns the counts (``reports/preprocess_counts.json``)."""
    with tracking.stage_run(params, "preprocess"):
        metrics = coco.run(params, root)
        mlflow.log_metrics({f"preprocess.{k}": float(v) for k, v in metrics["total"].items()})
        mlflow.log_dict(metrics, "preprocess/metrics.json")
        out_dir = paths.resolve(params.preprocess.out_dir, root)
        for split, counts in metrics["splits"].items():
            context = tracking.DATASET_CONTEXTS.get(split, split)
            tracking.log_dataset(out_dir / f"{split}.jsonl", context, records=counts["records_out"], root=root)
    return metrics
