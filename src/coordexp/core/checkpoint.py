"""Checkpoint folders: which model types the workbench supports, and how a folder is read.

One list of supported Qwen-VL model types serves ``build_base`` (expand), the conversation template,
``train`` and ``evaluate``: a base that one stage builds is a base every other stage accepts.
The train stage's output layout (``swift/checkpoint-N``, ``final``, the MLflow run id file) is
named here too, because ``evaluate`` and ``report`` read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from coordexp.core.errors import UserError


class ModelType(NamedTuple):
    """A supported ``config.json`` ``model_type``: its transformers class and the project's ms-swift template."""

    hf_class: str
    template: str


SUPPORTED_MODEL_TYPES: dict[str, ModelType] = {
    "qwen3_vl": ModelType("Qwen3VLForConditionalGeneration", "coordexp_qwen3_vl"),
    "qwen2_5_vl": ModelType("Qwen2_5_VLForConditionalGeneration", "coordexp_qwen2_5_vl"),
}

SWIFT_DIR = "swift"
"""``<train.out_dir>/swift``: ms-swift's output folder, with its ``checkpoint-N`` folders."""
FINAL_DIR = "final"
"""``<train.out_dir>/final``: the last checkpoint plus ``coord_vocab.json``; what ``evaluate`` reads."""
RUN_ID_FILE = "mlflow_run_id"
"""``<train.out_dir>/mlflow_run_id``: the training run that ``evaluate`` and ``report`` add to."""


class CheckpointError(UserError, ValueError):
    """A folder that is not a usable local checkpoint; the message says what to place where."""


def read_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, without loading anything else."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint_dir}: no config.json, so it is not a Hugging Face checkpoint; "
            "build the base checkpoint first (dvc repro build_base) or point at a checkpoint folder"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def check_model_type(model_type: Any, where: str | Path) -> str:
    """``model_type`` if the workbench supports it; else a :class:`CheckpointError` naming ``where``."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def model_type(checkpoint_dir: str | Path) -> str:
    """The supported ``model_type`` of a checkpoint folder."""
    return check_model_type(read_config(checkpoint_dir).get("model_type"), Path(checkpoint_dir) / "config.json")


def vocab_size(checkpoint_dir: str | Path) -> int:
    """Embedding rows from ``config.json`` (top-level or ``text_config``), without loading weights."""
    cfg = read_config(checkpoint_dir)
    v = cfg.get("text_config", {}).get("vocab_size") or cfg.get("vocab_size")
    if not v:
        raise CheckpointError(f"{checkpoint_dir}/config.json has no vocab_size")
    return int(v)


def checkpoint_step(path: Path) -> int:
    """The step ``N`` of a ``checkpoint-N`` folder."""
    return int(path.name.rsplit("-", 1)[-1])


def list_checkpoints(swift_out: str | Path, *, complete: bool = False) -> list[Path]:
    """ms-swift's ``checkpoint-N`` folders by step; with ``complete``, only those with ``trainer_state.json``
    (a kill while a checkpoint is written leaves it without one)."""
    ckpts = [c for c in Path(swift_out).glob("checkpoint-*") if not complete or (c / "trainer_state.json").is_file()]
    return sorted(ckpts, key=checkpoint_step)


def last_checkpoint(swift_out: str | Path, *, complete: bool = False) -> Path | None:
    """The highest-step ``checkpoint-N`` (see :func:`list_checkpoints`), or None."""
    ckpts = list_checkpoints(swift_out, complete=complete)
    return ckpts[-1] if ckpts else None


def weights_digest(checkpoint_dir: str | Path) -> str:
    """md5 of a checkpoint's weight files (``*.safetensors``, by name): the identity of a trained model.

    The train stage tags its MLflow run with it, so a checkpoint can be traced to the run that produced
    it even when DVC restores the checkpoint from its cache instead of training again."""
    h = hashlib.md5()
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()
