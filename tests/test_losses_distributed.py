"""2 data-parallel ranks x 2 micro-batches == 1 rank with the whole batch (CPU, gloo).

Each rank runs the trainer recipe documented in ``coordexp.train.loss``: count tokens over its
micro-batches with :func:`global_counts` (one unconditional all-reduce), backpropagate
``stage1_loss(..., normalizer=counts).total`` per micro-batch, then average parameter gradients
over ranks as DDP does. The parent process computes the same step on one rank with the whole
batch and no normaliser (plain per-term means). Gradients are on the parameters of a tiny linear
model ``hidden -> V`` so the check covers a real backward through ``logits = h W^T + b``.
One scenario gives rank 1 no coord tokens at all, one has no coord tokens anywhere.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coordexp.core.codec import K
from coordexp.train.loss import global_counts, stage1_loss

HIDDEN = 16
N_TEXT = 50
V = K + N_TEXT
B, L = 2, 6  # one micro-batch
WORLD = 2
MICRO = 2  # micro-batches per rank

# (soft_ce_weight, w1_weight, gate_weight, text_gate_weight, coord_ce_weight): text CE alone, then text
# CE + each other term, then all (the text gate is a mean over the text tokens, the others over coord tokens)
WEIGHTS = [
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (1.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 1.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 1.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 1.0),
    (0.7, 2.0, 0.3, 0.5, 0.4),
]
SCENARIOS = ["mixed", "rank1_no_coord", "no_coord_anywhere"]
LOSS_KW = dict(temperature=0.7, target_sigma=2.0, target_truncate=16)


def _vocab() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    perm = torch.randperm(V, generator=g)
    cmap = torch.full((V,), -1, dtype=torch.long)
    cmap[perm[:K]] = torch.arange(K)
    return cmap, perm[:K], perm[K:]


def _global_batch(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [WORLD*MICRO, B, L, HIDDEN], labels [WORLD*MICRO, B, L]; micro-batch j goes to rank
    j // MICRO. Micro-batches have different numbers of text and coord tokens on purpose."""
    _, coord_ids, text_ids = _vocab()
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(WORLD * MICRO, B, L, HIDDEN, generator=g)
    labels = text_ids[torch.randint(0, N_TEXT, (WORLD * MICRO, B, L), generator=g)]
    is_coord = torch.rand(WORLD * MICRO, B, L, generator=g) < torch.tensor([0.6, 0.2, 0.4, 0.1])[:, None, None]
    coord = coord_ids[torch.randint(0, K, (WORLD * MICRO, B, L), generator=g)]
    labels = torch.where(is_coord, coord, labels)
    labels[torch.rand(WORLD * MICRO, B, L, generator=g) < 0.2] = -100
    labels[0, 0, 0] = coord_ids[0]
    labels[0, 0, 1] = coord_ids[999]
    if scenario == "rank1_no_coord":
        labels[MICRO:][is_coord[MICRO:]] = text_ids[3]
    elif scenario == "no_coord_anywhere":
        labels[is_coord] = text_ids[5]
        labels[0, 0, :2] = text_ids[1]
    return hidden, labels


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(HIDDEN, V)
    with torch.no_grad():
        model.weight.mul_(4.0)
    return model


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cmap = _vocab()[0]
        results = {}
        for scenario in SCENARIOS:
            hidden, labels = _global_batch(scenario)
            mine = range(rank * MICRO, (rank + 1) * MICRO)
            for w in WEIGHTS:
                model = _model()
                counts = global_counts([labels[j] for j in mine], cmap)  # every rank, every step
                for j in mine:
                    res = stage1_loss(
                        model(hidden[j]),
                        labels[j],
                        cmap,
                        soft_ce_weight=w[0],
                        w1_weight=w[1],
                        gate_weight=w[2],
                        text_gate_weight=w[3],
                        coord_ce_weight=w[4],
                        normalizer=counts,
                        **LOSS_KW,
                    )
                    assert torch.isfinite(res.total)
                    res.total.backward()
                for p in model.parameters():  # what DDP does: all-reduce, then mean
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
                results[(scenario, w)] = (_grads(model), counts)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_rank(scenario: str, w: tuple[float, ...]) -> list[torch.Tensor]:
    cmap = _vocab()[0]
    hidden, labels = _global_batch(scenario)
    model = _model()
    res = stage1_loss(
        model(hidden.reshape(-1, L, HIDDEN)),
        labels.reshape(-1, L),
        cmap,
        soft_ce_weight=w[0],
        w1_weight=w[1],
        gate_weight=w[2],
        text_gate_weight=w[3],
        coord_ce_weight=w[4],
        **LOSS_KW,
    )
    res.total.backward()
    return _grads(model)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("w", WEIGHTS, ids=["text", "soft_ce", "w1", "gate", "text_gate", "coord_ce", "all"])
def test_two_ranks_two_micro_batches_equal_one_rank(two_rank_results, scenario, w):
    want = _single_rank(scenario, w)
    assert any(float(g.abs().max()) > 0 for g in want)
    for rank in range(WORLD):
        grads, counts = two_rank_results[rank][(scenario, w)]
        assert counts.world_size == WORLD
        for got, ref in zip(grads, want):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_counts_are_global_and_identical_on_every_rank(two_rank_results):
    cmap = _vocab()[0]
    for scenario in SCENARIOS:
        _, labels = _global_batch(scenario)
        whole = global_counts(list(labels), cmap, all_reduce=False)
        for rank in range(WORLD):
            _, counts = two_rank_results[rank][(scenario, WEIGHTS[0])]
            assert (counts.text_tokens, counts.coord_tokens) == (whole.text_tokens, whole.coord_tokens)
    _, labels = _global_batch("rank1_no_coord")
    assert global_counts(list(labels[MICRO:]), cmap).coord_tokens == 0  # the scenario is real
    assert global_counts(list(labels[:MICRO]), cmap).coord_tokens > 0
