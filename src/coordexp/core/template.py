"""THE conversation template: one builder for training and inference, and the ms-swift template.

Why one builder: a model evaluated on a prompt laid out differently from its training prompt
(the image after the text instead of before it, say) is evaluated on a prompt it never saw.
:func:`build_messages` is the only place a record turns
into a conversation; training (``with_answer=True``) and inference (``with_answer=False``)
both call it, and :func:`encode_record` runs it through ms-swift's template.

Why a project template: ms-swift's stock ``qwen3_vl`` template hard-codes the image /
video token ids of the real Qwen vocabulary (151655 / 151656). The tiny tokenizer built by
``build_base`` has its own, small ids. :class:`CoordExpQwen3VLTemplate` (registered as
``coordexp_qwen3_vl``) is the stock template with the ids read from the tokenizer; on a
real Qwen checkpoint it is identical to the stock one. ``coordexp_qwen2_5_vl`` does the
same for Qwen2.5-VL checkpoints.

Usage with the CLI: ``swift sft --model DIR --model_type qwen3_vl --template
coordexp_qwen3_vl --external_plugins <a plugin that calls register_swift_template()>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordexp.core import paths
from coordexp.core.checkpoint import SUPPORTED_MODEL_TYPES, CheckpointError, refuse_remote_code, swift_loads_natively
from coordexp.core.checkpoint import model_type as checkpoint_model_type
from coordexp.core.contract import render_answer

PROMPT = "Detect all objects. Answer in JSON with desc and bbox_2d/poly/line as coord tokens."
"""The user instruction; the image comes first, then this text (training and inference alike)."""

IMAGE_TAG = "<image>"
"""ms-swift's placeholder for an image inside a message; replaced by the vision tokens."""

TEMPLATE_NAME = SUPPORTED_MODEL_TYPES["qwen3_vl"].template
TEMPLATE_NAME_QWEN2_5_VL = SUPPORTED_MODEL_TYPES["qwen2_5_vl"].template


# --------------------------------------------------------------------------------------------
# conversation


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def build_messages(record: Any, image_root: str | Path, with_answer: bool) -> dict[str, Any]:
    """ms-swift row for a contract record: ``{"messages": [...], "images": [absolute path]}``.

    The user turn is ``<image>`` followed by :data:`PROMPT`; with ``with_answer`` the
    assistant turn holds the rendered JSON answer (coord tokens as text, which the
    tokenizer maps to single tokens). ``record`` is a contract ``Record`` or its dict;
    ``image_root`` is the folder the record's relative image paths start from (the JSONL
    file's folder).
    """
    images = list(_field(record, "images"))
    if len(images) != 1:
        raise ValueError(f"record {_field(record, 'id')!r}: expected exactly one image, got {len(images)}")
    # held to image_root: a symlink or path that leads elsewhere is refused (PathEscapeError), in train and evaluate
    path = paths.inside(image_root, images[0], where=f"record {_field(record, 'id')!r}: image")
    messages: list[dict[str, str]] = [{"role": "user", "content": IMAGE_TAG + PROMPT}]
    if with_answer:
        messages.append({"role": "assistant", "content": render_answer(list(_field(record, "objects")))})
    return {"messages": messages, "images": [str(path)]}


