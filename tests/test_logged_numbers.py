"""The logged numbers are the trainer's numbers, at any number of processes and gradient accumulation.

:class:`coordexp.train.swift_loss.Stage1SwiftLoss` is driven the way the HF trainer and ms-swift drive
it (the counts of each step gathered first, ms-swift's factor ``num_processes`` on the returned loss,
the micro-batch losses of a step summed, averaged over ranks and logging steps for ``loss``; each
evaluation batch's loss repeated once per sample and averaged for ``eval_loss``), and ms-swift's own
``compute_custom_metrics`` turns the metrics into log values. Checked for every scenario:

* ``coord_softce_w1/loss == loss`` and ``eval_coord_softce_w1/loss == eval_loss``;
* ``loss == text_ce + soft_ce_weight soft_ce + w1_weight w1 + gate_weight gate`` (``+ text_gate_weight text_gate
  + coord_ce_weight coord_ce`` with the optional terms on) for the logged values;
* each term is the global token mean of its step (``stage1_loss`` on the whole global batch at once),
  averaged over the logging window's steps; so is each ``coord_diag/*`` diagnostic (with ``train.coord_diag``;
  no ``coord_diag/`` key without it), the CE baseline's too.

One and two processes (gloo, CPU), with and without accumulation. The slow end-to-end version of the
same identities, on the MLflow store of real ``swift sft`` runs, is ``tests/test_logged_numbers_e2e.py``.
"""

from __future__ import annotations

import collections
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coordexp.core.codec import K
from coordexp.train.loss import COORD_DIAG

N_TEXT = 40
V = K + N_TEXT
L = 7
STEPS = 2  # optimizer steps in the logging window
LOSS = dict(
    soft_ce_weight=0.2,
    w1_weight=2.0,
    gate_weight=1.0,
    text_gate_weight=0.0,
    coord_ce_weight=0.0,
    temperature=0.8,
    target_sigma=2.0,
    target_truncate=8,
)
LOSS_OPTIONAL = {**LOSS, "text_gate_weight": 0.5, "coord_ce_weight": 0.3}
"""The same with the optional terms on (logged as ``text_gate`` and ``coord_ce``)."""
PREFIX = "coord_softce_w1/"
TERMS = ("text_ce", "soft_ce", "w1", "gate", "coord_vocab_mass")
OPTIONAL = ("text_gate", "coord_ce")
DIAG_PREFIX = "coord_diag/"


def _cmap() -> torch.Tensor:
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    cmap = torch.full((V,), -1, dtype=torch.long)
    cmap[perm[:K]] = torch.arange(K)
    return cmap


def _batch(g: torch.Generator, b: int, cmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unshifted ``(logits [b, L, V], labels [b, L])``, a different mix of text and coord tokens each time."""
    coord_ids = torch.nonzero(cmap >= 0).flatten()
    text_ids = torch.nonzero(cmap < 0).flatten()
    logits = torch.randn(b, L, V, generator=g) * 3
    labels = text_ids[torch.randint(0, N_TEXT, (b, L), generator=g)]
    share = float(torch.rand((), generator=g)) * 0.8
    coord = coord_ids[torch.randint(0, K, (b, L), generator=g)]
    labels = torch.where(torch.rand(b, L, generator=g) < share, coord, labels)
    labels[torch.rand(b, L, generator=g) < 0.25] = -100
    labels[:, 0] = -100
    return logits, labels


def _data(world: int, ga: int, cmap: torch.Tensor):
    """Train: ``[step][rank * ga + micro]``; eval: ``[step][rank]`` (equal sizes across the ranks of a
    step, as accelerate's even batches make them; 2 samples per rank, then 1)."""
    g = torch.Generator().manual_seed(11)
    train = [[_batch(g, 1 + (j % 3), cmap) for j in range(world * ga)] for _ in range(STEPS)]
    evals = [[_batch(g, b, cmap) for _ in range(world)] for b in (2, 1)]
    return train, evals


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor]], cmap: torch.Tensor, loss: dict) -> dict[str, float]:
    """The Stage-1 loss of a whole global batch at once (plain per-term means) and the full-vocab CE."""
    from coordexp.train.loss import stage1_loss

    z = torch.cat([lg[:, :-1].reshape(-1, V) for lg, _ in batches])
    y = torch.cat([lab[:, 1:].reshape(-1) for _, lab in batches])
    res = stage1_loss(z, y, cmap, **loss, coord_diag=True)
    out = {name: float(getattr(res, name)) for name in TERMS}
    out.update({f"{DIAG_PREFIX}{name}": float(v) for name, v in zip(COORD_DIAG, res.coord_diag)})
    out.update({name: float(getattr(res, name)) for name in OPTIONAL if getattr(res, name) is not None})
    out["loss"] = float(res.total)
    out["ce"] = float(torch.nn.functional.cross_entropy(z, y, ignore_index=-100))
    return out


class _Trainer(SimpleNamespace):
    """What the loss reads of ms-swift's trainer."""


