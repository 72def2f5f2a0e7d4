"""Overhead of ``stage1_loss`` against plain full-vocab cross-entropy on the same logits.

Both sides get the same fp32 ``[N, V]`` logits (a leaf that requires grad) and do forward
+ backward. Plain CE is ``F.cross_entropy(logits, labels)`` over every position; the
Stage-1 loss sees the same positions with ~20% of the targets being coord tokens (1000
coord ids inside V). Repeats are interleaved (plain, stage1, plain, ...) and the median is
reported, so background load on a shared machine hits both sides alike.

Peak memory: each (N, method) runs once in a fresh subprocess; we report the growth of the
process's peak RSS (``resource.getrusage(...).ru_maxrss``) caused by one forward+backward,
over the peak after the logits and labels were built. glibc serves these large tensors
with mmap, so freed memory leaves RSS and the delta is the transient peak. The analytic
extra bytes (``[N, V]`` fp32 buffers alive at the peak) are printed beside it.

    PYTHONPATH=src python bench/loss_overhead.py --sizes 2048 4096 --repeats 5 --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coordexp.losses import stage1_loss

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## loss_overhead"


def make_inputs(n: int, vocab: int, coord_frac: float, seed: int = 0):
    """fp32 logits ``[n, vocab]`` (built in place: no second ``[n, vocab]`` buffer), labels
    with ``coord_frac`` coord targets, and the coord_id_map (coord ids = the last 1000)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g).mul_(2.0)
    coord_lo = vocab - 1000
    cmap = torch.full((vocab,), -1, dtype=torch.long)
    cmap[coord_lo:] = torch.arange(1000)
    labels = torch.randint(0, coord_lo, (n,), generator=g)
    is_coord = torch.rand(n, generator=g) < coord_frac
    labels[is_coord] = coord_lo + torch.randint(0, 1000, (int(is_coord.sum()),), generator=g)
    return logits, labels, cmap


def run_plain(logits, labels, cmap, temperature):
    x = logits.detach().requires_grad_()
    F.cross_entropy(x, labels).backward()
    return x.grad


def run_stage1(logits, labels, cmap, temperature):
    x = logits.detach().requires_grad_()
    stage1_loss(x, labels, cmap, temperature=temperature).total.backward()
    return x.grad


METHODS = {"plain_ce": run_plain, "stage1_loss": run_stage1}
# [N, V] fp32 buffers alive at the peak besides the logits themselves:
# plain CE: saved log_softmax output, nll_loss grad, log_softmax grad (= logits.grad);
# stage1: logits.grad only (+ cache-sized chunks and [Nc, K] coord-slice tensors).
ANALYTIC_NV_BUFFERS = {"plain_ce": 3, "stage1_loss": 1}


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def child(n: int, vocab: int, coord_frac: float, method: str, temperature: float) -> None:
    logits, labels, cmap = make_inputs(n, vocab, coord_frac)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    METHODS[method](logits, labels, cmap, temperature)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_delta_gib": (after - before) / 2**20}))


def measure_memory(n, vocab, coord_frac, method, temperature) -> float:
    cmd = [sys.executable, __file__, "--child", str(n), method, "--vocab", str(vocab),
           "--coord-frac", str(coord_frac), "--temperature", str(temperature),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_gib"]


def time_side_by_side(n, vocab, coord_frac, repeats, temperature):
    logits, labels, cmap = make_inputs(n, vocab, coord_frac)
    times = {m: [] for m in METHODS}
    for m, f in METHODS.items():  # warm-up (allocator, thread pool)
        f(logits, labels, cmap, temperature)
    for _ in range(repeats):
        for m, f in METHODS.items():
            gc.collect()
            t0 = time.perf_counter()
            f(logits, labels, cmap, temperature)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}, times


def write_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--coord-frac", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0 = torch default). On a shared, oversubscribed CPU, "
                         "1 thread avoids OpenMP barrier stalls that swamp the comparison")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-config memory subprocesses")
    ap.add_argument("--write", action="store_true", help=f"write the '{SECTION}' section of {RESULTS.name}")
    ap.add_argument("--child", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(int(args.child[0]), args.vocab, args.coord_frac, args.child[1], args.temperature)
        return

    rows, skipped = [], []
    for n in args.sizes:
        # plain CE peaks at the logits + 3 more [N, V] fp32 buffers; keep 2 GiB headroom
        need = 4 * n * args.vocab * 4 / 2**30 + 2
        if need > mem_available_gib():
            skipped.append(f"N={n}: needs ~{need:.0f} GiB, {mem_available_gib():.0f} GiB available")
            print("skip", skipped[-1], flush=True)
            continue
        med, raw = time_side_by_side(n, args.vocab, args.coord_frac, args.repeats, args.temperature)
        mem = {}
        if not args.no_memory:
            gc.collect()
            mem = {m: measure_memory(n, args.vocab, args.coord_frac, m, args.temperature) for m in METHODS}
        nv_gib = n * args.vocab * 4 / 2**30
        rows.append((n, med, mem, nv_gib))
        print(f"N={n}: " + ", ".join(f"{m} {t:.3f}s" for m, t in med.items())
              + f", ratio {med['stage1_loss'] / med['plain_ce']:.3f}; raw {json.dumps(raw)}", flush=True)

    head = ("| N | V | plain CE fwd+bwd (s) | stage1_loss fwd+bwd (s) | ratio | "
            "peak RSS growth plain / stage1 (GiB) | analytic extra plain / stage1 (GiB) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for n, med, mem, nv in rows:
        m = (f"{mem['plain_ce']:.2f} / {mem['stage1_loss']:.2f}" if mem else "not measured")
        lines.append(
            f"| {n} | {args.vocab} | {med['plain_ce']:.3f} | {med['stage1_loss']:.3f} | "
            f"{med['stage1_loss'] / med['plain_ce']:.3f} | {m} | "
            f"{ANALYTIC_NV_BUFFERS['plain_ce'] * nv:.2f} / {ANALYTIC_NV_BUFFERS['stage1_loss'] * nv:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = "PYTHONPATH=src .venv/bin/python bench/loss_overhead.py " + " ".join(sys.argv[1:])
        text = (
            f"{SECTION}\n\n"
            f"- command: `{cmd}`\n"
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()}-core CPU "
            f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; shared machine, 1-min load average at the end "
            f"{os.getloadavg()[0]:.1f}\n"
            f"- fp32 logits, {args.coord_frac:.0%} coord targets, T={args.temperature}, sigma=2, truncate=16; "
            f"median of {args.repeats} interleaved repeats after one warm-up\n"
            f"- peak memory: growth of ru_maxrss over one fwd+bwd in a fresh subprocess per cell\n"
            + "".join(f"- skipped {s}\n" for s in skipped)
            + "\n" + table + "\n"
        )
        write_results(text)


if __name__ == "__main__":
    main()
