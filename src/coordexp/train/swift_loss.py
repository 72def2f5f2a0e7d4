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
batch; in evaluation by the counts of the evaluation step (the batch of every rank). Every call
checks the terms are finite (:func:`coordexp.train.diagnostics.check_finite`) and logs them under
``coord_softce_w1/``, plus the per-token-type metrics when they are on.

What is logged (:func:`_log`, :class:`StepMean`), so that the logged numbers are the trainer's own
at any ``nproc_per_node`` and gradient accumulation:

* ``coord_softce_w1/loss`` is the number the trainer logs as ``loss`` (``eval_loss``): the mean over
  the logging window's optimizer steps of each step's global-batch loss (in evaluation the mean over
  evaluation steps, weighted by their samples, as the HF trainer weights ``eval_loss``). Each
  micro-batch returns ``world_size * local_sum / global_count``; the HF trainer sums the micro-batches
  of a step (no division by the accumulation steps: the loss is ``compute_loss_func``'s) and averages
  over ranks, so a step's ``loss`` is the sum over micro-batches and ranks of ``local_sum /
  global_count``; :class:`StepMean` sums exactly those shares and divides by the number of steps.
* ``text_ce``, ``soft_ce``, ``w1``, ``gate``, ``coord_vocab_mass`` are the same kind of mean of each
  step's global token means (text CE over the step's text tokens, the others over its coord tokens),
  and so are the optional ``text_gate`` (over text tokens) and ``coord_ce`` (over coord tokens), logged
  only when their weight is > 0; so ``loss == text_ce + soft_ce_weight soft_ce + w1_weight w1 +
  gate_weight gate (+ text_gate_weight text_gate + coord_ce_weight coord_ce)`` for the logged values,
  train and eval.
* ``coord_diag/{top1_acc,top5_acc,within2_acc,p_target,expected_mae,spread}`` (with ``train.coord_diag``;
  :func:`coordexp.train.loss.coord_diagnostics`): each step's global means over its coord tokens, reduced
  exactly like the coord terms (a call's sum over the step's global coord count), the CE baseline's too.
* ``coord_tokens``: coord tokens per micro-batch and rank (a plain mean).
* The CE baseline (``coord_soft_ce_w1.enabled: false``) logs the Stage-1 terms as diagnostics but no
  ``coord_softce_w1/loss``: its training loss is the full-vocabulary CE, logged as ``loss``.

Importing this module imports swift: only the swift process loads it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from swift.loss import BaseLoss
from swift.metrics.utils import Metric

from coordexp.train.diagnostics import check_finite
from coordexp.train.fused_loss import fused_stage1_loss
from coordexp.train.loss import COORD_DIAG, COORD_DIAG_PREFIX, OPTIONAL_TERMS, GlobalCounts, stage1_loss
from coordexp.train.swift_config import coord_id_map, plugin_config
from coordexp.train.token_types import token_type_metrics

METRIC_PREFIX = "coord_softce_w1/"

LOSS_KEYS = (
    "soft_ce_weight",
    "w1_weight",
    "gate_weight",
    "text_gate_weight",
    "coord_ce_weight",
    "temperature",
    "target_sigma",
    "target_truncate",
)
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


