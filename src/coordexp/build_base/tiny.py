"""``build_base`` mode ``tiny``: a few-million-parameter Qwen3-VL built and saved locally.

Why: the workbench must run end to end on a fresh clone with no network and no GPU. A
randomly initialised model with the *real* Qwen3-VL architecture (transformers'
``Qwen3VLForConditionalGeneration``: vision tower with deepstack, M-RoPE text decoder)
exercises exactly the code paths a real checkpoint does - ms-swift's ``qwen3_vl`` model
loader, template, collator and rope index - while training in minutes on 2 CPU cores.

What keeps it small and fast:

* a byte-level BPE tokenizer trained here on the training descriptions and the JSON
  structure of the rendered answers (the coord tokens are atomic added tokens, so they are
  removed from the BPE corpus), instead of Qwen's 151k vocabulary; the answer grammar's fixed
  strings and the prompt are atomic added tokens too (:func:`grammar_tokens`);
* 8-pixel patches merged 2x2: a 128x128 image is 16x16 patches -> 64 visual tokens.

The tokenizer follows Qwen2's pipeline exactly (NFC, Qwen's split regex, byte-level,
``Qwen2Tokenizer``), carries Qwen's special tokens (``<|im_start|>``, ``<|image_pad|>``, ...)
and adds the 1000 coord tokens as atomic **non-special** tokens after them, in bin order,
so that ``skip_special_tokens=True`` decoding keeps them. Because the image
tokens get small ids rather than 151655/151656, ms-swift needs the project's template
(:mod:`coordexp.core.template`), which reads the ids from the tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from coordexp.build_base.coord_rows import add_coord_tokens, init_coord_rows, padded_vocab_size
from coordexp.build_base.vision_warmup import warm_up_vision
from coordexp.core.codec import COORD_TOKENS
from coordexp.core.config import TinyModelConfig
from coordexp.core.contract import read_jsonl, render_answer
from coordexp.core.geometry import GEOMETRY_KEYS
from coordexp.core.template import PROMPT
from coordexp.core.vocab import write_coord_vocab

_COORD_SPLIT_RE = re.compile(r"<\|coord_\d{1,4}\|>")


def grammar_tokens() -> tuple[str, ...]:
    """The fixed strings of every rendered answer (:func:`coordexp.core.contract.render_answer`) and the
    prompt, which the tiny tokenizer keeps whole (``build_base.tiny.grammar_tokens``).

    Why: byte-level BPE splits at spaces and punctuation, so ``", "`` between two coord tokens costs
    two tokens and ``", "bbox_2d": ["`` eight; a third of the sequence was structure the model
    copies, not chooses. Added tokens are matched before the BPE runs, so the text is unchanged and
    decodes back verbatim.
    """
    return (
        PROMPT,
        '{"object_',
        '"]}, "object_',
        '": {"desc": "',
        *(f'", "{k}": ["' for k in GEOMETRY_KEYS),
        '", "',
        '"]}}',
    )


# Qwen2/3 special tokens, in Qwen's order. ``<|endoftext|>`` is id 0 of the trained BPE.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Non-special added tokens of Qwen3 (ms-swift's qwen3_vl template knows a thinking prefix).
PLAIN_ADDED_TOKENS: tuple[str, ...] = ("<think>", "</think>")

QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# A Qwen-VL style chat template for ``processor.apply_chat_template`` users (vLLM, plain
# transformers inference). Training and the workbench's own inference encode through
# ms-swift's template; this one renders the same text: no default system turn, image
# placeholders where the message puts them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

TINY_DEFAULTS: dict[str, Any] = TinyModelConfig().model_dump()
"""The ``build_base.tiny`` defaults of :mod:`coordexp.core.config` (the one place they are set)."""


def _records_from_jsonl(train_jsonl: Path) -> list[Any]:
    return read_jsonl(train_jsonl, mode="coord")


def _objects_of(record: Any) -> list[Any]:
    return list(record["objects"] if isinstance(record, dict) else record.objects)


def bpe_corpus(records: Iterable[Any], *, grammar: bool = False) -> list[str]:
    """Texts the BPE is trained on: descriptions, rendered answers without coord tokens, prompt, roles.

    Coord tokens are cut out because they are atomic added tokens: merges learnt on
    ``<|coord_`` would be wasted vocabulary, and the BPE only ever sees the pieces between them.
    """
    split = _COORD_SPLIT_RE
    if grammar:  # the grammar tokens are added tokens too: no merges spent on them
        split = re.compile("|".join([_COORD_SPLIT_RE.pattern, *map(re.escape, grammar_tokens())]))
    texts: list[str] = []
    for rec in records:
        objs = _objects_of(rec)
        for o in objs:
            texts.append(o["desc"] if isinstance(o, dict) else o.desc)
        # added tokens split the text before BPE runs: train on the pieces between them
        texts.extend(piece for piece in split.split(render_answer(objs)) if piece)
    # chat scaffolding, repeated so its merges are learnt even from a small data set
    texts += [PROMPT, "user\n", "assistant\n", "system\n", "You are a helpful assistant."] * 8
    return texts


def train_bpe(texts: Sequence[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train Qwen2's byte-level BPE pipeline on ``texts``; returns (vocab, merges).

    The result may hold fewer than ``vocab_size`` entries on a small corpus (BPE stops when
    no pair occurs twice); that is fine and keeps the model smaller.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(texts: Sequence[str], vocab_size: int, *, coord_tokens: bool = True, grammar: bool = False) -> Any:
    """A ``Qwen2Tokenizer`` with a locally trained BPE, Qwen's special tokens, (optionally) the
    answer grammar's fixed strings (:func:`grammar_tokens`) and (optionally) coord tokens."""
    vocab, merges = train_bpe(texts, vocab_size)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    if grammar:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in grammar_tokens()])
    if coord_tokens:
        add_coord_tokens(tok)
    return tok


