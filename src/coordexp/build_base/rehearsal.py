"""A rehearsal checkpoint: a folder shaped like a user's Qwen3-VL-2B / Qwen2.5-VL-3B download, with random weights.

Why: no weights can be downloaded here, yet ``build_base.mode: expand``, the template, the fused loss, generation
and the reports must meet what a real user's folder holds: Qwen's real 151k byte-level BPE with its added tokens
at their real ids (:mod:`coordexp.build_base.qwen_bpe`), the real widths (hidden 2048, real head counts, a
151,936-row embedding, tied heads), the real vision patching and ``preprocessor_config.json``. Only the depth is
cut (default 2 decoder layers and a 2-block vision tower) and the weights are random (seeded), so it detects
nothing: it is a rehearsal of the path, never a model. ``config.json`` carries a ``coordexp_rehearsal`` note and
the folder a ``README.md`` saying so.

The widths are those of the public ``config.json`` files of Qwen/Qwen3-VL-2B-Instruct and
Qwen/Qwen2.5-VL-3B-Instruct as recalled (no hub here to re-read them) and checked against what is written down in
this project (shared DESIGN notes: 2048 hidden, 16 heads, Qwen2.5-VL's 2 KV heads and 11008 intermediate, the
vision depths, patch sizes and ``out_hidden_size``) and against transformers' config classes, which accept them.
The values not written down anywhere here (Qwen3-VL-2B's 8 KV heads, 6144 intermediate, rope theta 5e6 and mrope
sections [24, 20, 20]; Qwen2.5-VL's 3420-wide vision MLP) are recalled and flagged as such; a user's own folder
replaces the rehearsal anyway. Layer-index lists follow the reduced tower: Qwen3-VL's deepstack layers keep
their relative place, Qwen2.5-VL's full-attention blocks stay every 8th with the last block full.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from coordexp.build_base.qwen_bpe import REAL_IDS, qwen_tokenizer

ARCHS = ("qwen3_vl", "qwen2_5_vl")
REAL_DEPTH = {"qwen3_vl": (28, 24), "qwen2_5_vl": (36, 32)}
"""(decoder layers, vision blocks) of the public checkpoints."""

NOTE = (
    "coordexp rehearsal checkpoint: the real Qwen vocabulary and widths, reduced depth and RANDOM weights. "
    "It rehearses the pipeline's path at real scale; it is not a model and detects nothing."
)

# Qwen2.5-VL's chat template (a default system turn, image placeholders where the message puts them).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template without its tool-calling and thinking branches (no default system turn).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _spread(real: list[int], real_depth: int, depth: int) -> list[int]:
    """Layer indexes of a ``real_depth`` tower moved to the same relative place in a ``depth`` tower (deduplicated)."""
    return sorted({min(depth - 1, (i * depth) // real_depth) for i in real})


def rehearsal_config(arch: str, layers: int, vision_depth: int) -> Any:
    """The transformers config of the chosen public checkpoint, at ``layers`` / ``vision_depth``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if layers < 1 or vision_depth < 1:
        raise ValueError(f"layers and vision_depth must be >= 1, got {layers} and {vision_depth}")
    ids = dict(
        image_token_id=REAL_IDS["<|image_pad|>"],
        video_token_id=REAL_IDS["<|video_pad|>"],
        vision_start_token_id=REAL_IDS["<|vision_start|>"],
        vision_end_token_id=REAL_IDS["<|vision_end|>"],
    )
    if arch == "qwen3_vl":  # Qwen/Qwen3-VL-2B-Instruct
        text = dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
            bos_token_id=REAL_IDS["<|endoftext|>"],
            eos_token_id=REAL_IDS["<|im_end|>"],
            tie_word_embeddings=True,
        )
        vision = dict(
            depth=vision_depth,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            hidden_act="gelu_pytorch_tanh",
            patch_size=16,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=2048,
            num_position_embeddings=2304,
            deepstack_visual_indexes=_spread([5, 11, 17], 24, vision_depth),
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    # Qwen/Qwen2.5-VL-3B-Instruct
    vision = dict(
        depth=vision_depth,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        hidden_act="silu",
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=112,
        tokens_per_second=2,
        out_hidden_size=2048,
        # the real tower: full attention in every 8th block (7, 15, 23, 31), window attention elsewhere; a reduced
        # tower keeps those that fit and makes its last block full, so both kinds of block run
        fullatt_block_indexes=sorted({i for i in (7, 15, 23, 31) if i < vision_depth} | {vision_depth - 1}),
    )
    text = dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128000,
        max_window_layers=70,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        sliding_window=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=REAL_IDS["<|endoftext|>"],
        eos_token_id=REAL_IDS["<|im_end|>"],
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def rehearsal_processor(arch: str) -> Any:
    """The processor a user's folder carries: the real tokenizer and chat template, the real image processor
    settings (Qwen3-VL: patch 16, mean/std 0.5, 256^2 .. 4096^2 pixels; Qwen2.5-VL: patch 14, CLIP mean/std,
    56^2 .. 12845056 pixels)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if arch == "qwen3_vl":
        processor, video, template = Qwen3VLProcessor, Qwen3VLVideoProcessor, QWEN3_VL_CHAT_TEMPLATE
        patch, mean, std = 16, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        size = {"shortest_edge": 65536, "longest_edge": 16777216}
    else:
        processor, video, template = Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, QWEN2_5_VL_CHAT_TEMPLATE
        patch, mean, std = 14, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        size = {"shortest_edge": 3136, "longest_edge": 12845056}
    common = dict(patch_size=patch, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std, size=size)
    return processor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=video(**common),
        tokenizer=qwen_tokenizer(arch),
        chat_template=template,
    )


def build_rehearsal(
    arch: str,
    out_dir: str | Path,
    *,
    layers: int = 2,
    vision_depth: int = 2,
    seed: int = 0,
    weights: bool = True,
) -> Path:
    """Write the rehearsal checkpoint of ``arch`` into ``out_dir``; returns ``out_dir``.

    Weights are bfloat16 like the public files (the 2-layer Qwen3-VL-2B shape is about 1 GB on disk).
    ``weights=False`` writes the config, processor and tokenizer only (seconds): all that the template, the
    processor and the model-type checks read.
    """
    config = rehearsal_config(arch, layers, vision_depth)
    processor = rehearsal_processor(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.coordexp_rehearsal = NOTE
    if weights:
        cls = Qwen3VLForConditionalGeneration if arch == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=torch.bfloat16)
        model.generation_config = GenerationConfig(
            bos_token_id=REAL_IDS["<|endoftext|>"],
            eos_token_id=[REAL_IDS["<|im_end|>"], REAL_IDS["<|endoftext|>"]],
            pad_token_id=REAL_IDS["<|endoftext|>"],
            do_sample=False,
        )
        model.save_pretrained(out, safe_serialization=True)
    else:
        config.save_pretrained(out)
    # the layout of a hub download (preprocessor_config.json, video_preprocessor_config.json, tokenizer files,
    # chat_template.jinja), not transformers 5's single processor_config.json: expand must read what users have
    processor.image_processor.save_pretrained(out)
    processor.video_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    real_layers, real_vision = REAL_DEPTH[arch]
    (out / "README.md").write_text(
        f"# Rehearsal checkpoint ({arch}), not a model\n\n{NOTE}\n\n"
        f"Built by `coordexp rehearsal-checkpoint --arch {arch} --layers {layers} --vision-depth {vision_depth}` "
        f"(seed {seed}); the public checkpoint has {real_layers} decoder layers and {real_vision} vision blocks.\n",
        encoding="utf-8",
    )
    (out / "rehearsal.json").write_text(
        json.dumps(
            {"arch": arch, "layers": layers, "vision_depth": vision_depth, "seed": seed, "weights": weights}, indent=2
        )
        + "\n",
        encoding="utf-8",
    )
    return out