class StepMean(Metric):
    """``sum(value) / sum(weight)`` with both sums added up over the ranks (in float64) when computed.

    ms-swift's own ``MeanMetric`` counts whole updates; the Stage-1 numbers need fractional weights
    (a micro-batch is ``1 / (world_size * micro_batches)`` of an optimizer step), see :func:`_log`.
    Reset by ms-swift after each logging step, like every custom metric; an empty one logs nothing.
    """

    def __init__(self, device: Any = None):
        super().__init__()
        self.add_state("total", default=0.0)
        self.add_state("weight", default=0.0)
        self.device = device

    def update(self, value: float, weight: float) -> None:
        self.total += float(value)
        self.weight += float(weight)

    def compute(self) -> dict[str, float | None]:
        total, weight = self.total, self.weight
        if dist.is_available() and dist.is_initialized():
            buf = torch.tensor([total, weight], dtype=torch.float64, device=self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            total, weight = buf.tolist()
        return {"value": total / weight if weight > 0 else None}


def _step_mean(metrics: Any, name: str, device: Any) -> StepMean:
    metric = metrics[name] if name in metrics else None
    if not isinstance(metric, StepMean):
        metric = metrics[name] = StepMean(device)
    return metric


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
        step = _step_counts(trainer, num_items_in_batch)
        counts = _loss_counts(trainer, step)
        weights = {k: self.loss_cfg[k] for k in LOSS_KEYS}
        weights["coord_diag"] = bool(self.cfg.get("coord_diag"))
        log = functools.partial(_log, trainer, mode, step, counts, labels.shape[0])
        if self.cfg.get("fused_loss"):
            return self._fused(outputs, labels, trainer, counts, weights, log)
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
        log(res, with_loss=bool(self.loss_cfg["enabled"]))
        if self.cfg.get("token_type_metrics") and getattr(trainer, "token_typer", None) is not None:
            for name, (value, n) in token_type_metrics(trainer.token_typer, logits.detach(), labels, cmap).items():
                _update(trainer.custom_metrics[mode], name, value, n)
        return loss

    def _fused(
        self,
        outputs: Any,
        labels: torch.Tensor,
        trainer: Any,
        counts: GlobalCounts | None,
        weights: dict[str, Any],
        log: Any,
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
        log(res, with_loss=True)
        return res.total


def _step_counts(trainer: Any, num_items_in_batch: Any) -> GlobalCounts | None:
    """The global token counts of the step (optimizer step, or evaluation step) that the trainer gathered.

    :meth:`coordexp.train.trainer.CoordExpTrainer._get_num_items_in_batch` counts them, on every
    rank, right before the micro-batches of a training step and before each evaluation batch
    (HF's ``prediction_step``). None where the trainer counted nothing."""
    counts: GlobalCounts | None = getattr(trainer, "coordexp_counts", None)
    if counts is None or num_items_in_batch is None:
        return None
    return counts


def _loss_counts(trainer: Any, counts: GlobalCounts | None) -> GlobalCounts | None:
    """The step's counts as the loss uses them: their ``world_size`` is the factor the loss applies."""
    if counts is None:
        return None
    # ms-swift multiplies the returned loss by the number of processes itself when it averages
    # tokens across devices; then the world-size factor must not be applied twice.
    if getattr(trainer.args, "average_tokens_across_devices", False) and trainer.model_accepts_loss_kwargs:
        counts = dataclasses.replace(counts, world_size=1)
    return counts


TERMS = ("text_ce", "soft_ce", "w1", "gate", "coord_vocab_mass")
"""The per-term metrics under :data:`METRIC_PREFIX`, besides ``loss`` and ``coord_tokens`` (and the
:data:`coordexp.train.loss.OPTIONAL_TERMS` when their weight is > 0)."""


def _log(
    trainer: Any,
    mode: str,
    step: GlobalCounts | None,
    counts: GlobalCounts | None,
    batch_size: int,
    res: Any,
    *,
    with_loss: bool,
) -> None:
    """Add this call's share of the step's numbers to the ``coord_softce_w1/`` (and ``coord_diag/``) metrics
    (see the module docstring).

    With the step's global counts (``step``; ``counts`` is the same as the loss used it), a call's share
    of a term is its own sum over the step's global count, and its share of the loss is the loss it
    returns divided by the world size: summed over the micro-batches and ranks of a step, that is the
    step's global mean, the step's ``loss``. In training every step weighs 1 (the HF trainer averages
    the steps of a logging window), so a call weighs ``1 / (world_size * micro_batches)``; in evaluation
    a step weighs its samples (HF repeats each rank's loss once per sample: ``eval_loss`` assumes the
    ranks' batches are the same size, as accelerate's even batches make them), so a call adds
    ``world_size * batch_size * share`` and weighs its ``batch_size``. Without counts, the call's own
    means, each call weighing 1 (train) or its batch size (eval).

    ``with_loss=False`` (the CE baseline): the Stage-1 terms only, no ``coord_softce_w1/loss``.
    """
    metrics = trainer.custom_metrics[mode]
    device = getattr(trainer.args, "device", None)
    optional = [name for name in OPTIONAL_TERMS if getattr(res, name) is not None]
    names = [f"{METRIC_PREFIX}{name}" for name in ("loss", *TERMS, *optional)]
    diag = res.coord_diag is not None
    if diag:
        names += [f"{COORD_DIAG_PREFIX}{name}" for name in COORD_DIAG]
    if step is None:
        values = [res.total, res.text_ce, res.soft_ce, res.w1, res.gate, res.coord_vocab_mass]
        values += [getattr(res, name) for name in optional]
        values += list(res.coord_diag.unbind()) if diag else []
        scale = weight = 1.0 if mode == "train" else float(batch_size)
    else:
        dt, dc = step.text_denominator, step.coord_denominator
        loss_world = counts.world_size if counts is not None else step.world_size
        values = [
            res.total.detach() / loss_world,
            res.text_ce_sum / dt,
            res.soft_ce_sum / dc,
            res.w1_sum / dc,
            res.gate_sum / dc,
            res.mass_sum / dc,
        ]
        denominators = {"text_gate": dt, "coord_ce": dc}
        values += [getattr(res, f"{name}_sum") / denominators[name] for name in optional]
        values += list((res.coord_diag_sum / dc).unbind()) if diag else []
        if mode == "train":
            scale, weight = 1.0, 1.0 / (step.world_size * step.micro_batches)
        else:
            scale, weight = float(step.world_size * batch_size), float(batch_size)
    if not with_loss:
        names, values = names[1:], values[1:]
    floats = torch.stack([v.detach().float().reshape(()) for v in values]).tolist()  # one device sync
    for name, value in zip(names, floats):
        _step_mean(metrics, name, device).update(value * scale, weight)
    _update(metrics, f"{METRIC_PREFIX}coord_tokens", float(res.coord_tokens))
