"""ms-swift plugin: the project's template, trainer and Stage-1 loss, registered on import.

``swift sft --external_plugins src/coordexp/swift_external/plugin.py`` imports it in every rank
before the trainer is built. It reads its settings from the JSON file named by ``COORDEXP_TRAIN_CONFIG`` (written by
the ``train`` stage) and registers:

* the project template (``coordexp.template``), so training and inference share one template;
* the loss ``coordexp_stage1`` in ``swift.loss.loss_map``: :class:`Stage1SwiftLoss`;
* :class:`CoordExpTrainer` as the ``causal_lm`` trainer: ms-swift's own Seq2SeqTrainer plus
  (a) global token counts per optimizer step, so each loss term is a mean over the whole
  global batch (all micro-batches, all ranks), (b) ``token_acc`` over text/structure tokens
  only, (c) optional per-token-type metrics, (d) throughput bookkeeping, (e) a guard that
  stops at the first non-finite loss term, (f) with ``fused_loss`` the model is asked for one
  position of logits plus its hidden states, and the loss runs through the LM head in chunks.

Counting happens in ``_get_num_items_in_batch``, which the HF trainer calls on every rank once
per optimizer step with all of that step's micro-batches: the all-reduce inside
:func:`coordexp.losses.global_counts` is therefore issued by every rank, every step, whatever
its own token counts (a rank without coord tokens cannot hang the others).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from coordexp.fused_loss import fused_stage1_loss
from coordexp.losses import GlobalCounts, global_counts, stage1_loss
from coordexp.template import register_swift_template
from coordexp.token_types import TokenTyper, token_type_metrics

CONFIG_ENV = "COORDEXP_TRAIN_CONFIG"
LOSS_NAME = "coordexp_stage1"
METRIC_PREFIX = "coord_softce_w1/"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; training stops before the optimizer step uses it."""


def plugin_config() -> dict[str, Any]:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set: the train stage writes it; run `dvc repro train`")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _coord_id_map(cfg: dict[str, Any]) -> torch.Tensor:
    from coordexp.vocab import coord_id_map_from_vocab

    return coord_id_map_from_vocab(cfg["coord_vocab"])


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
        shifted = shifted[:, -logits.shape[1]:]
    return logits, shifted


def _update(metrics: Any, name: str, value: float, count: int = 1) -> None:
    """Token-weighted running mean in swift's MeanMetric (a 1-D tensor counts as its length)."""
    metrics[name].update(torch.full((max(count, 1),), float(value)) if count != 1 else torch.tensor(float(value)))


