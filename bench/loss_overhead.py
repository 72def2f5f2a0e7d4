"""What does the Stage-1 loss cost over the plain full-vocab CE a trainer computes anyway?

Both sides get the same fp32 ``[N, V]`` logits (a leaf that requires grad) and run forward +
backward:

* ``ce``      ``F.cross_entropy(logits, labels)`` over every position (the stock SFT loss);
* ``stage1``  ``coordexp.train.loss.stage1_loss(logits, labels, coord_id_map)`` with the config's default
  loss settings (``--temperature`` overrides T): text CE on the ~80% text targets + softCE + W1 +
  gate on the ~20% coord targets (1000 coord ids inside V).

Time: one process, the two methods interleaved repeat by repeat (alternating which goes first,
so drifting background load on a shared machine hits both alike); we report the median and
the ratio of medians. Goal: stage1 <= 1.05 x ce.

Peak memory: each (N, method) runs once in a fresh subprocess (``--mem-child``). After the
logits and labels exist (pages touched) we reset the kernel's RSS high-water mark
(``/proc/self/clear_refs``) and read ``VmRSS``; after one forward + backward we read ``VmHWM``
(``/proc/self/status``); the delta is the transient extra peak of that loss, logits excluded,
the ``[N, V]`` gradient included. glibc serves tensors this large with mmap, so freed buffers
leave RSS at once and the high-water mark is the true peak. Plain CE holds the logits, their log-softmax, the
dense NLL gradient and the input gradient at once (~4 x N V x 4 B at its peak): at N = 8192 and
V = 151936 that is ~20 GB, over this machine's ~16 GB budget, so that one configuration is not
run unless ``--allow-over-budget`` is given; its figures are then printed as ``skipped``.

    PYTHONPATH=src .venv/bin/python bench/loss_overhead.py --sizes 2048 4096 8192 --repeats 5 --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coordexp.core.codec import K
from coordexp.core.config import CoordSoftCEW1Config
from coordexp.train.loss import stage1_loss

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## loss_overhead"
BUDGET_BYTES = 16 * 2**30
LOSS_KW = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
"""The Stage-1 loss settings at the config's defaults."""


