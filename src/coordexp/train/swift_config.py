"""The train stage's settings, as the ms-swift process reads them.

``swift sft`` runs in a subprocess of the ``train`` stage, so the loss and the trainer cannot take
the validated config as an argument: the stage writes what they need (loss weights, the coord
vocabulary file, ``fused_loss``, ``token_type_metrics``, ``coord_diag``, the training rows) to a JSON file and names
it in the environment variable :data:`CONFIG_ENV`. The loss and the trainer each read it once, when
ms-swift builds them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from coordexp.core.vocab import coord_id_map_from_vocab

CONFIG_ENV = "COORDEXP_TRAIN_CONFIG"

TRAINABLE_FILE = "coordexp_trainable.json"
"""What the trainer trains (``trainable_params``, ``total_params``, ``trainable_share``), written by the trainer
into the ms-swift output folder; the stage logs it to MLflow and ``train.json``."""

COORD_ROWS_FILE = "coordexp_coord_rows.safetensors"
"""A LoRA checkpoint's trained coord rows (``coord_ids``, ``input_embeddings``, and ``output_embeddings`` for an
untied head), beside the adapter, which holds only the adapters' own weights; the merge writes them back."""

TRACKING_OUTAGE_FILE = "coordexp_tracking_outage.json"
"""Written by the trainer into the ms-swift output folder when the tracking server stayed away past
``tracking.outage_limit_s`` (step, URI, cause): training saved a checkpoint and stopped; the stage says how to resume."""

KEPT_METRICS_FILE = "coordexp_kept_metrics.jsonl"
"""The metric points the trainer could not send while the server was away (``step``, ``timestamp``, ``metrics``),
beside the checkpoint; the resumed stage sends them first (:func:`coordexp.pipeline.tracking.log_kept_metrics`)."""


def plugin_config() -> dict[str, Any]:
    """The settings the train stage wrote for this run (see the module docstring)."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set: the train stage writes it; run `dvc repro train`")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def coord_id_map(cfg: dict[str, Any]) -> torch.Tensor:
    """The ``[V]`` coord id map of the checkpoint being trained, from its ``coord_vocab.json``."""
    return coord_id_map_from_vocab(cfg["coord_vocab"])
