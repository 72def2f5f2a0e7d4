"""``build_base`` mode ``expand``: add the 1000 coord tokens to a local Qwen-VL checkpoint.

A real base (e.g. Qwen3-VL-2B-Instruct on disk) has no ``<|coord_k|>`` tokens. This module adds
them to the tokenizer (:mod:`coordexp.build_base.coord_rows`: atomic, non-special, in bin order),
grows the input and output embeddings (tied or untied) and initialises the coord rows (``mean`` or
``ordinal``).

Only rows of the coord ids are written; every pre-existing token row is left bit-identical.
Statistics use the rows of *real* tokens (``id < len(tokenizer)`` before expansion), not
the untrained padding rows that Qwen checkpoints carry.

The image processor's pixel bounds are set to the ones ms-swift trains with (:func:`align_pixel_bounds`), so
evaluation, ``coordexp predict`` and any transformers / vLLM user of the trained checkpoint see each image at the
size training saw it.

A checkpoint that already has all coord tokens in order is accepted as is (copied, no
resize, only the pixel bounds aligned); a partial or misordered set is an error. A source that asks for remote
code (``auto_map``) is loaded natively with a warning, and the base is written without ``auto_map`` or ``.py`` files
(:mod:`coordexp.core.checkpoint`). Nothing is ever downloaded: a missing or
wrong directory fails at once, naming what to place where.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import transformers
from transformers import AutoConfig, AutoProcessor

from coordexp.build_base.coord_rows import add_coord_tokens, init_coord_rows, padded_vocab_size
from coordexp.core.checkpoint import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    check_model_type,
    read_config,
    strip_remote_code,
    warn_remote_code,
)
from coordexp.core.codec import K
from coordexp.core.vocab import check_coord_tokens_atomic, find_coord_token_ids, write_coord_vocab

_PLACE_HINT = (
    "Place a complete Hugging Face checkpoint directory there (config.json, tokenizer.json or "
    "vocab.json+merges.txt, preprocessor_config.json, *.safetensors), e.g. download "
    "Qwen/Qwen3-VL-2B-Instruct on a machine with network access and copy the folder, then set "
    "build_base.expand.source to it. Nothing is downloaded here (HF_HUB_OFFLINE=1)."
)


def check_source(source: str | Path) -> str:
    """Validate a local Qwen-VL checkpoint directory without loading it; returns its model_type."""
    src = Path(source)
    if not src.exists():
        raise CheckpointError(f"expand source {src} does not exist. {_PLACE_HINT}")
    if not src.is_dir():
        raise CheckpointError(f"expand source {src} is not a directory. {_PLACE_HINT}")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json, so it is not a Hugging Face checkpoint. {_PLACE_HINT}")
    try:
        model_type = check_model_type(read_config(src).get("model_type"), src / "config.json")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. {_PLACE_HINT}") from None
    has_tok = (src / "tokenizer.json").is_file() or ((src / "vocab.json").is_file() and (src / "merges.txt").is_file())
    if not has_tok:
        raise CheckpointError(f"{src}: no tokenizer files (tokenizer.json or vocab.json + merges.txt). {_PLACE_HINT}")
    if not ((src / "preprocessor_config.json").is_file() or (src / "processor_config.json").is_file()):
        raise CheckpointError(
            f"{src}: no preprocessor_config.json / processor_config.json (image processor). {_PLACE_HINT}"
        )
    weights = list(src.glob("*.safetensors")) + list(src.glob("pytorch_model*.bin"))
    if not weights:
        raise CheckpointError(f"{src}: no weights (*.safetensors or pytorch_model*.bin). {_PLACE_HINT}")
    return model_type


TRAINING_IMAGE_TOKENS = (4, 16384)
"""Merged visual tokens per image that ms-swift's Qwen-VL templates resize every image into: ``qwen_vl_utils``'
``IMAGE_MIN_TOKEN_NUM`` / ``IMAGE_MAX_TOKEN_NUM`` defaults, applied by the template's own resize before the
processor, which then runs with ``do_resize=False``."""


def align_pixel_bounds(processor: Any) -> dict[str, Any] | None:
    """Give ``processor`` the pixel bounds of ms-swift's training resize; returns the bounds it had if they differed.

    Why: evaluation renders images through the checkpoint's own processor, training through ms-swift's template.
    Qwen3-VL's published ``preprocessor_config.json`` has ``shortest_edge`` 65536 (at least 64 visual tokens), while
    ms-swift resizes to at least 4 tokens (4 x 32^2 = 4096 pixels): a 128 px image trains as 16 visual tokens and
    would be evaluated upscaled to 64, a prompt the model never saw. Qwen2.5-VL's published bounds (3136 ..
    12845056) already are ms-swift's. Environment overrides of ms-swift's bounds (``IMAGE_MIN_TOKEN_NUM``,
    ``MAX_PIXELS``, ...) at train time are not seen here.
    """
    proc = processor.image_processor
    factor = int(proc.patch_size) * int(proc.merge_size)
    lo, hi = (n * factor**2 for n in TRAINING_IMAGE_TOKENS)
    size = proc.size or {}
    had = {
        k: size.get(k) if isinstance(size, dict) else getattr(size, k, None) for k in ("shortest_edge", "longest_edge")
    }
    changed = None
    if (had["shortest_edge"], had["longest_edge"]) != (lo, hi):
        changed = had
        proc.size = {"shortest_edge": lo, "longest_edge": hi}
    return changed


_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def _model_class(model_type: str) -> Any:
    return getattr(transformers, SUPPORTED_MODEL_TYPES[model_type].hf_class)


def _text_vocab_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def expand_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    *,
    init: Literal["mean", "ordinal"],
    ordinal_scale: float,
) -> Path:
    """Write ``source`` + coord tokens as a new checkpoint in ``out_dir`` (with ``coord_vocab.json``); returns ``out_dir``."""
    if init not in ("mean", "ordinal"):
        raise ValueError(f"init must be 'mean' or 'ordinal', got {init!r}")
    if not ordinal_scale >= 0:
        raise ValueError(f"ordinal_scale must be >= 0, got {ordinal_scale}")
    model_type = check_source(source)
    warn_remote_code(source)
    src, out = Path(source).resolve(), Path(out_dir)
    if out.resolve() == src:
        raise ValueError(f"out_dir {out} must differ from the source checkpoint")

    processor = AutoProcessor.from_pretrained(str(src), local_files_only=True)
    tokenizer = processor.tokenizer
    existing = find_coord_token_ids(tokenizer)  # raises on a partial / misordered set
    if existing is not None:
        check_coord_tokens_atomic(tokenizer, existing)
        vocab = _text_vocab_size(_load_config(src))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.py"))
        bounds = align_pixel_bounds(processor)
        if bounds is not None:
            for name in _PROCESSOR_FILES:
                (out / name).unlink(missing_ok=True)
            processor.save_pretrained(out)
        strip_remote_code(out)
        write_coord_vocab(tokenizer, vocab, out)
        _write_info(
            out, src, model_type, init, ordinal_scale, resized=False, vocab=vocab, tok_len=len(tokenizer), bounds=bounds
        )
        return out

    model = _model_class(model_type).from_pretrained(str(src), dtype="auto", local_files_only=True)
    n_real = len(tokenizer)
    added = add_coord_tokens(tokenizer)
    if added != K:
        raise RuntimeError(f"expected to add {K} coord tokens, added {added}")
    ids = find_coord_token_ids(tokenizer)
    assert ids is not None
    check_coord_tokens_atomic(tokenizer, ids)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(padded_vocab_size(len(tokenizer)), mean_resizing=False)
    emb_in = model.get_input_embeddings().weight
    init_coord_rows(emb_in, ids, n_real, init, ordinal_scale)
    emb_out = model.get_output_embeddings()
    if emb_out is not None and emb_out.weight.data_ptr() != emb_in.data_ptr():
        init_coord_rows(emb_out.weight, ids, n_real, init, ordinal_scale)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if _text_vocab_size(model.config) != vocab:
        raise RuntimeError(f"config vocab_size {_text_vocab_size(model.config)} != embedding rows {vocab} after resize")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    bounds = align_pixel_bounds(processor)
    processor.save_pretrained(out)
    strip_remote_code(out)  # a source's auto_map, saved back with its config, would reach ms-swift in training
    write_coord_vocab(tokenizer, vocab, out)
    _write_info(
        out,
        src,
        model_type,
        init,
        ordinal_scale,
        resized=len(tokenizer) > old_rows,
        vocab=vocab,
        tok_len=len(tokenizer),
        bounds=bounds,
    )
    return out


def _load_config(src: Path) -> Any:
    return AutoConfig.from_pretrained(str(src), local_files_only=True)


def _write_info(
    out: Path,
    src: Path,
    model_type: str,
    init: str,
    scale: float,
    *,
    resized: bool,
    vocab: int,
    tok_len: int,
    bounds: dict[str, Any] | None,
) -> None:
    info = {
        "mode": "expand",
        "source": str(src),
        "model_type": model_type,
        "init": init,
        "ordinal_scale": scale,
        "embeddings_resized": resized,
        "vocab_size": vocab,
        "tokenizer_len": tok_len,
        "image_size_of_source": bounds,  # the source's pixel bounds, where align_pixel_bounds replaced them
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
