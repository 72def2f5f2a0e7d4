"""The ``build_base`` stage's library entry: build (tiny) or expand a checkpoint, atomically.

Why atomic: DVC and people both treat an existing ``artifacts/base`` as done. The
checkpoint is written to a hidden sibling temp directory, verified (coord vocabulary
cross-checked between ``coord_vocab.json``, tokenizer and config), and only then renamed
into place, so an interrupted build never leaves a half-written checkpoint that looks
complete.

Why no timings in ``build_info.json``: DVC hashes the checkpoint folder, and the same params must
give the same bytes (a fresh clone's ``dvc repro`` reproduces the committed ``dvc.lock``). Wall
times are returned in the summary (the stage logs them to MLflow) and never written beside the
weights.

The two builders live in :mod:`coordexp.build_base.tiny` (``build_tiny``) and
:mod:`coordexp.build_base.expand` (``expand_checkpoint``).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordexp.build_base.expand import check_source, expand_checkpoint
from coordexp.build_base.tiny import build_tiny
from coordexp.core.checkpoint import CheckpointError
from coordexp.core.errors import MissingInputError
from coordexp.core.io import atomic_dir
from coordexp.core.vocab import coord_id_map


def safetensors_num_params(checkpoint_dir: str | Path) -> int:
    """Parameter count from the safetensors headers (no weights loaded; shared tensors saved once)."""
    total = 0
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= int(d)
            total += count
    return total


def checkpoint_bytes(checkpoint_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(checkpoint_dir).rglob("*") if p.is_file())


def build_base(
    mode: str,
    out_dir: str | Path,
    *,
    train_jsonl: str | Path | None = None,
    tiny: Mapping[str, Any] | None = None,
    expand: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the base checkpoint into ``out_dir`` (replacing it only on success); returns a summary.

    ``tiny``: the ``build_base.tiny`` settings (needs ``train_jsonl``, the preprocessed
    training split); ``expand``: ``{"source", "init", "ordinal_scale"}``.
    """
    out = Path(out_dir)
    if mode == "expand":
        exp = dict(expand or {})
        if not exp.get("source"):
            raise CheckpointError(
                "build_base.expand.source is not set: point it at a local Qwen3-VL / Qwen2.5-VL checkpoint directory"
            )
        check_source(exp["source"])  # fail before creating anything
    elif mode == "tiny":
        if train_jsonl is None or not Path(train_jsonl).is_file():
            raise MissingInputError(
                f"{train_jsonl}: training split not found; the tiny tokenizer is trained on it - run the preprocess stage first"
            )
    else:
        raise ValueError(f"build_base.mode must be 'tiny' or 'expand', got {mode!r}")

    t0 = time.time()
    with atomic_dir(out) as tmp:
        if mode == "tiny":
            build_tiny(Path(train_jsonl), tmp, **dict(tiny or {}))
        else:
            exp = dict(expand or {})
            expand_checkpoint(exp["source"], tmp, init=exp["init"], ordinal_scale=float(exp["ordinal_scale"]))
        cmap = coord_id_map(tmp)  # cross-check before publishing
        seconds = time.time() - t0
        summary = {
            "mode": mode,
            "out_dir": str(out),
            "parameters": safetensors_num_params(tmp),
            "vocab_size": int(cmap.numel()),
            "coord_id_min": int((cmap >= 0).nonzero().min()),
            "coord_id_max": int((cmap >= 0).nonzero().max()),
            "checkpoint_bytes": checkpoint_bytes(tmp),
        }
        info_path = tmp / "build_info.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        info.update({k: v for k, v in summary.items() if k != "out_dir"})
        timings = {"build_seconds": round(seconds, 2)}
        warmup = info.get("vision_warmup")
        if isinstance(warmup, dict) and "seconds" in warmup:
            timings["vision_warmup_seconds"] = warmup.pop("seconds")
        info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {**summary, **timings}