class Stage1SwiftLoss:
    """``compute_loss_func`` of the trainer: Stage-1 loss, or plain CE for the baseline.

    Subclasses swift's ``BaseLoss`` at registration time (see :func:`register`), so importing
    this module does not require swift.
    """

    def __init__(self, args: Any, trainer: Any):
        self.args = args
        self.trainer = trainer
        self.cfg = plugin_config()
        self.loss_cfg = self.cfg["loss"]
        self.cmap: torch.Tensor | None = None

    def _map(self, device: torch.device) -> torch.Tensor:
        if self.cmap is None or self.cmap.device != device:
            self.cmap = _coord_id_map(self.cfg).to(device)
        return self.cmap

    def __call__(self, outputs: Any, labels: torch.Tensor, *, num_items_in_batch: Any = None,
                 loss_scale: Any = None, trainer: Any = None, **kwargs: Any) -> torch.Tensor:
        trainer = trainer or self.trainer
        mode = "train" if trainer.model.training else "eval"
        counts = _step_counts(trainer, num_items_in_batch) if mode == "train" else None
        weights = {k: self.loss_cfg[k] for k in ("soft_ce_weight", "w1_weight", "gate_weight", "temperature",
                                                 "target_sigma", "target_truncate")}
        if self.cfg.get("fused_loss"):
            return self._fused(outputs, labels, trainer, mode, counts, weights)
        logits, labels = _align(outputs.logits, labels)
        if _inject_fault(trainer):
            logits = logits * float("nan")
        cmap = self._map(logits.device)
        if self.loss_cfg["enabled"]:
            res = stage1_loss(logits, labels, cmap, normalizer=counts, **weights)
            loss = res.total
        else:
            # Baseline: full-vocab CE on every supervised token, coord tokens included.
            ce_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                                     ignore_index=-100, reduction="sum")
            n_local = int((labels != -100).sum())
            if counts is not None:
                loss = ce_sum / max(counts.text_tokens + counts.coord_tokens, 1) * counts.world_size
            else:
                loss = ce_sum / max(n_local, 1)
            with torch.no_grad():  # the Stage-1 terms, for comparison only: nothing enters the loss
                res = stage1_loss(logits.detach(), labels, cmap, **weights)
        _check_finite(trainer, res, loss, labels, self.cfg)
        _log(trainer.custom_metrics[mode], res, loss if not self.loss_cfg["enabled"] else None)
        if self.cfg.get("token_type_metrics") and getattr(trainer, "token_typer", None) is not None:
            for name, (value, n) in token_type_metrics(trainer.token_typer, logits.detach(), labels, cmap).items():
                _update(trainer.custom_metrics[mode], name, value, n)
        return loss

    def _fused(self, outputs: Any, labels: torch.Tensor, trainer: Any, mode: str, counts: GlobalCounts | None,
               weights: dict[str, Any]) -> torch.Tensor:
        """Stage-1 loss from the last (final-norm) hidden states through the LM head, never [N, V].

        The per-position argmax the fused head finds on its way is attached to ``outputs`` so that
        ``token_acc`` needs no logits either (:meth:`CoordExpTrainer._compute_acc`)."""
        hidden = outputs.hidden_states[-1]
        if hidden.shape[:2] != labels.shape:
            raise ValueError(f"fused_loss: hidden states {tuple(hidden.shape)} do not match labels "
                             f"{tuple(labels.shape)}; swift's use_logits_to_keep must be off")
        if _inject_fault(trainer):
            hidden = hidden * float("nan")
        head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
        _, aligned = _align(hidden, labels)
        res = fused_stage1_loss(hidden, head.weight, aligned, self._map(hidden.device), bias=head.bias,
                                normalizer=counts, **weights)
        outputs.coordexp_argmax = res.argmax.view(labels.shape)
        _check_finite(trainer, res, res.total, labels, self.cfg)
        _log(trainer.custom_metrics[mode], res, None)
        return res.total


def _step_counts(trainer: Any, num_items_in_batch: Any) -> GlobalCounts | None:
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
    total = float(res.total.detach()) if baseline_loss is None else float(
        res.text_ce.detach() + res.soft_ce.detach() + res.w1.detach() + res.gate.detach())
    _update(metrics, f"{p}loss", total)
    _update(metrics, f"{p}text_ce", float(res.text_ce.detach()), res.text_tokens)
    for name in ("soft_ce", "w1", "gate", "coord_vocab_mass"):
        _update(metrics, f"{p}{name}", float(getattr(res, name).detach()), res.coord_tokens)
    _update(metrics, f"{p}coord_tokens", float(res.coord_tokens))


FAULT_ENV = "COORDEXP_FAULT_NAN_AT_STEP"
"""Fault injection for the reliability tests: poison the logits at this optimizer step."""


def _inject_fault(trainer: Any) -> bool:
    step = os.environ.get(FAULT_ENV)
    return bool(step) and trainer.model.training and int(step) == int(trainer.state.global_step)


def batch_images(trainer: Any, labels: torch.Tensor, cfg: dict[str, Any]) -> list[str]:
    """The images of a batch, found by matching each row's supervised answer text to the training rows.

    Batches carry no sample ids (ms-swift drops unknown columns), but every answer is the rendered
    JSON of one record, so the decoded labels identify it. Only run when something went wrong.
    """
    rows_file = cfg.get("train_rows")
    tok = getattr(getattr(trainer, "template", None), "tokenizer", None)
    if not rows_file or tok is None or not Path(rows_file).is_file():
        return ["(unknown)"]
    by_answer: dict[str, list[str]] = {}
    for line in Path(rows_file).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answer = next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
        by_answer.setdefault(answer.strip(), []).extend(row.get("images", []))
    found = []
    for b in range(labels.shape[0]):
        ids = [int(t) for t in labels[b].tolist() if t != -100]
        text = tok.decode(ids, skip_special_tokens=True).strip()
        found.append(",".join(by_answer.get(text, ["(unmatched)"])))
    return found


