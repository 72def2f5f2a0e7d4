"""The project's trainer: ms-swift's Seq2SeqTrainer plus what the Stage-1 loss and its metrics need.

:func:`coordexp.train.swift_plugin.register` names :class:`CoordExpTrainer` (by dotted path) as
ms-swift's ``causal_lm`` trainer. On top of ms-swift's own trainer it keeps

(a) global token counts per optimizer step, so that each loss term is a mean over the whole
    global batch (all micro-batches, all ranks): see :func:`coordexp.train.loss.global_counts`;
(b) ``token_acc`` over text/structure tokens only (coord accuracy is a token-type metric of its own);
(c) the token typer for the optional per-token-type metrics;
(d) throughput bookkeeping (``coordexp_throughput.json``: wall time, tokens seen, tokens/s);
(e) with ``fused_loss``, model inputs that ask for one position of logits plus the hidden states,
    so that the loss runs through the LM head in chunks and the ``[B, L, V]`` logits never exist.

Counting happens in ``_get_num_items_in_batch``, which the HF trainer calls on every rank once
per optimizer step with all of that step's micro-batches: the all-reduce inside
:func:`coordexp.train.loss.global_counts` is therefore issued by every rank, every step, whatever
its own token counts (a rank without coord tokens cannot hang the others).

Importing this module imports swift: only the swift process loads it (ms-swift imports it by the
dotted name the registration gives).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from swift.metrics import compute_acc
from swift.trainers import Seq2SeqTrainer

from coordexp.train.loss import GlobalCounts, global_counts
from coordexp.train.swift_config import coord_id_map, plugin_config
from coordexp.train.token_types import TokenTyper


class CoordExpTrainer(Seq2SeqTrainer):
    """ms-swift's Seq2SeqTrainer with global Stage-1 token counts and project metrics."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.coordexp_cfg = plugin_config()
        self.coordexp_counts: GlobalCounts | None = None
        self._cmap_cpu = coord_id_map(self.coordexp_cfg)
        self._tokens_seen = 0
        self._t0: float | None = None
        self.token_typer = None
        if self.coordexp_cfg.get("token_type_metrics"):
            self.token_typer = TokenTyper(self.template.tokenizer, self._cmap_cpu)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        n = super()._get_num_items_in_batch(batch_samples, device)
        labels = [b["labels"][:, 1:].cpu() for b in batch_samples if "labels" in b]
        self.coordexp_counts = global_counts(labels, self._cmap_cpu)
        for b in batch_samples if self.model.training else ():  # training tokens only
            mask = b.get("attention_mask")
            self._tokens_seen += int(mask.sum()) if mask is not None else int(b["input_ids"].numel())
        return n

    def _prepare_inputs(self, inputs: Any) -> Any:
        inputs = super()._prepare_inputs(inputs)
        if self.coordexp_cfg.get("fused_loss"):
            # one position of logits (generation needs no more) and the final hidden states for
            # the fused loss: the [B, L, V] logits are never built
            inputs["logits_to_keep"] = 1
            inputs["output_hidden_states"] = True
        return inputs

    def _compute_acc(self, outputs: Any, labels: torch.Tensor, cu_seqlens: Any = None) -> None:
        # token_acc over text/structure tokens only; coord accuracy is a token-type metric of its own.
        cmap = self._cmap_cpu.to(labels.device)
        safe = labels.clamp(min=0, max=cmap.numel() - 1)
        masked = torch.where((labels >= 0) & (cmap[safe] >= 0), torch.full_like(labels, -100), labels)
        argmax = getattr(outputs, "coordexp_argmax", None)
        if argmax is None:
            return super()._compute_acc(outputs, masked, cu_seqlens=cu_seqlens)
        # fused loss: the argmax of each position came from the chunked LM head. Same
        # convention as logits.argmax(-1): position t predicts labels[t + 1].
        metrics = compute_acc(
            argmax,
            masked,
            acc_strategy=self.args.acc_strategy,
            is_encoder_decoder=self.template.is_encoder_decoder,
            cu_seqlens=cu_seqlens,
        )
        mode = "train" if self.model.training else "eval"
        for k, v in metrics.items():
            self.custom_metrics[mode][k].update(v)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._t0 = time.time()
        try:
            return super().train(*args, **kwargs)
        finally:
            self._write_throughput()

    def _write_throughput(self) -> None:
        if not self.is_world_process_zero() or self._t0 is None:
            return
        wall = time.time() - self._t0
        # the process group, not args.world_size: the latter says 1 for CPU (gloo) data parallel
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        out = {
            "wall_time_s": wall,
            "tokens_seen": self._tokens_seen * world,
            "tokens_per_second": self._tokens_seen * world / max(wall, 1e-9),
            "global_step": int(self.state.global_step),
        }
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.args.output_dir) / "coordexp_throughput.json").write_text(json.dumps(out, indent=2))
