"""The Stage-1 loss as ms-swift's ``compute_loss_func``, and its metrics.

Registered as ``coordexp_stage1`` in ``swift.loss.loss_map`` (:func:`coordexp.train.swift_plugin.register`);
ms-swift builds one :class:`Stage1SwiftLoss` per trainer and calls it on every micro-batch with the
model outputs and the unshifted labels. It computes, by the config (:mod:`coordexp.train.swift_config`):

* the Stage-1 loss (:func:`coordexp.train.loss.stage1_loss`) on the logits, or with ``fused_loss``
  from the final hidden states through the LM head (:func:`coordexp.train.fused_loss.fused_stage1_loss`);
* or, for the baseline (``coord_soft_ce_w1.enabled: false``), plain full-vocab CE on every token,
  with the Stage-1 terms computed alongside for logging only.

In training each term is normalised by the token counts of the whole optimizer step that
:class:`coordexp.train.trainer.CoordExpTrainer` gathered, so the loss is a mean over the global
batch. Every call checks the terms are finite (:func:`coordexp.train.diagnostics.check_finite`)
and logs them under ``coord_softce_w1/`` (token-weighted means), plus the per-token-type metrics
when they are on.

Importing this module imports swift: only the swift process loads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from swift.loss import BaseLoss

from coordexp.train.diagnostics import check_finite
from coordexp.train.fused_loss import fused_stage1_loss
from coordexp.train.loss import GlobalCounts, stage1_loss
from coordexp.train.swift_config import coord_id_map, plugin_config
from coordexp.train.token_types import token_type_metrics

METRIC_PREFIX = "coord_softce_w1/"

LOSS_KEYS = ("soft_ce_weight", "w1_weight", "gate_weight", "temperature", "target_sigma", "target_truncate")
"""The loss-function keywords taken from the config's ``loss`` section (``CoordSoftCEW1Config``)."""


