"""A LoRA run's end: the adapters merged into the base, with the trained coord rows, as a standalone checkpoint.

peft's adapter file holds the adapters' weights alone, so the trainer saves the coord rows of the embeddings and
head beside it (:data:`coordexp.train.swift_config.COORD_ROWS_FILE`); :func:`merge_lora` loads the base, applies
and merges the adapters (``merge_and_unload``), writes the coord rows back and saves a checkpoint that
``evaluate``, ``predict`` and ``report`` load like any full one. Offline, on the CPU; no swift import.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from coordexp.core.checkpoint import warn_remote_code
from coordexp.train.swift_config import COORD_ROWS_FILE

BASE_ONLY = ("build_info.json",)
"""Files of the base checkpoint that describe how it was built, not the trained model."""


def row_weights(model: Any) -> dict[str, torch.nn.Parameter]:
    """``input_embeddings`` and, where the head is not tied to them, ``output_embeddings``: the weights that
    hold coord rows, each once."""
    w_in = model.get_input_embeddings().weight
    out = {"input_embeddings": w_in}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not w_in:
        out["output_embeddings"] = head.weight
    return out


def save_coord_rows(model: Any, cmap: torch.Tensor, path: Path) -> None:
    """The coord rows of the embeddings and head, with their ids (:data:`COORD_ROWS_FILE`)."""
    from safetensors.torch import save_file

    ids = torch.nonzero(cmap >= 0).flatten()
    rows = {k: w.detach()[ids.to(w.device)].cpu().contiguous() for k, w in row_weights(model).items()}
    save_file({"coord_ids": ids, **rows}, str(path))


@torch.no_grad()
def load_coord_rows(model: Any, path: Path) -> None:
    """Write :func:`save_coord_rows`'s rows back into ``model`` (a merged model or the one being trained)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    ids = saved.pop("coord_ids")
    for k, w in row_weights(model).items():
        if k in saved:
            w[ids.to(w.device)] = saved[k].to(w.device, w.dtype)


def merge_lora(base: Path, adapter: Path, out: Path, dtype: str) -> None:
    """``base`` + the LoRA checkpoint ``adapter`` (adapters and coord rows) -> a full checkpoint in ``out``:
    the base's tokenizer and processor files, the merged weights and config."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    warn_remote_code(base)  # loaded natively below: an auto_map in the base is ignored, and said so
    rows = adapter / COORD_ROWS_FILE
    if not rows.is_file():
        raise FileNotFoundError(f"{rows}: missing; the LoRA checkpoint has no trained coord rows to merge")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    load_coord_rows(model, rows)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json", *BASE_ONLY))
    model.save_pretrained(out)