def make_inputs(n: int, v: int, coord_frac: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, v] fp32 leaf, aligned labels [n], coord_id_map [v]). Coord ids sit in a block
    inside V (as when coord tokens are added to a Qwen vocabulary); ~coord_frac of targets are
    coord tokens, the rest uniform text ids; no ignored positions (worst case for both)."""
    g = torch.Generator().manual_seed(seed)
    first = v - K - 1000
    coord_ids = torch.arange(first, first + K)
    cmap = torch.full((v,), -1, dtype=torch.long)
    cmap[coord_ids] = torch.arange(K)
    text_pool = torch.cat([torch.arange(0, first), torch.arange(first + K, v)])
    labels = text_pool[torch.randint(0, text_pool.numel(), (n,), generator=g)]
    is_coord = torch.rand(n, generator=g) < coord_frac
    labels[is_coord] = coord_ids[torch.randint(0, K, (int(is_coord.sum()),), generator=g)]
    logits = torch.randn(n, v, generator=g).mul_(2.0).requires_grad_()
    return logits, labels, cmap


def step(method: str, logits: torch.Tensor, labels: torch.Tensor, cmap: torch.Tensor, temperature: float) -> None:
    logits.grad = None
    if method == "ce":
        F.cross_entropy(logits, labels).backward()
    else:
        stage1_loss(logits, labels, cmap, **{**LOSS_KW, "temperature": temperature}).total.backward()


def time_pair(n: int, args: argparse.Namespace) -> dict[str, list[float]]:
    logits, labels, cmap = make_inputs(n, args.vocab, args.coord_frac)
    methods = ["ce", "stage1"]
    for m in methods:  # warm-up: first-touch page faults, allocator, lazy init
        step(m, logits, labels, cmap, args.temperature)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for m in methods if r % 2 == 0 else methods[::-1]:
            t0 = time.perf_counter()
            step(m, logits, labels, cmap, args.temperature)
            times[m].append(time.perf_counter() - t0)
    del logits
    return times


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mem_child(n: int, method: str, args: argparse.Namespace) -> None:
    """Peak RSS growth of one forward + backward. VmHWM is per address space (ru_maxrss is not:
    after fork + exec it carries the parent's high-water mark), and writing 5 to clear_refs
    resets it to the current RSS, so the reading starts from the logits alone."""
    logits, labels, cmap = make_inputs(n, args.vocab, args.coord_frac)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    assert _status_kib("VmHWM") <= before + 1024, "could not reset the RSS high-water mark"
    step(method, logits, labels, cmap, args.temperature)
    print(json.dumps({"delta": (_status_kib("VmHWM") - before) * 1024, "logits": logits.numel() * 4}))


def peak_memory(n: int, method: str, args: argparse.Namespace) -> int | None:
    cmd = [
        sys.executable,
        __file__,
        "--mem-child",
        str(n),
        method,
        "--vocab",
        str(args.vocab),
        "--coord-frac",
        str(args.coord_frac),
        "--temperature",
        str(args.temperature),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["delta"])


def ce_predicted_peak(n: int, v: int) -> int:
    """Logits + log-softmax + dense NLL grad + input grad, fp32."""
    return 4 * n * v * 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="N, tokens per batch")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--coord-frac", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=LOSS_KW["temperature"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the per-config memory subprocesses")
    p.add_argument(
        "--allow-over-budget", action="store_true", help=f"run configs predicted over {BUDGET_BYTES / 2**30:.0f} GiB"
    )
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    p.add_argument("--mem-child", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:
        mem_child(int(args.mem_child[0]), args.mem_child[1], args)
        return 0

    rows = []
    for n in args.sizes:
        over = ce_predicted_peak(n, args.vocab) > BUDGET_BYTES and not args.allow_over_budget
        row: dict[str, object] = {"n": n}
        if over:
            logits, labels, cmap = make_inputs(n, args.vocab, args.coord_frac)
            step("stage1", logits, labels, cmap, args.temperature)
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step("stage1", logits, labels, cmap, args.temperature)
                ts.append(time.perf_counter() - t0)
            del logits
            row.update(ce=None, stage1=statistics.median(ts))
        else:
            times = time_pair(n, args)
            row.update(ce=statistics.median(times["ce"]), stage1=statistics.median(times["stage1"]))
        if not args.no_memory:
            row["mem_ce"] = None if over else peak_memory(n, "ce", args)
            row["mem_stage1"] = peak_memory(n, "stage1", args)
        rows.append(row)
        print(f"N={n}: {row}", file=sys.stderr, flush=True)

    def f(x: object, fmt: str) -> str:
        return "skipped" if x is None else format(x, fmt)

    gib = 2**30
    lines = [
        "| N | V | CE fwd+bwd s (median) | stage1 fwd+bwd s (median) | stage1 / CE | CE peak extra GiB | stage1 peak extra GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = None if r["ce"] is None else r["stage1"] / r["ce"]
        mem_ce = r.get("mem_ce")
        mem_s1 = r.get("mem_stage1")
        lines.append(
            f"| {r['n']} | {args.vocab} | {f(r['ce'], '.3f')} | {r['stage1']:.3f} | {'skipped' if ratio is None else f'{ratio:.2f}x'} | "
            f"{'n/a' if 'mem_ce' not in r else f(None if mem_ce is None else mem_ce / gib, '.2f')} | "
            f"{'n/a' if mem_s1 is None else f'{mem_s1 / gib:.2f}'} |"
        )
    table = "\n".join(lines)
    cmd = "PYTHONPATH=src .venv/bin/python bench/loss_overhead.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"
    )
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.python_version()}"
    )
    header = (
        f"### {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Command: `{cmd.strip()}`  \nMachine: {machine}; shared with other jobs "
        f"(load average at start {os.getloadavg()[0]:.1f}).  \n"
        f"Setup: fp32 logits leaf, {args.coord_frac:.0%} coord targets, T = {args.temperature}, "
        f"{args.repeats} interleaved repeats after one warm-up each, median. Memory: peak RSS growth "
        f"(VmHWM after a clear_refs reset) over the logits in a fresh subprocess per (N, method), gradient included; "
        f"`skipped` = plain CE predicted at ~{ce_predicted_peak(8192, args.vocab) / gib:.0f} GiB at N=8192, "
        f"over the 16 GiB budget.\n"
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
