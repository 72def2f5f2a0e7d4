"""Benchmark: fused Stage-1 loss (``coordexp.train.fused_loss.fused_stage1_loss``) vs the unfused path
(materialised fp32 logits ``hidden @ weight.T`` + ``coordexp.train.loss.stage1_loss``), forward +
backward w.r.t. hidden and weight, on the CPU.

Why subprocesses: peak memory (kernel peak-RSS counters, see below) is
monotonic per process, so every (config, path) memory probe runs in a fresh interpreter:
``peak = VmHWM after fwd+bwd - VmRSS after building the inputs``, with the kernel's peak counter
reset (``/proc/self/clear_refs`` = 5) after the setup, so setup temporaries do not hide in it
(falls back to ``ru_maxrss`` deltas where that reset is unavailable). We also report ``loss memory = peak - bytes of the
gradients of hidden and weight``: both paths must produce those (they are the parameter's /
activation's gradients), so what is left is what the loss itself costs. Timing runs the two
paths interleaved (unfused, fused, unfused, ...) in one process, after one warm-up of each, and
reports the median, so a noisy neighbour on the shared cores hits both alike.

Usage (2 shared cores: nice it)::

    nice -n 10 .venv/bin/python bench/fused_loss.py --configs 1024x1024 4096x1024 --repeats 3

Prints a markdown table; ``--mode`` (``auto`` | ``rows`` | ``vocab``) picks the fused loss's chunking
(see ``coordexp.train.fused_loss``; the table's "mode" column says which ran (the result's ``mode``),
and how many supervised rows the backwards recomputed (counted by wrapping the module's recompute
helper): 0 in rows mode with ``total.backward()``, every row in vocab mode); the loss settings are the
config's defaults (``CoordSoftCEW1Config``);
``--chunk-size`` (vocabulary columns per chunk, vocab mode) and ``--row-chunk`` (supervised rows per
chunk, rows mode) override the fused defaults. Smoke test with tiny sizes (seconds)::

    .venv/bin/python bench/fused_loss.py --configs 64x16 --vocab 2000 --repeats 1 --mode rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

V_DEFAULT = 151_936


def _setup(n: int, d: int, v: int, seed: int = 0):
    import torch

    from coordexp.core.codec import K

    g = torch.Generator().manual_seed(seed)
    cmap = torch.full((v,), -1, dtype=torch.long)
    coord_ids = torch.arange(v - K, v)  # added tokens sit at the end of the vocab
    cmap[coord_ids] = torch.arange(K)
    # a detection-style mix: 55% coord targets, 35% text, 10% ignored
    u = torch.rand(n, generator=g)
    text = torch.randint(0, v - K, (n,), generator=g)
    coord = coord_ids[torch.randint(0, K, (n,), generator=g)]
    labels = torch.where(u < 0.55, coord, text)
    labels[u >= 0.9] = -100
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = torch.randn(v, d, generator=g).div_(d**0.5).requires_grad_()  # in place: no temp
    return hidden, weight, labels, cmap


def _step(path: str, hidden, weight, labels, cmap, fused_kw: dict):
    """One forward + ``total.backward()``; returns the loss result."""
    from coordexp.core.config import CoordSoftCEW1Config
    from coordexp.train.fused_loss import fused_stage1_loss
    from coordexp.train.loss import stage1_loss

    kw = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
    hidden.grad = weight.grad = None
    if path == "unfused":
        z = hidden @ weight.T  # fp32 [N, V]
        res = stage1_loss(z, labels, cmap, **kw)
    else:
        res = fused_stage1_loss(hidden, weight, labels, cmap, **fused_kw, **kw)
    res.total.backward()
    return res


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _rss_kb() -> int:
    return _status_kb("VmRSS")


def _hwm_kb() -> int:
    return _status_kb("VmHWM")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) so
    that setup temporaries (and the interpreter) do not hide in the peak; False if unsupported
    (then ``ru_maxrss`` deltas are used, which can under-report)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fused_kw(args) -> dict:
    """The fused loss's chunking keywords from the command line."""
    return {"mode": args.mode, "chunk_size": args.chunk_size, "row_chunk": args.row_chunk}


def _count_recomputed_rows(counts: dict) -> None:
    """Wrap ``fused_loss._add_recomputed_grads`` (the one place a backward recomputes logits) so that
    ``counts["recomputed_rows"]`` adds up the supervised rows it recomputes."""
    from coordexp.train import fused_loss

    recompute = fused_loss._add_recomputed_grads

    def counted(gh, gw, gb, h, *rest):
        counts["recomputed_rows"] += h.shape[0]
        return recompute(gh, gw, gb, h, *rest)

    fused_loss._add_recomputed_grads = counted


