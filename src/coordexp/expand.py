"""``build_base`` mode ``expand``: add the 1000 coord tokens to a local Qwen-VL checkpoint.

A real base (e.g. Qwen3-VL-2B-Instruct on disk) has no ``<|coord_k|>`` tokens. This module
adds them to the tokenizer as atomic **non-special** tokens in bin order (so decoding with
``skip_special_tokens=True`` keeps them, DESIGN §4), grows the input and output embeddings
(tied or untied) and initialises the coord rows:

* ``mean``: every coord row is the mean of the existing token rows - a neutral start that
  keeps the new tokens' logits at the average level and does not disturb the text model;
* ``ordinal``: the mean plus a small smooth sinusoidal code of the bin index, scaled
  elementwise by ``ordinal_scale`` x the per-dimension std of the existing rows, so that
  neighbouring bins start close and far bins apart - a prior the softCE/W1 losses reward.

Only rows of the coord ids are written; every pre-existing token row is left bit-identical.
Statistics use the rows of *real* tokens (``id < len(tokenizer)`` before expansion), not
the untrained padding rows that Qwen checkpoints carry.

A checkpoint that already has all coord tokens in order is accepted as is (copied, no
resize); a partial or misordered set is an error. Nothing is ever downloaded: a missing or
wrong directory fails at once, naming what to place where.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from coordexp.codec import K

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
}

_PLACE_HINT = (
    "Place a complete Hugging Face checkpoint directory there (config.json, tokenizer.json or "
    "vocab.json+merges.txt, preprocessor_config.json, *.safetensors), e.g. download "
    "Qwen/Qwen3-VL-2B-Instruct on a machine with network access and copy the folder, then set "
    "build_base.expand.source to it. Nothing is downloaded here (HF_HUB_OFFLINE=1)."
)


class CheckpointError(ValueError):
    """A source that is not a usable local Qwen-VL checkpoint."""


def check_source(source: str | Path) -> str:
    """Validate a local Qwen-VL checkpoint directory without loading it; returns its model_type."""
    src = Path(source)
    if not src.exists():
        raise CheckpointError(f"expand source {src} does not exist. {_PLACE_HINT}")
    if not src.is_dir():
        raise CheckpointError(f"expand source {src} is not a directory. {_PLACE_HINT}")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{src} has no config.json, so it is not a Hugging Face checkpoint. {_PLACE_HINT}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{cfg_path}: model_type {model_type!r} is not a Qwen-VL checkpoint; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}. {_PLACE_HINT}"
        )
    has_tok = (src / "tokenizer.json").is_file() or ((src / "vocab.json").is_file() and (src / "merges.txt").is_file())
    if not has_tok:
        raise CheckpointError(f"{src}: no tokenizer files (tokenizer.json or vocab.json + merges.txt). {_PLACE_HINT}")
    if not ((src / "preprocessor_config.json").is_file() or (src / "processor_config.json").is_file()):
        raise CheckpointError(f"{src}: no preprocessor_config.json / processor_config.json (image processor). {_PLACE_HINT}")
    weights = list(src.glob("*.safetensors")) + list(src.glob("pytorch_model*.bin"))
    if not weights:
        raise CheckpointError(f"{src}: no weights (*.safetensors or pytorch_model*.bin). {_PLACE_HINT}")
    return str(model_type)


def ordinal_code(num_bins: int, dim: int) -> "torch.Tensor":  # noqa: F821
    """``[num_bins, dim]`` smooth sinusoidal code of the bin index with unit RMS per row.

    Feature pairs are ``(sin, cos)(pi * f * k / (num_bins - 1))`` with ``f`` geometric in
    ``[0.5, num_bins / 16]``: the fastest pair turns by about 0.2 rad between neighbouring
    bins and the slowest by a quarter turn over the whole range, so adjacent bins are close
    and the distance grows with the bin gap.
    """
    import torch

    t = torch.arange(num_bins, dtype=torch.float64) / max(num_bins - 1, 1)
    n_freq = dim // 2
    code = torch.zeros(num_bins, dim, dtype=torch.float64)
    if n_freq == 0:
        return code.float()
    freqs = torch.logspace(math.log10(0.5), math.log10(max(num_bins / 16, 0.5)), n_freq, dtype=torch.float64)
    angle = math.pi * t[:, None] * freqs[None, :]
    code[:, 0 : 2 * n_freq : 2] = torch.sin(angle)
    code[:, 1 : 2 * n_freq : 2] = torch.cos(angle)
    return (code * math.sqrt(dim / n_freq)).float()  # each row: n_freq (sin, cos) pairs -> unit RMS


def init_coord_rows(
    weight: "torch.Tensor",  # noqa: F821
    coord_ids: list[int],
    n_real: int,
    init: Literal["mean", "ordinal"],
    ordinal_scale: float,
) -> None:
    """Write the coord rows of an embedding matrix in place (statistics from rows ``[0, n_real)``)."""
    import torch

    with torch.no_grad():
        real = weight[:n_real].detach().to(torch.float32)
        mean = real.mean(dim=0)
        rows = mean.expand(len(coord_ids), -1).clone()
        if init == "ordinal":
            std = real.std(dim=0)
            rows = rows + float(ordinal_scale) * std[None, :] * ordinal_code(len(coord_ids), weight.shape[1])
        elif init != "mean":
            raise ValueError(f"init must be 'mean' or 'ordinal', got {init!r}")
        weight[torch.tensor(coord_ids, dtype=torch.long, device=weight.device)] = rows.to(weight.dtype).to(weight.device)


def _round_up(n: int, multiple: int = 64) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def _model_class(model_type: str) -> Any:
    import transformers

    return getattr(transformers, SUPPORTED_MODEL_TYPES[model_type])


def _text_vocab_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def expand_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    init: Literal["mean", "ordinal"] = "mean",
    ordinal_scale: float = 0.02,
) -> Path:
    """Write ``source`` + coord tokens as a new checkpoint in ``out_dir`` (with ``coord_vocab.json``); returns ``out_dir``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if init not in ("mean", "ordinal"):
        raise ValueError(f"init must be 'mean' or 'ordinal', got {init!r}")
    if not ordinal_scale >= 0:
        raise ValueError(f"ordinal_scale must be >= 0, got {ordinal_scale}")
    model_type = check_source(source)
    src, out = Path(source).resolve(), Path(out_dir)
    if out.resolve() == src:
        raise ValueError(f"out_dir {out} must differ from the source checkpoint")

    from transformers import AutoProcessor

    from coordexp.tiny_model import add_coord_tokens
    from coordexp.vocab import check_coord_tokens_atomic, find_coord_token_ids, write_coord_vocab

    processor = AutoProcessor.from_pretrained(str(src), local_files_only=True)
    tokenizer = processor.tokenizer
    existing = find_coord_token_ids(tokenizer)  # raises on a partial / misordered set
    if existing is not None:
        check_coord_tokens_atomic(tokenizer, existing)
        vocab = _text_vocab_size(_load_config(src))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, out, dirs_exist_ok=True)
        write_coord_vocab(tokenizer, vocab, out)
        _write_info(out, src, model_type, init, ordinal_scale, resized=False, vocab=vocab, tok_len=len(tokenizer))
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
        model.resize_token_embeddings(_round_up(len(tokenizer)), mean_resizing=False)
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
    processor.save_pretrained(out)
    write_coord_vocab(tokenizer, vocab, out)
    _write_info(out, src, model_type, init, ordinal_scale, resized=len(tokenizer) > old_rows, vocab=vocab, tok_len=len(tokenizer))
    return out


def _load_config(src: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(src), local_files_only=True)


def _write_info(out: Path, src: Path, model_type: str, init: str, scale: float, *, resized: bool, vocab: int, tok_len: int) -> None:
    info = {
        "mode": "expand",
        "source": str(src),
        "model_type": model_type,
        "init": init,
        "ordinal_scale": scale,
        "embeddings_resized": resized,
        "vocab_size": vocab,
        "tokenizer_len": tok_len,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
