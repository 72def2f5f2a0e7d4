"""The project's trainer: ms-swift's Seq2SeqTrainer plus what the Stage-1 loss and its metrics need.

:func:`coordexp.train.swift_plugin.register` names :class:`CoordExpTrainer` (by dotted path) as
ms-swift's ``causal_lm`` trainer. On top of ms-swift's own trainer it keeps

(a) global token counts per optimizer step, so that each loss term is a mean over the whole
    global batch (all micro-batches, all ranks): see :func:`coordexp.train.loss.global_counts`;
(b) ``token_acc`` over text/structure tokens only (coord accuracy is a token-type metric of its own);
(c) the token typer for the optional per-token-type metrics;
(d) throughput bookkeeping (``coordexp_throughput.json``: wall time, tokens seen, tokens/s);
(e) with ``fused_loss``, model inputs that ask for one position of logits plus the hidden states,
    so that the loss runs through the LM head in chunks and the ``[B, L, V]`` logits never exist;
(f) one learning rate per trained part of the model (:data:`LR_KEYS`): with ``train.vit_lr`` /
    ``aligner_lr`` ms-swift's multimodal optimizer gives the vision tower, the merger and the decoder
    param groups of their own, in that order, and the HF trainer would log the first group's rate
    (the vision tower's) as ``learning_rate``. Here ``learning_rate`` is the decoder's (the LLM and
    every other trainable parameter outside the vision tower and merger), ``learning_rate/vit`` the
    vision tower's and ``learning_rate/aligner`` the merger's; a part with no trainable parameters
    is not logged. Only the logged numbers change: the optimizer and its scheduler are ms-swift's;
(g) with the decoder frozen (``train.freeze.llm``) or adapted (``train.tuner: lora``), the coord rows of
    the input embeddings and of the LM head still train: their weights are made trainable again and a
    gradient hook zeroes every other row (:func:`train_coord_rows_only`), so the original vocabulary
    stays bit-identical to the base. With LoRA the adapter file holds the adapters alone, so each checkpoint also gets the coord rows
    (:data:`COORD_ROWS_FILE`), read back on resume and merged by the stage;
(h) the trainable parameter count and its share of all parameters, printed once and written to
    :data:`TRAINABLE_FILE` (the stage logs them to MLflow and ``train.json``).
(i) with an HTTP tracking server, :class:`coordexp.train.outage.OutageAwareMLflowCallback` in place of HF's
    MLflow callback: a server that stays away past ``tracking.outage_limit_s`` gets a checkpoint and a stop
    instead of lost points or a crash.

Counting happens in ``_get_num_items_in_batch``, which the HF trainer calls on every rank once
per optimizer step with all of that step's micro-batches: the all-reduce inside
:func:`coordexp.train.loss.global_counts` is therefore issued by every rank, every step, whatever
its own token counts (a rank without coord tokens cannot hang the others).

Counting also runs before every evaluation batch (HF's ``prediction_step`` calls
``_get_num_items_in_batch``), so evaluation losses are means over the evaluation step's batch of
all ranks, the same quantity at any number of processes (:mod:`coordexp.train.swift_loss`).

Importing this module imports swift: only the swift process loads it (ms-swift imports it by the
dotted name the registration gives).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from swift.metrics import compute_acc
from swift.optimizers.multimodal import get_param_startswith
from swift.trainers import Seq2SeqTrainer
from transformers.integrations import MLflowCallback

from coordexp.train.loss import GlobalCounts, global_counts
from coordexp.train.merge import load_coord_rows, row_weights, save_coord_rows
from coordexp.train.outage import OutageAwareMLflowCallback
from coordexp.train.swift_config import COORD_ROWS_FILE, TRAINABLE_FILE, coord_id_map, plugin_config
from coordexp.train.token_types import TokenTyper

LR_KEYS = {"llm": "learning_rate", "vit": "learning_rate/vit", "aligner": "learning_rate/aligner"}
"""Logged learning rate of each part of the model: the decoder (the headline), the vision tower, the merger."""


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
        self._lr_groups: dict[str, int] | None = None
        if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
            callbacks = self.callback_handler.callbacks
            for i, cb in enumerate(callbacks):  # in its place: ms-swift's later callbacks round the logs in place
                if type(cb) is MLflowCallback:
                    limit = int(self.coordexp_cfg.get("tracking_outage_limit_s", 300))
                    callbacks[i] = OutageAwareMLflowCallback(self.args.output_dir, limit)
        if self.coordexp_cfg.get("token_type_metrics"):
            self.token_typer = TokenTyper(self.template.tokenizer, self._cmap_cpu)
        rows_only = (
            train_coord_rows_only(self.model, self._cmap_cpu) if self.coordexp_cfg.get("coord_rows_only") else []
        )
        self._rows_only = rows_only
        self.coordexp_trainable = trainable_counts(self.model, rows_only, int((self._cmap_cpu >= 0).sum()))
        if self.is_world_process_zero():
            c = self.coordexp_trainable
            print(
                f"[coordexp] trainable parameters: {c['trainable_params']:,} of {c['total_params']:,} "
                f"({100 * c['trainable_share']:.2f}%)",
                flush=True,
            )
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.output_dir) / TRAINABLE_FILE).write_text(json.dumps(c, indent=2))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        n = super()._get_num_items_in_batch(batch_samples, device)
        labels = [b["labels"][:, 1:].cpu() for b in batch_samples if "labels" in b]
        self.coordexp_counts = global_counts(labels, self._cmap_cpu)
        for b in batch_samples if self.model.training else ():  # training tokens only
            mask = b.get("attention_mask")
            self._tokens_seen += int(mask.sum()) if mask is not None else int(b["input_ids"].numel())
        return n

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "learning_rate" in logs:  # a training log: one rate per part (see (f) above)
            logs.update(self._learning_rates())
        return super().log(logs, *args, **kwargs)

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        if optimizer is not None:  # which group is which part, before DeepSpeed flattens the groups' tensors
            self._lr_groups = lr_groups(self.accelerator.unwrap_model(model or self.model), optimizer.param_groups)
        return optimizer

    def _learning_rates(self) -> dict[str, float]:
        """``{LR_KEYS[part]: current rate of the part's param group}``; empty where it cannot tell."""
        if self.optimizer is None or not self._lr_groups:
            return {}
        rates = [g["lr"] for g in self.optimizer.param_groups]
        try:  # what the HF trainer logs, per group (the same numbers as the groups', after the scheduler's step)
            last = self.lr_scheduler.get_last_lr() if self.lr_scheduler is not None else rates
            rates = last if len(last) == len(rates) else rates
        except AssertionError:  # DeepSpeed's dynamic loss scale before its first step (as in the HF trainer)
            pass
        return {LR_KEYS[part]: float(rates[i]) for part, i in self._lr_groups.items() if i < len(rates)}

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        if self._rows_only and not self._saves_whole_model():
            save_coord_rows(self.model, self._cmap_cpu, Path(output_dir or self.args.output_dir) / COORD_ROWS_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        rows = Path(resume_from_checkpoint) / COORD_ROWS_FILE
        if self._rows_only and rows.is_file():  # the adapter file does not hold them
            load_coord_rows(self.accelerator.unwrap_model(model or self.model), rows)

    def _saves_whole_model(self) -> bool:
        """Whether a checkpoint holds every weight (full training) rather than an adapter's alone."""
        from peft import PeftModel

        return not isinstance(self.accelerator.unwrap_model(self.model), PeftModel)

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


def lr_groups(model: Any, param_groups: list[dict[str, Any]]) -> dict[str, int]:
    """``{part: index of the first param group holding a parameter of that part}`` for the parts of
    :data:`LR_KEYS`. The vision tower and merger are ms-swift's ``model_arch.vision_tower`` /
    ``aligner`` prefixes (as its multimodal optimizer splits them); everything else trained is ``llm``."""
    arch = getattr(getattr(model, "model_meta", None), "model_arch", None)
    part: dict[int, str] = {}
    if arch is not None:
        aligner = list(getattr(arch, "aligner", None) or [])
        part.update(
            {id(p): "vit" for _, p in get_param_startswith(model, getattr(arch, "vision_tower", None), aligner)}
        )
        part.update({id(p): "aligner" for _, p in get_param_startswith(model, aligner)})
    out: dict[str, int] = {}
    for i, group in enumerate(param_groups):
        for p in group["params"]:
            out.setdefault(part.get(id(p), "llm"), i)
    return dict(sorted(out.items(), key=lambda kv: list(LR_KEYS).index(kv[0])))


def train_coord_rows_only(model: Any, cmap: torch.Tensor) -> list[torch.nn.Parameter]:
    """Make the input embeddings and the LM head trainable in their coord rows alone; returns their weights.

    The weights get ``requires_grad`` back (ms-swift's ``--freeze_llm`` froze them with the decoder) and a
    gradient hook that zeroes every row outside ``cmap``'s coord ids, so that the optimizer never moves an
    original vocabulary row (Adam's moments of those rows stay zero; weight decay is refused by the config).
    A tied head is the embedding's own weight: one hook, not two."""
    weights = list(row_weights(model).values())
    ids = torch.nonzero(cmap >= 0).flatten()
    for w in weights:
        keep = torch.zeros(w.shape[0], 1, dtype=torch.bool)
        keep[ids[ids < w.shape[0]]] = True
        w.requires_grad_(True)
        w.register_hook(lambda g, keep=keep: g.masked_fill(~keep.to(g.device), 0))
    return weights


def trainable_counts(model: Any, rows_only: list[torch.nn.Parameter], n_coord: int) -> dict[str, Any]:
    """``trainable_params`` (a coord-rows-only weight counts its coord rows), ``total_params`` (tied weights
    once) and ``trainable_share`` of the model as the trainer will optimise it."""
    total = trainable = 0
    for p in model.parameters():  # each shared (tied) parameter once
        total += p.numel()
        if any(p is w for w in rows_only):
            trainable += min(n_coord, p.shape[0]) * (p.numel() // p.shape[0])
        elif p.requires_grad:
            trainable += p.numel()
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1)}