def _align(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align so that logits[:, t] predicts labels[:, t] (swift passes both unshifted).

    The *labels* are shifted (a cheap int copy) rather than the logits: ``logits[:, :-1]`` is not
    viewable as ``[N, V]`` and would cost a full copy of the largest tensor of the step. With
    ``logits_to_keep`` the logits may cover only the last positions; the labels are cut to match.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    if logits.shape[1] != shifted.shape[1]:
        if logits.shape[1] > shifted.shape[1]:
            raise ValueError(f"logits cover {logits.shape[1]} positions but labels only {shifted.shape[1]}")
        shifted = shifted[:, -logits.shape[1] :]
    return logits, shifted


def _update(metrics: Any, name: str, value: float, count: int = 1) -> None:
    """Token-weighted running mean in swift's MeanMetric (a 1-D tensor counts as its length)."""
    metrics[name].update(torch.full((max(count, 1),), float(value)) if count != 1 else torch.tensor(float(value)))


class Stage1SwiftLoss(BaseLoss):
    """``compute_loss_func`` of the trainer: Stage-1 loss, or plain CE for the baseline."""

    def __init__(self, args: Any, trainer: Any):
        super().__init__(args, trainer)
        self.cfg = plugin_config()
        self.loss_cfg = self.cfg["loss"]
        self.cmap: torch.Tensor | None = None

    def _map(self, device: torch.device) -> torch.Tensor:
        if self.cmap is None or self.cmap.device != device:
            self.cmap = coord_id_map(self.cfg).to(device)
        return self.cmap

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor,
        *,
        num_items_in_batch: Any = None,
        loss_scale: Any = None,
        trainer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        trainer = trainer or self.trainer
        mode = "train" if trainer.model.training else "eval"
        counts = _step_counts(trainer, num_items_in_batch) if mode == "train" else None
        weights = {k: self.loss_cfg[k] for k in LOSS_KEYS}
        if self.cfg.get("fused_loss"):
            return self._fused(outputs, labels, trainer, mode, counts, weights)
        logits, labels = _align(outputs.logits, labels)
        cmap = self._map(logits.device)
        if self.loss_cfg["enabled"]:
            res = stage1_loss(logits, labels, cmap, normalizer=counts, **weights)
            loss = res.total
        else:
            # Baseline: full-vocab CE on every supervised token, coord tokens included.
            ce_sum = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1).long(),
                ignore_index=-100,
                reduction="sum",
            )
            n_local = int((labels != -100).sum())
            if counts is not None:
                loss = ce_sum / max(counts.text_tokens + counts.coord_tokens, 1) * counts.world_size
            else:
                loss = ce_sum / max(n_local, 1)
            with torch.no_grad():  # the Stage-1 terms, for comparison only: nothing enters the loss
                res = stage1_loss(logits.detach(), labels, cmap, **weights)
        check_finite(trainer, res, loss, labels, self.cfg)
        _log(trainer.custom_metrics[mode], res, loss if not self.loss_cfg["enabled"] else None)
        if self.cfg.get("token_type_metrics") and getattr(trainer, "token_typer", None) is not None:
            for name, (value, n) in token_type_metrics(trainer.token_typer, logits.detach(), labels, cmap).items():
                _update(trainer.custom_metrics[mode], name, value, n)
        return loss

    def _fused(
        self,
        outputs: Any,
        labels: torch.Tensor,
        trainer: Any,
        mode: str,
        counts: GlobalCounts | None,
        weights: dict[str, Any],
    ) -> torch.Tensor:
        """Stage-1 loss from the last (final-norm) hidden states through the LM head, never [N, V].

        The per-position argmax the fused head finds on its way is attached to ``outputs`` so that
        ``token_acc`` needs no logits either (:meth:`CoordExpTrainer._compute_acc`)."""
        hidden = outputs.hidden_states[-1]
        if hidden.shape[:2] != labels.shape:
            raise ValueError(
                f"fused_loss: hidden states {tuple(hidden.shape)} do not match labels "
                f"{tuple(labels.shape)}; swift's use_logits_to_keep must be off"
            )
        head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
        _, aligned = _align(hidden, labels)
        res = fused_stage1_loss(
            hidden, head.weight, aligned, self._map(hidden.device), bias=head.bias, normalizer=counts, **weights
        )
        outputs.coordexp_argmax = res.argmax.view(labels.shape)
        check_finite(trainer, res, res.total, labels, self.cfg)
        _log(trainer.custom_metrics[mode], res, None)
        return res.total


def _step_counts(trainer: Any, num_items_in_batch: Any) -> GlobalCounts | None:
    """The optimizer step's global token counts, as the trainer gathered them (None outside training)."""
    counts: GlobalCounts | None = getattr(trainer, "coordexp_counts", None)
    if counts is None or num_items_in_batch is None:
        return None
    # ms-swift multiplies the returned loss by the number of processes itself when it averages
    # tokens across devices; then the world-size factor must not be applied twice.
    if getattr(trainer.args, "average_tokens_across_devices", False) and trainer.model_accepts_loss_kwargs:
        counts = dataclasses.replace(counts, world_size=1)
    return counts


def _log(metrics: Any, res: Any, baseline_loss: torch.Tensor | None) -> None:
    p = METRIC_PREFIX
    total = (
        float(res.total.detach())
        if baseline_loss is None
        else float(res.text_ce.detach() + res.soft_ce.detach() + res.w1.detach() + res.gate.detach())
    )
    _update(metrics, f"{p}loss", total)
    _update(metrics, f"{p}text_ce", float(res.text_ce.detach()), res.text_tokens)
    for name in ("soft_ce", "w1", "gate", "coord_vocab_mass"):
        _update(metrics, f"{p}{name}", float(getattr(res, name).detach()), res.coord_tokens)
    _update(metrics, f"{p}coord_tokens", float(res.coord_tokens))