def to_hf_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A :func:`build_messages` row as transformers chat messages (``processor.apply_chat_template``).

    For inference outside ms-swift (plain ``generate``, vLLM): ``<image>`` tags become
    ``{"type": "image", "image": path}`` parts at the same place, so the rendered prompt is
    token for token the one ms-swift trains on.
    """
    images = iter(row.get("images", []))
    out: list[dict[str, Any]] = []
    for msg in row["messages"]:
        text = msg["content"]
        if text is None:
            continue
        parts: list[dict[str, Any]] = []
        pieces = text.split(IMAGE_TAG)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image", "image": next(images)})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": msg["role"], "content": parts})
    return out


def encode_record(template: Any, record: Any, image_root: str | Path, *, with_answer: bool = True) -> dict[str, Any]:
    """Encode a record with a swift template: ``input_ids``, ``labels`` (-100 on prompt and image
    positions), ``attention_mask`` and the image tensors (``pixel_values``, ``image_grid_thw``).

    For training the template should be in ``train`` mode (``template.set_mode('train')``);
    for inference use ``with_answer=False``, which ends the prompt with the assistant header.
    """
    row = build_messages(record, image_root, with_answer)
    if not with_answer:
        row["messages"].append({"role": "assistant", "content": None})
    encoded = dict(template.encode(row))
    if "attention_mask" not in encoded:
        encoded["attention_mask"] = [1] * len(encoded["input_ids"])
    return encoded


# --------------------------------------------------------------------------------------------
# ms-swift template


def _own_token_ids(template: Any, processor: Any) -> None:
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    ids: dict[str, int] = {}
    for tok in ("<|image_pad|>", "<|video_pad|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == getattr(tokenizer, "unk_token_id", None) or tokenizer.convert_ids_to_tokens(i) != tok:
            raise CheckpointError(
                f"tokenizer of this checkpoint has no {tok} token; it is not a Qwen-VL checkpoint "
                "(build it with the build_base stage)"
            )
        ids[tok] = int(i)
    template.image_token_id = ids["<|image_pad|>"]
    template.video_token_id = ids["<|video_pad|>"]
    # swift mutates ``placeholder_tokens`` in place; give each instance its own list.
    template.placeholder_tokens = ["<|image_pad|>", "<|video_pad|>"]


def _template_classes() -> tuple[type, type]:
    # lazy (here and below): swift is heavy, and inference and the reports use this module without it
    from swift.template.templates.qwen import Qwen2_5VLTemplate, Qwen3VLTemplate

    class CoordExpQwen3VLTemplate(Qwen3VLTemplate):
        """Stock ms-swift Qwen3-VL template with the image/video token ids taken from the tokenizer."""

        def init_processor(self, processor: Any) -> None:
            if processor is not None and not self._processor_inited:
                _own_token_ids(self, processor)
            super().init_processor(processor)

    class CoordExpQwen2_5VLTemplate(Qwen2_5VLTemplate):
        """Stock ms-swift Qwen2.5-VL template with the image/video token ids taken from the tokenizer."""

        def init_processor(self, processor: Any) -> None:
            if processor is not None and not self._processor_inited:
                _own_token_ids(self, processor)
            super().init_processor(processor)

    return CoordExpQwen3VLTemplate, CoordExpQwen2_5VLTemplate


def register_swift_template() -> str:
    """Register ``coordexp_qwen3_vl`` and ``coordexp_qwen2_5_vl`` with ms-swift (idempotent); returns the Qwen3-VL name."""
    from swift.template import TEMPLATE_MAPPING, register_template
    from swift.template.templates.qwen import QwenTemplateMeta

    swift_loads_natively()  # wherever swift meets the project, a checkpoint's auto_map code stays unrun
    if TEMPLATE_NAME in TEMPLATE_MAPPING and TEMPLATE_NAME_QWEN2_5_VL in TEMPLATE_MAPPING:
        return TEMPLATE_NAME
    qwen3, qwen2_5 = _template_classes()
    # Same metadata as swift's own qwen3_vl / qwen2_5_vl registrations.
    register_template(
        QwenTemplateMeta(TEMPLATE_NAME, template_cls=qwen3, default_system=None, thinking_prefix="<think>\n"),
        exist_ok=True,
    )
    register_template(QwenTemplateMeta(TEMPLATE_NAME_QWEN2_5_VL, template_cls=qwen2_5), exist_ok=True)
    return TEMPLATE_NAME


def load_template(
    checkpoint_dir: str | Path,
    *,
    mode: str = "train",
    max_length: int | None = None,
    max_pixels: int | None = None,
) -> Any:
    """Processor + project template for a local checkpoint, the way ``swift sft --model DIR`` loads it.

    Loads only the processor (no weights). ``mode`` is swift's template mode: ``train`` for
    training/evaluation encoding, ``transformers`` for generation.
    """
    from swift.model import get_processor
    from swift.template import get_template

    checkpoint_dir = Path(checkpoint_dir).resolve()
    model_type = checkpoint_model_type(checkpoint_dir)
    refuse_remote_code(checkpoint_dir, stage="loading a template")
    name = SUPPORTED_MODEL_TYPES[model_type].template
    register_swift_template()
    processor = get_processor(str(checkpoint_dir), model_type=model_type, download_model=False)
    template = get_template(processor, template_type=name, max_length=max_length, max_pixels=max_pixels)
    template.set_mode(mode)
    return template