def tiny_config(
    tokenizer: Any,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vision_hidden_size: int,
    vision_depth: int,
    vision_heads: int,
    patch_size: int,
    tie_word_embeddings: bool = True,
    **_: Any,
) -> Any:
    """A ``Qwen3VLConfig`` with the tokenizer's own special-token ids.

    Embedding rows are ``len(tokenizer)`` rounded up to 64 (like Qwen's padded vocab), so
    the model vocabulary ``V`` differs from the tokenizer length - code that confuses the
    two fails here, on the CPU, rather than on a real checkpoint.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size {hidden_size} must divide by num_heads {num_heads}, and num_heads by num_kv_heads {num_kv_heads}"
        )
    if vision_hidden_size % vision_heads:
        raise ValueError(f"vision_hidden_size {vision_hidden_size} must divide by vision_heads {vision_heads}")
    head_dim = hidden_size // num_heads
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"head_dim = hidden_size / num_heads = {head_dim} must be even and >= 8 (M-RoPE)")
    half = head_dim // 2  # M-RoPE splits the rotary frequencies over (t, h, w)
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>")
    }
    vocab = padded_vocab_size(len(tokenizer))
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        },
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=4 * vision_hidden_size,
        num_heads=vision_heads,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=256,  # a 16x16 learned grid, bilinearly resampled per image
        deepstack_visual_indexes=[0] if vision_depth >= 2 else [],
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def build_processor(
    tokenizer: Any, patch_size: int, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Any:
    """``Qwen3VLProcessor`` (image + video processors, tokenizer, chat template) for the tiny model.

    Pixel bounds default to [4, 1024] merged tokens, so a 128 px image keeps its size.
    """
    unit = (patch_size * 2) ** 2
    min_pixels = min_pixels or 4 * unit
    max_pixels = max_pixels or 1024 * unit
    common = dict(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen3VLVideoProcessor(**common)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def count_parameters(model: Any) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def build_tiny(
    train_jsonl: str | Path | None,
    out_dir: str | Path,
    *,
    records: Sequence[Any] | None = None,
    image_root: str | Path | None = None,
    coord_tokens: bool = True,
    tie_word_embeddings: bool = True,
    **dims: Any,
) -> Path:
    """Build and save the tiny checkpoint into ``out_dir``; returns ``out_dir``.

    ``dims`` are the ``build_base.tiny`` fields (see :data:`TINY_DEFAULTS`; ``vision_warmup`` may
    name only the keys it changes). ``records`` may replace ``train_jsonl`` (tests); the vision
    warm-up (:mod:`coordexp.build_base.vision_warmup`) reads their images under ``image_root`` (default: the
    folder of ``train_jsonl``). ``coord_tokens=False`` builds a plain base model standing in for a
    real Qwen checkpoint in the ``expand`` tests. Writes the model (safetensors), processor,
    tokenizer, chat template, generation config and - with coord tokens - ``coord_vocab.json``.
    """
    unknown = set(dims) - set(TINY_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown tiny model settings {sorted(unknown)}; allowed: {sorted(TINY_DEFAULTS)}")
    cfg = {**TINY_DEFAULTS, **dims}
    cfg["vision_warmup"] = warmup = {**TINY_DEFAULTS["vision_warmup"], **dict(cfg["vision_warmup"])}
    if records is None:
        if train_jsonl is None:
            raise ValueError("build_tiny needs train_jsonl or records")
        records = _records_from_jsonl(Path(train_jsonl))
    if image_root is None and train_jsonl is not None:
        image_root = Path(train_jsonl).parent
    if warmup["steps"] and image_root is None:
        raise ValueError(
            "the vision warm-up reads the training images: pass image_root (or train_jsonl), "
            "or set vision_warmup.steps to 0"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    grammar = bool(cfg["grammar_tokens"])
    tokenizer = build_tokenizer(
        bpe_corpus(records, grammar=grammar), int(cfg["vocab_size"]), coord_tokens=coord_tokens, grammar=grammar
    )
    config = tiny_config(tokenizer, tie_word_embeddings=tie_word_embeddings, **cfg)
    torch.manual_seed(int(cfg["seed"]))
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    if coord_tokens and cfg["coord_init"] == "ordinal":
        coord_ids = tokenizer.convert_tokens_to_ids(list(COORD_TOKENS))
        # scale 1: the code replaces the random rows at their own per-feature spread (mean ~0)
        init_coord_rows(model.get_input_embeddings().weight, coord_ids, min(coord_ids), "ordinal", 1.0)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    processor = build_processor(tokenizer, int(cfg["patch_size"]))
    warmup_figures: dict[str, float] = {}
    if warmup["steps"]:
        warmup_figures = warm_up_vision(
            model,
            processor,
            records,
            Path(image_root),
            steps=int(warmup["steps"]),
            batch_size=int(warmup["batch_size"]),
            learning_rate=float(warmup["learning_rate"]),
            seed=int(cfg["seed"]),
        )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if coord_tokens:
        write_coord_vocab(tokenizer, config.text_config.vocab_size, out)
    (out / "build_info.json").write_text(
        json.dumps(
            {
                "mode": "tiny",
                "settings": cfg,
                "tie_word_embeddings": tie_word_embeddings,
                "coord_tokens": coord_tokens,
                "parameters": count_parameters(model),
                "tokenizer_len": len(tokenizer),
                "vocab_size": config.text_config.vocab_size,
                "vision_warmup": warmup_figures,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return out