def _trainer(swift_scales: bool) -> _Trainer:
    from swift.metrics.utils import MeanMetric

    def metric() -> MeanMetric:
        return MeanMetric(nan_value=None, device=torch.device("cpu"))

    return _Trainer(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(average_tokens_across_devices=swift_scales, device=torch.device("cpu"), output_dir=None),
        model_accepts_loss_kwargs=True,
        custom_metrics={"train": collections.defaultdict(metric), "eval": collections.defaultdict(metric)},
        coordexp_counts=None,
        token_typer=None,
    )


def _loss_fn(enabled: bool, cmap: torch.Tensor, loss: dict, diag: bool = False):
    from coordexp.train.swift_loss import Stage1SwiftLoss

    fn = Stage1SwiftLoss.__new__(Stage1SwiftLoss)  # without the plugin config file
    fn.cfg = {"loss": {"enabled": enabled, **loss}, "fused_loss": False, "token_type_metrics": False}
    fn.cfg["coord_diag"] = diag
    fn.loss_cfg, fn.cmap, fn.trainer = fn.cfg["loss"], cmap, None
    return fn


def _drive(
    world: int, rank: int, ga: int, enabled: bool, swift_scales: bool, optional: bool = False, diag: bool = False
) -> dict[str, dict[str, float]]:
    """One rank's view of a logging window (STEPS optimizer steps) and an evaluation, as the HF
    trainer and ms-swift run them; returns the train and eval logs (rank 0's are what is logged)."""
    from swift.trainers.mixin import SwiftMixin

    from coordexp.train.loss import global_counts

    cmap = _cmap()
    train, evals = _data(world, ga, cmap)
    tr, fn = _trainer(swift_scales), _loss_fn(enabled, cmap, LOSS_OPTIONAL if optional else LOSS, diag)

    def swift_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = fn(SimpleNamespace(logits=logits), labels, num_items_in_batch=torch.tensor(1), trainer=tr)
        return loss * world if swift_scales else loss  # ms-swift's compute_loss, average_tokens_across_devices

    tr_loss = torch.zeros(())
    for step in train:
        mine = step[rank * ga : (rank + 1) * ga]
        tr.coordexp_counts = global_counts([lab[:, 1:] for _, lab in mine], cmap)  # CoordExpTrainer
        for logits, labels in mine:
            tr_loss += swift_loss(logits, labels).detach()  # no division by ga: compute_loss_func is set
    if world > 1:
        dist.all_reduce(tr_loss)
    train_logs = {"loss": float(tr_loss) / world / STEPS}
    train_logs.update(SwiftMixin.compute_custom_metrics(tr.custom_metrics["train"]))

    tr.model.training = False
    losses = []
    for step in evals:
        logits, labels = step[rank]
        tr.coordexp_counts = global_counts([labels[:, 1:]], cmap)  # prediction_step -> _get_num_items_in_batch
        losses.append(swift_loss(logits, labels).detach().repeat(labels.shape[0]))
    mine = torch.cat(losses)
    if world > 1:
        parts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        mine = torch.cat(parts)
    eval_logs = {"eval_loss": float(mine.mean())}
    eval_logs.update(SwiftMixin.compute_custom_metrics(tr.custom_metrics["eval"], "eval_"))
    return {"train": train_logs, "eval": eval_logs}


def _check(
    logs: dict[str, dict[str, float]], world: int, ga: int, enabled: bool, optional: bool = False, diag: bool = False
) -> None:
    cmap = _cmap()
    loss = LOSS_OPTIONAL if optional else LOSS
    train, evals = _data(world, ga, cmap)
    ref_train = [_reference(step, cmap, loss) for step in train]
    ref_eval = [(_reference(step, cmap, loss), sum(lab.shape[0] for _, lab in step)) for step in evals]
    terms = TERMS + (OPTIONAL if optional else ())
    n_eval = sum(n for _, n in ref_eval)
    for split, pre, refs in (
        ("train", "", [(r, 1) for r in ref_train]),
        ("eval", "eval_", ref_eval),
    ):
        got = logs[split]
        total = sum(n for _, n in refs)
        diags = [f"{DIAG_PREFIX}{name}" for name in COORD_DIAG]
        want = {k: sum(r[k] * n for r, n in refs) / total for k in (*terms, *diags, "loss", "ce")}
        for name in diags:  # the global coord-token means of each step, averaged like the terms; only when on
            assert (f"{pre}{name}" in got) == diag, (split, name)
            if diag:
                assert got[f"{pre}{name}"] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (split, name)
        for name in terms:  # the global token means of each step, averaged like the loss
            assert got[f"{pre}{PREFIX}{name}"] == pytest.approx(want[name], rel=1e-5), (split, name)
        for name in OPTIONAL:  # logged only when on
            assert (f"{pre}{PREFIX}{name}" in got) == optional, (split, name)
        weighted = (
            got[f"{pre}{PREFIX}text_ce"]
            + loss["soft_ce_weight"] * got[f"{pre}{PREFIX}soft_ce"]
            + loss["w1_weight"] * got[f"{pre}{PREFIX}w1"]
            + loss["gate_weight"] * got[f"{pre}{PREFIX}gate"]
        )
        if optional:
            weighted += loss["text_gate_weight"] * got[f"{pre}{PREFIX}text_gate"]
            weighted += loss["coord_ce_weight"] * got[f"{pre}{PREFIX}coord_ce"]
        if enabled:
            assert got[f"{pre}{PREFIX}loss"] == pytest.approx(got[f"{pre}loss"], rel=1e-6), split
            assert got[f"{pre}loss"] == pytest.approx(weighted, rel=1e-5), split
            assert got[f"{pre}loss"] == pytest.approx(want["loss"], rel=1e-5), split
        else:  # the baseline trains on the full-vocab CE; no logged number claims otherwise
            assert f"{pre}{PREFIX}loss" not in got, split
            assert got[f"{pre}loss"] == pytest.approx(want["ce"], rel=1e-5), split
            assert abs(weighted - got[f"{pre}loss"]) > 1e-3
    assert n_eval == world * 3


