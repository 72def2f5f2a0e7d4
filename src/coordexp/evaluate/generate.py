"""Batched greedy generation with the training template, keeping coord tokens, their probabilities and coord
distributions.

The prompt is built by :func:`coordexp.core.template.build_messages` (``with_answer=False``), the same
builder training uses, and rendered by the checkpoint's own chat template, so the model sees at
inference exactly the token sequence it was trained on (image first, then the instruction).
Decoding keeps the coord tokens (they are non-special added tokens) and records, for every
generated token, the probability the model gave it: object scores are computed from them.

What the distribution says is captured during the one generation pass by :class:`CoordCapture`, the first
logits processor of every step: it normalises the raw scores over the full vocabulary (O(batch x V), freed at
the next step) and keeps per row and step only the chosen token's log-probability and the few numbers of
:data:`coordexp.evaluate.readout.STAT_COLUMNS`. Generation memory therefore does not grow with V x steps, as
keeping ``output_scores`` and stacking their softmax did (``bench/RESULTS.md``, ``## coord_distribution_capture``).
The capture never changes the scores, so the emitted tokens are those of plain greedy decoding (or of whatever
processors follow it, such as the grammar constraint); readouts change only the reported coordinates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from coordexp.core.checkpoint import CheckpointError, read_config, warn_remote_code
from coordexp.core.template import build_messages, to_hf_messages
from coordexp.core.vocab import find_coord_token_ids
from coordexp.evaluate.parse import ParseResult, parse_prediction
from coordexp.evaluate.readout import READOUTS, STAT_COLUMNS, coord_stats
from coordexp.evaluate.scoring import SCORES, build_prediction, object_steps, score_objects


@dataclass
class Generation:
    """One generated answer: its text, per generated step the token, the chosen token's probability and (when
    captured) the coord-distribution statistics, and the character span of each token in ``text``."""

    text: str
    tokens: list[str]
    probs: list[float]
    n_tokens: int
    hit_limit: bool
    stats: np.ndarray | None = None
    """``[n_tokens, len(STAT_COLUMNS)]`` float64, row t for generated step t (see
    :data:`coordexp.evaluate.readout.STAT_COLUMNS`), NaN at the steps that emitted no coord token; ``None`` when
    nothing was captured (then every readout is the emitted bin and only the geometric-mean score is defined)."""
    spans: list[tuple[int, int]] | None = None
    """``(start, end)`` of each generated token's text in ``text``: what ties description characters to the
    steps that wrote them (the ``desc_coord_geomean`` score); ``None`` when unknown."""

    def prediction(
        self, image_id: Any, width: int, height: int, *, readout: str = "argmax", score: str = "coord_geomean"
    ) -> tuple[dict[str, Any], ParseResult]:
        """(prediction record with scored objects, parse result) of this answer for an image of that size.

        Each object's geometry is read with ``readout`` and its ``score`` is the ``score`` definition; the
        object also carries every readout's coordinates under ``readouts`` and every score under ``scores``
        (when the distributions were captured), so one generation is measured under all of them.
        """
        parse = parse_prediction(self.text)
        steps = object_steps(parse, self.tokens, self.spans)
        head = score_objects(parse, self.tokens, self.probs, score=score, stats=self.stats, steps=steps)
        pred = build_prediction(image_id, width, height, parse, head, readout=readout, stats=self.stats, steps=steps)
        if self.stats is not None:
            every = {
                name: score_objects(parse, self.tokens, self.probs, score=name, stats=self.stats, steps=steps)
                for name in SCORES
            }
            alts = {
                name: build_prediction(
                    image_id, width, height, parse, None, readout=name, stats=self.stats, steps=steps
                )
                for name in READOUTS
            }
            for i, obj in enumerate(pred["objects"]):
                kind = next(k for k in obj if k in _GEOMETRY)
                obj["readouts"] = {name: alt["objects"][i][kind] for name, alt in alts.items()}
                obj["scores"] = {name: sc.scores[i] for name, sc in every.items()}
        return pred, parse


_GEOMETRY = ("bbox_2d", "poly", "line")


class CoordCapture(LogitsProcessor):
    """Keeps, per row and generation step, the chosen token's log-probability and the coord distribution's
    statistics, from the raw scores; returns the scores unchanged.

    It must be the first processor of the list: the statistics are the model's distribution, before any mask
    (a grammar constraint) or penalty changes it. At each call it forms the batch's full-vocab log-normaliser
    (max plus a float64-accumulated sum of exponentials, one transient ``[B, V]`` float32 buffer) and holds a copy
    of the raw scores until the next call, where the token this step chose (``input_ids[:, -1]``) is known: its
    log-probability is gathered and, on the rows where it is a coord token, the ``len(STAT_COLUMNS)`` numbers of
    the coord slice's log-probabilities (:func:`coordexp.evaluate.readout.coord_stats`) are kept (NaN on the other
    rows: no readout or score reads a step that wrote no coordinate, and a coord step is about a third of an
    answer's). A copy, because later processors may edit the scores in place; :meth:`finalize` does the last
    step from the returned sequences. Peak memory is O(B x V) whatever the length; what accumulates is
    O(B x steps x 8). One instance serves one ``generate`` call.
    """

    def __init__(self, coord_ids: torch.Tensor | None, local_window: int) -> None:
        self.coord_ids = coord_ids
        self.local_window = int(local_window)
        self._is_coord: torch.Tensor | None = None  # [V] bool, built at the first call
        self._stats: list[np.ndarray] = []
        self._chosen: list[torch.Tensor] = []
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self._steps = 0

    @staticmethod
    def _log_normaliser(scores: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64 log-sum-exp of each row of ``scores`` (half-precision scores are upcast first)."""
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()
        m = scores.max(dim=-1, keepdim=True).values
        total = torch.exp(scores - m).sum(dim=-1, dtype=torch.float64)
        return m[:, 0].to(torch.float64) + torch.log(total)

    def _close_step(self, ids: torch.Tensor) -> None:
        """The previous step's chosen-token log-probability and, where ``ids`` (what it chose) are coord tokens,
        its coord statistics."""
        assert self._prev is not None
        raw, lse = self._prev
        ids = ids.to(raw.device)
        self._chosen.append(raw.gather(1, ids[:, None]).squeeze(1).to(torch.float64) - lse)
        if self.coord_ids is None:
            return
        if self._is_coord is None or self._is_coord.numel() != raw.shape[1]:
            self._is_coord = torch.zeros(raw.shape[1], dtype=torch.bool, device=raw.device)
            self._is_coord[self.coord_ids.to(raw.device)] = True
        rows = torch.nonzero(self._is_coord[ids]).flatten()
        out = np.full((raw.shape[0], len(STAT_COLUMNS)), np.nan)
        if rows.numel():
            sl = raw.index_select(0, rows).index_select(1, self.coord_ids.to(raw.device))
            logp = sl.float().cpu().numpy().astype(np.float64) - lse[rows].cpu().numpy()[:, None]
            out[rows.cpu().numpy()] = coord_stats(logp, self.local_window)
        self._stats.append(out)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._close_step(input_ids[:, -1])
        self._prev = (scores.clone(), self._log_normaliser(scores))
        self._steps += 1
        return scores

    def finalize(self, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(chosen-token log-probs [B, T], stats [B, T, len(STAT_COLUMNS)] or None without coord ids)`` on the
        CPU for the ``T`` steps of ``generated`` (the new tokens only, ``[B, T]``)."""
        n, b = self._steps, generated.shape[0]
        if self._prev is not None:
            self._close_step(generated[:, n - 1])
            self._prev = None
        chosen = torch.stack(self._chosen, dim=1).cpu() if n else torch.zeros(b, 0, dtype=torch.float64)
        if self.coord_ids is None:
            return chosen, None
        stats = np.stack(self._stats, axis=1) if n else np.zeros((b, 0, len(STAT_COLUMNS)))
        return chosen, torch.from_numpy(stats)


def token_spans(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """The character span in ``text`` (the decode of ``ids``) of each token.

    Each token decoded alone usually concatenates to ``text``; when it does not (a character split across
    byte-level tokens), the spans come from the lengths of the decoded prefixes, clamped to be monotone.
    """
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    if "".join(pieces) != text:
        ends = [len(tokenizer.decode(ids[: j + 1], skip_special_tokens=True)) for j in range(len(ids))]
    else:
        ends = list(np.cumsum([len(p) for p in pieces], dtype=np.int64)) if pieces else []
    out: list[tuple[int, int]] = []
    start = 0
    for e in ends:
        end = min(max(int(e), start), len(text))
        out.append((start, end))
        start = end
    return out


def check_checkpoint(path: Path) -> None:
    """A checkpoint folder that a detector can load; else a :class:`CheckpointError` saying what to do."""
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint directory; train first (dvc repro train) or pass a local checkpoint folder"
        )
    read_config(path)
    warn_remote_code(path)


class Detector:
    """A loaded checkpoint that answers detection prompts."""

    def __init__(self, checkpoint: str | Path, *, device: str | None = None, local_window: int = 8):
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
        coord_ids = find_coord_token_ids(self.tokenizer)
        self.coord_ids = torch.tensor(coord_ids, dtype=torch.long) if coord_ids else None
        self.local_window = local_window

    def rows(self, records: list[Any], image_root: Path) -> list[dict[str, Any]]:
        return [build_messages(r, image_root, with_answer=False) for r in records]

    def inputs(self, rows: list[dict[str, Any]]) -> Any:
        """The batch's model inputs (left-padded), rendered by the checkpoint's chat template, on the device."""
        messages = [to_hf_messages(row) for row in rows]
        return self.processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding=True,
        ).to(self.device)

    def greedy_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        """The ``model.generate`` settings of greedy decoding with this checkpoint's end tokens."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "eos_token_id": self.eos_ids,
            "pad_token_id": pad,
        }

    @torch.no_grad()
    def generate(
        self,
        rows: list[dict[str, Any]],
        max_new_tokens: int,
        logits_processors: list[LogitsProcessor] | None = None,
    ) -> list[Generation]:
        """Greedy answers for ``rows``; ``logits_processors`` run after the capture (which sees the raw scores)."""
        inputs = self.inputs(rows)
        capture = CoordCapture(self.coord_ids, self.local_window)
        sequences = self.model.generate(
            **inputs,
            **self.greedy_kwargs(max_new_tokens),
            logits_processor=LogitsProcessorList([capture, *(logits_processors or [])]),
            return_dict_in_generate=False,
        )
        start = inputs["input_ids"].shape[1]
        seqs = sequences[:, start:]
        chosen_logp, stats = capture.finalize(seqs)
        # probability of each chosen token under the model's full-vocab softmax (T = 1), from the raw scores
        chosen = chosen_logp.exp()
        seqs = seqs.cpu()
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
                    stats=stats[b, : len(keep)].numpy() if stats is not None else None,
                    spans=token_spans(self.tokenizer, keep, text),
                )
            )
        return results