def _check_finite(trainer: Any, res: Any, loss: torch.Tensor, labels: torch.Tensor | None = None,
                  cfg: dict[str, Any] | None = None) -> None:
    terms = {"loss": loss, "text_ce": res.text_ce, "soft_ce": res.soft_ce, "w1": res.w1, "gate": res.gate}
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        step = getattr(getattr(trainer, "state", None), "global_step", "?")
        try:
            ids = batch_images(trainer, labels, cfg or {}) if labels is not None else None
        except Exception as exc:  # noqa: BLE001 - the diagnosis must not hide the NaN itself
            ids = [f"(could not identify: {exc})"]
        msg = (f"non-finite loss term(s) {', '.join(bad)} at step {step} (batch images: {ids}); training "
               f"stopped before the optimizer used it; the last good checkpoint is intact. Lower "
               f"train.learning_rate or check those samples.")
        out = getattr(getattr(trainer, "args", None), "output_dir", None)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "coordexp_failure.txt").write_text(msg + "\n")
        raise NonFiniteLossError(msg)


def _trainer_class() -> type:
    from swift.trainers import Seq2SeqTrainer

    class CoordExpTrainer(Seq2SeqTrainer):
        """ms-swift's Seq2SeqTrainer with global Stage-1 token counts and project metrics."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.coordexp_cfg = plugin_config()
            self.coordexp_counts: GlobalCounts | None = None
            self._cmap_cpu = _coord_id_map(self.coordexp_cfg)
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
            # token_acc over text/structure tokens only (the spec's metric); coord accuracy is a
            # token-type metric of its own.
            cmap = self._cmap_cpu.to(labels.device)
            safe = labels.clamp(min=0, max=cmap.numel() - 1)
            masked = torch.where((labels >= 0) & (cmap[safe] >= 0), torch.full_like(labels, -100), labels)
            argmax = getattr(outputs, "coordexp_argmax", None)
            if argmax is None:
                return super()._compute_acc(outputs, masked, cu_seqlens=cu_seqlens)
            # fused loss: the argmax of each position came from the chunked LM head. Same
            # convention as logits.argmax(-1): position t predicts labels[t + 1].
            from swift.metrics import compute_acc

            metrics = compute_acc(argmax, masked, acc_strategy=self.args.acc_strategy,
                                  is_encoder_decoder=self.template.is_encoder_decoder, cu_seqlens=cu_seqlens)
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
            out = {"wall_time_s": wall, "tokens_seen": self._tokens_seen * world,
                   "tokens_per_second": self._tokens_seen * world / max(wall, 1e-9),
                   "global_step": int(self.state.global_step)}
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.output_dir) / "coordexp_throughput.json").write_text(json.dumps(out, indent=2))

    return CoordExpTrainer


_REGISTERED = False


def register() -> None:
    """Register template, loss and trainer with ms-swift (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from swift.loss import BaseLoss, loss_map
    from swift.trainers import trainer_factory

    register_swift_template()
    loss_map[LOSS_NAME] = type("Stage1SwiftLossImpl", (Stage1SwiftLoss, BaseLoss), {})
    cls = _trainer_class()
    globals()["CoordExpTrainer"] = cls
    trainer_factory.TrainerFactory.TRAINER_MAPPING["causal_lm"] = "coordexp.swift_plugin.CoordExpTrainer"
    _REGISTERED = True


PLUGIN_FILE = Path(__file__).resolve().parent / "swift_external" / "plugin.py"
"""What ``--external_plugins`` gets."""