SCENARIOS_1 = [(1, True, True, False, False), (2, True, True, False, True), (2, True, False, False, False)]
SCENARIOS_1 += [(2, False, True, False, True), (2, True, True, True, False), (1, False, True, True, False)]
"""(gradient accumulation, Stage-1 enabled, ms-swift scales the loss by the process count, optional terms on,
coord diagnostics on)"""


@pytest.mark.parametrize(("ga", "enabled", "swift_scales", "optional", "diag"), SCENARIOS_1)
def test_one_process_logs_the_trainers_numbers(ga, enabled, swift_scales, optional, diag):
    logs = _drive(1, 0, ga, enabled, swift_scales, optional, diag)
    _check(logs, 1, ga, enabled, optional, diag)


SCENARIOS_2 = [(1, True, True, False, False), (2, True, True, False, True), (2, True, False, False, False)]
SCENARIOS_2 += [(2, False, True, False, True), (2, True, True, True, True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = [_drive(2, rank, *sc) for sc in SCENARIOS_2]
        if rank == 0:
            Path(out_dir, "logs.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_processes_log_the_trainers_numbers(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = json.loads((tmp_path / "logs.json").read_text())
    for (ga, enabled, _, optional, diag), logs in zip(SCENARIOS_2, results):
        _check(logs, 2, ga, enabled, optional, diag)


def test_learning_rate_per_part_of_the_model():
    """ms-swift's multimodal optimizer orders its groups vision tower, merger, decoder; each part's
    rate is logged under its own name, the decoder's as ``learning_rate``."""
    from swift.optimizers.multimodal import MultimodalOptimizerCallback
    from transformers import TrainingArguments

    from coordexp.train.trainer import CoordExpTrainer, lr_groups

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.visual = torch.nn.Module()
            self.model.visual.blocks = torch.nn.Linear(2, 2)
            self.model.visual.merger = torch.nn.Linear(2, 2)
            self.model.language_model = torch.nn.Linear(2, 2)
            self.lm_head = torch.nn.Linear(2, 3)
            arch = SimpleNamespace(
                vision_tower=["model.visual"],
                aligner=["model.visual.merger", "model.visual.deepstack_merger_list"],
            )
            self.model_meta = SimpleNamespace(model_arch=arch)

    model = Tiny()
    args = TrainingArguments(output_dir="/tmp/unused", learning_rate=1e-3, weight_decay=0.1, report_to=[])
    cases = [({"vit_lr": 1e-4, "aligner_lr": 5e-4}, {"vit": 1e-4, "aligner": 5e-4, "llm": 1e-3})]
    cases.append(({"vit_lr": 1e-4, "aligner_lr": None}, {"vit": 1e-4, "aligner": 1e-3, "llm": 1e-3}))
    for extra, want in cases:
        args.vit_lr, args.aligner_lr = extra["vit_lr"], extra["aligner_lr"]
        opt = MultimodalOptimizerCallback(args, SimpleNamespace(model=model)).create_optimizer(model)
        assert opt.param_groups[0]["lr"] == want["vit"]  # what the HF trainer would log as learning_rate
        groups = lr_groups(model, opt.param_groups)
        assert {part: opt.param_groups[i]["lr"] for part, i in groups.items()} == want
        fake = SimpleNamespace(optimizer=opt, lr_scheduler=None, _lr_groups=groups)
        rates = CoordExpTrainer._learning_rates(fake)
        assert rates == {"learning_rate": 1e-3, "learning_rate/vit": 1e-4, "learning_rate/aligner": want["aligner"]}
    # one group for everything (no vit_lr / aligner_lr): every part at the same rate, all logged
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    groups = lr_groups(model, opt.param_groups)
    assert groups == {"llm": 0, "vit": 0, "aligner": 0}
    # a frozen tower: no rate logged for it
    for p in model.model.visual.blocks.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    assert lr_groups(model, opt.param_groups) == {"llm": 0, "aligner": 0}