def _mode_ran(modes: set[str], recomputed_rows: int) -> str:
    """E.g. ``"rows, 0 rows recomputed"`` for the fused steps (all in one mode: the same sizes each time)."""
    return f"{'+'.join(sorted(modes))}, {recomputed_rows} rows recomputed"


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    n, d = args.n, args.d
    hidden, weight, labels, cmap = _setup(n, d, args.vocab)
    if args.what == "mem":
        _ = float(hidden.sum() + weight.sum())
        # warm-up on 32 rows: one-off allocations (BLAS/OpenMP buffers, the cached soft-target
        # tables, ~10-40 MB) are not per-step loss memory
        _step(args.path, hidden[:32].detach().clone().requires_grad_(), weight, labels[:32], cmap, _fused_kw(args))
        weight.grad = None
        reset = _reset_peak()
        base = _rss_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        val = float(_step(args.path, hidden, weight, labels, cmap, _fused_kw(args)).total.detach())
        peak = _hwm_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_kb": peak - base, "value": val, "method": "VmHWM" if reset else "ru_maxrss"}))
        return
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    vals = {}
    if args.warmup:
        for p in ("unfused", "fused"):
            vals[p] = float(_step(p, hidden, weight, labels, cmap, _fused_kw(args)).total.detach())
    counts = {"recomputed_rows": 0}  # the timed steps only
    _count_recomputed_rows(counts)
    modes: set[str] = set()
    for _ in range(args.repeats):
        for p in ("unfused", "fused"):
            t = time.perf_counter()
            res = _step(p, hidden, weight, labels, cmap, _fused_kw(args))
            times[p].append(time.perf_counter() - t)
            vals[p] = float(res.total.detach())
            if p == "fused":
                modes.add(res.mode)
            del res
    print(json.dumps({"times": times, "values": vals, "mode": _mode_ran(modes, counts["recomputed_rows"])}))


def _run_child(extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *extra]
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["1024x1024", "4096x1024"], help="NxD list")
    ap.add_argument("--vocab", type=int, default=V_DEFAULT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=["auto", "rows", "vocab"], default="auto", help="fused loss chunking")
    ap.add_argument("--chunk-size", type=int, default=None, help="vocabulary columns per chunk (vocab mode)")
    ap.add_argument("--row-chunk", type=int, default=None, help="supervised rows per chunk (rows mode)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-mem", action="store_true")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up step per path (0 for big configs)")
    # child-only
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--what", choices=["mem", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=["unfused", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    common = ["--vocab", str(args.vocab), "--threads", str(args.threads), "--mode", args.mode]
    if args.chunk_size is not None:
        common += ["--chunk-size", str(args.chunk_size)]
    if args.row_chunk is not None:
        common += ["--row-chunk", str(args.row_chunk)]
    chunk = args.chunk_size or "default (vocab columns for a ~1/32-of-the-logits workspace, 32..256 MB)"
    rows = args.row_chunk or "default (ceil(n_sup / 16) rows)"
    print(
        f"V={args.vocab} mode={args.mode} chunk_size={chunk} row_chunk={rows} threads={args.threads} "
        f"repeats={args.repeats} warmup={args.warmup}",
        flush=True,
    )
    print(
        "| N | D | fused mode (timed steps) | logits fp32 MB | unfused s (median) | fused s (median) "
        "| fused/unfused time | unfused peak MB | fused peak MB | grads MB | unfused loss MB | fused loss MB "
        "| fused loss / logits | value diff |",
        flush=True,
    )
    print("|" + "---|" * 14, flush=True)
    for cfg in args.configs:
        n, d = (int(x) for x in cfg.lower().split("x"))
        t = _run_child(
            common
            + [
                "--what",
                "time",
                "--n",
                str(n),
                "--d",
                str(d),
                "--repeats",
                str(args.repeats),
                "--warmup",
                str(args.warmup),
            ]
        )
        tu, tf = statistics.median(t["times"]["unfused"]), statistics.median(t["times"]["fused"])
        vdiff = abs(t["values"]["unfused"] - t["values"]["fused"]) / abs(t["values"]["unfused"])
        logits_mb = n * args.vocab * 4 / 2**20
        grads_mb = (n * d + args.vocab * d) * 4 / 2**20
        if args.skip_mem:
            mu = mf = float("nan")
        else:
            mu = (
                _run_child(common + ["--what", "mem", "--path", "unfused", "--n", str(n), "--d", str(d)])["peak_kb"]
                / 1024
            )
            mf = (
                _run_child(common + ["--what", "mem", "--path", "fused", "--n", str(n), "--d", str(d)])["peak_kb"]
                / 1024
            )
        print(
            f"| {n} | {d} | {t['mode']} | {logits_mb:.0f} | {tu:.2f} | {tf:.2f} | {tf / tu:.2f}x | {mu:.0f} | {mf:.0f} "
            f"| {grads_mb:.0f} | {mu - grads_mb:.0f} | {mf - grads_mb:.0f} | {(mf - grads_mb) / logits_mb:.1%} "
            f"| {vdiff:.1e} |",
            flush=True,
        )
        print(
            f"  raw times unfused={[f'{x:.2f}' for x in t['times']['unfused']]} "
            f"fused={[f'{x:.2f}' for x in t['times']['fused']]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
