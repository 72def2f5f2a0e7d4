"""What do the coord-distribution diagnostics (``train.coord_diag``) add to the Stage-1 loss's time?

Side by side in one process: the loss forward + backward with ``coord_diag=False`` and ``coord_diag=True``,
interleaved repeat by repeat (alternating which goes first, so drifting background load on a shared machine
hits both alike), the ratio of the medians and of the minima (the least disturbed repeat of each); plus the diagnostics alone
(:func:`coordexp.train.loss.coord_diagnostics` on the ``[n_coord, K]`` log-probabilities), whose median over
the loss's median is the overhead without the noise of two large timings (given ``p`` and the arg-max, as the
loss passes them). Goal: at most 3% of the step; the
loss alone is a fraction of a training step (the model's forward and backward come on top), so a ratio under
1.03 here is a bound on the step's.

Paths: ``plain`` (``stage1_loss`` on an fp32 ``[N, V]`` logits leaf) and ``fused`` (``fused_stage1_loss``
on ``hidden [N, D]`` through an fp32 LM head ``[V, D]``, both requiring grad). Inputs: ``--rows`` positions,
``--coord-frac`` of them coord targets (the rest text ids), coord ids in a block inside V, no ignored rows,
the config's default loss settings.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/coord_diag_overhead.py --path plain --write
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/coord_diag_overhead.py --path fused --dim 128 --write
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/coord_diag_overhead.py --path fused --vocab 151936 \
        --dim 64 --repeats 5 --write

``OMP_NUM_THREADS=1``: on a machine shared with other jobs, a multi-threaded reduction waits for a busy core
at every barrier, which swings single timings by several x; one thread keeps the side-by-side comparable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from coordexp.core.codec import K
from coordexp.core.config import CoordSoftCEW1Config
from coordexp.train.fused_loss import fused_stage1_loss
from coordexp.train.loss import coord_diagnostics, stage1_loss

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## coord_diag_overhead"
LOSS_KW = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
"""The Stage-1 loss settings at the config's defaults."""


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Labels, coord id map and the loss's input (logits, or hidden + head), seeded."""
    g = torch.Generator().manual_seed(0)
    n, v = args.rows, args.vocab
    first = max(0, v - K - 200)
    coord_ids = torch.arange(first, first + K)
    cmap = torch.full((v,), -1, dtype=torch.long)
    cmap[coord_ids] = torch.arange(K)
    text_pool = torch.cat([torch.arange(0, first), torch.arange(first + K, v)])
    labels = text_pool[torch.randint(0, text_pool.numel(), (n,), generator=g)]
    is_coord = torch.rand(n, generator=g) < args.coord_frac
    labels[is_coord] = coord_ids[torch.randint(0, K, (int(is_coord.sum()),), generator=g)]
    out = {"labels": labels, "cmap": cmap}
    if args.path == "plain":
        out["logits"] = torch.randn(n, v, generator=g).mul_(2.0).requires_grad_()
    else:
        out["hidden"] = torch.randn(n, args.dim, generator=g).requires_grad_()
        out["weight"] = torch.randn(v, args.dim, generator=g).mul_(args.dim**-0.5).requires_grad_()
    return out


def step(inputs: dict[str, torch.Tensor], path: str, diag: bool) -> None:
    for t in inputs.values():
        t.grad = None
    if path == "plain":
        res = stage1_loss(inputs["logits"], inputs["labels"], inputs["cmap"], **LOSS_KW, coord_diag=diag)
    else:
        res = fused_stage1_loss(
            inputs["hidden"], inputs["weight"], inputs["labels"], inputs["cmap"], **LOSS_KW, coord_diag=diag
        )
    res.total.backward()
    if diag:
        res.coord_diag.tolist()  # what the trainer does with them: one device sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=["plain", "fused"], default="plain")
    p.add_argument("--vocab", type=int, default=1408, help="V (1408: the embedded default's tiny model)")
    p.add_argument("--rows", type=int, default=2400, help="supervised positions (8 x 300 by default)")
    p.add_argument("--dim", type=int, default=64, help="hidden size D (fused path)")
    p.add_argument("--coord-frac", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--write", action="store_true", help=f"append the result to {RESULTS}")
    args = p.parse_args(argv)

    inputs = make_inputs(args)
    for diag in (False, True):  # warm-up: first-touch page faults, allocator, lazy init
        step(inputs, args.path, diag)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for diag in (False, True) if r % 2 == 0 else (True, False):
            t0 = time.perf_counter()
            step(inputs, args.path, diag)
            times[diag].append(time.perf_counter() - t0)

    # the diagnostics alone, on log-probabilities of the same shape, given p and the arg-max as the loss has them
    n_coord = int((inputs["cmap"][inputs["labels"]] >= 0).sum())
    g = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(n_coord, K, generator=g) * 2.0, dim=1)
    k_star = torch.randint(0, K, (n_coord,), generator=g)
    p, argmax = log_p.exp(), log_p.argmax(1)
    coord_diagnostics(log_p, k_star, p, argmax)
    alone = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        coord_diagnostics(log_p, k_star, p, argmax).sum(0).tolist()
        alone.append(time.perf_counter() - t0)

    off, on, diag_t = statistics.median(times[False]), statistics.median(times[True]), statistics.median(alone)
    off_min, on_min = min(times[False]), min(times[True])
    shape = f"N={args.rows}, V={args.vocab}" + (f", D={args.dim}" if args.path == "fused" else "")
    table = "\n".join(
        [
            "| path | shape | coord rows | loss fwd+bwd off s (median / min) | on s (median / min) | on / off "
            "(medians / mins) | diagnostics alone ms | alone / off |",
            "|---|---|---|---|---|---|---|---|",
            f"| {args.path} | {shape} | {n_coord} | {off:.4f} / {off_min:.4f} | {on:.4f} / {on_min:.4f} | "
            f"{on / off:.3f}x / {on_min / off_min:.3f}x | {diag_t * 1e3:.2f} | {diag_t / off:.1%} |",
        ]
    )
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    cmd = f"{threads}PYTHONPATH=src .venv/bin/python bench/coord_diag_overhead.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"
    )
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.python_version()}"
    )
    header = (
        f"### {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {args.path}\n\n"
        f"Command: `{cmd.strip()}`  \nMachine: {machine}; shared with other jobs "
        f"(load average at start {os.getloadavg()[0]:.1f}).  \n"
        f"Setup: fp32, {args.coord_frac:.0%} coord targets, the config's default loss settings, "
        f"{args.repeats} interleaved repeats after one warm-up each, medians and minima.\n"
    )
    print(header)
    print(table)
    if args.write:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        block = header + "\n" + table + "\n"
        if SECTION not in text:
            text = text.rstrip("\n") + f"\n\n{SECTION}\n\n" + block
        else:
            start = text.index(SECTION) + len(SECTION)
            nxt = text.find("\n## ", start)
            end = len(text) if nxt < 0 else nxt
            text = text[:end].rstrip("\n") + "\n\n" + block + text[end:]
        RESULTS.write_text(text)
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
