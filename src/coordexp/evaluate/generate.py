"""Batched greedy generation with the training template, keeping coord tokens and their probabilities.

The prompt is built by :func:`coordexp.core.template.build_messages` (``with_answer=False``), the same
builder training uses, and rendered by the checkpoint's own chat template, so the model sees at
inference exactly the token sequence it was trained on (image first, then the instruction).
Decoding keeps the coord tokens (they are non-special added tokens) and records, for every
generated token, the probability the model gave it: object scores are computed from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from coordexp.core.checkpoint import CheckpointError, read_config
from coordexp.core.template import build_messages, to_hf_messages
from coordexp.evaluate.parse import ParseResult, parse_prediction
from coordexp.evaluate.scoring import build_prediction, score_objects


@dataclass
class Generation:
    text: str
    tokens: list[str]
    probs: list[float]
    n_tokens: int
    hit_limit: bool

    def prediction(self, image_id: Any, width: int, height: int) -> tuple[dict[str, Any], ParseResult]:
        """(prediction record with scored objects, parse result) of this answer for an image of that size."""
        parse = parse_prediction(self.text)
        return build_prediction(image_id, width, height, parse, score_objects(parse, self.tokens, self.probs)), parse


def check_checkpoint(path: Path) -> None:
    """A checkpoint folder that a detector can load; else a :class:`CheckpointError` saying what to do."""
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint directory; train first (dvc repro train) or pass a local checkpoint folder"
        )
    read_config(path)


class Detector:
    """A loaded checkpoint that answers detection prompts."""

    def __init__(self, checkpoint: str | Path, *, device: str | None = None):
        self.checkpoint = Path(checkpoint)
        check_checkpoint(self.checkpoint)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processor = AutoProcessor.from_pretrained(self.checkpoint, local_files_only=True)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(self.checkpoint, local_files_only=True)
        self.model.to(self.device).eval()
        gen_cfg = self.checkpoint / "generation_config.json"
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id") if gen_cfg.is_file() else None
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.eos_ids = sorted({i for i in [*ids, im_end, self.tokenizer.eos_token_id] if isinstance(i, int) and i >= 0})

    def rows(self, records: list[Any], image_root: Path) -> list[dict[str, Any]]:
        return [build_messages(r, image_root, with_answer=False) for r in records]

    @torch.no_grad()
    def generate(
        self,
        rows: list[dict[str, Any]],
        max_new_tokens: int,
        logits_processors: list[LogitsProcessor] | None = None,
    ) -> list[Generation]:
        """Greedy answers to ``rows``; ``logits_processors`` (e.g. the answer grammar's,
        :meth:`coordexp.evaluate.grammar.Grammar.processor`) reshape each step's scores before the arg-max."""
        messages = [to_hf_messages(row) for row in rows]
        inputs = self.processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList(logits_processors or []),
        )
        start = inputs["input_ids"].shape[1]
        seqs = out.sequences[:, start:].cpu()
        # probability of each chosen token under the model's full-vocab softmax (T = 1)
        step_probs = torch.stack([torch.softmax(s.float(), dim=-1) for s in out.scores], dim=1).cpu()
        chosen = step_probs.gather(2, seqs[:, : step_probs.shape[1], None]).squeeze(2)
        results = []
        for b in range(seqs.shape[0]):
            ids = seqs[b].tolist()
            end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
            keep = ids[:end] if end is not None else ids
            text = self.tokenizer.decode(keep, skip_special_tokens=True)
            results.append(
                Generation(
                    text=text,
                    tokens=self.tokenizer.convert_ids_to_tokens(keep),
                    probs=[float(p) for p in chosen[b, : len(keep)]],
                    n_tokens=len(keep),
                    hit_limit=end is None,
                )
            )
        return results
