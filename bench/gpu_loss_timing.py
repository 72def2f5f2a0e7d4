"""Timing of the fused Stage-1 loss against Liger's fused linear cross-entropy and torch's cross-entropy on
materialised logits: forward + backward w.r.t. hidden states and LM head, one micro-batch of ``N`` positions.

Why these three: the fused loss (``coordexp.train.fused_loss.fused_stage1_loss``) replaces the ``[N, V]`` logits
of a real vocabulary (V = 151,936) by chunks; Liger's fused linear cross-entropy is the usual way to do that for
plain CE (a lower bound for what the Stage-1 loss's extra terms cost on top), and torch's cross-entropy on
materialised logits is what a trainer does without either. ``stage1_unfused`` is the Stage-1 loss on
materialised logits (``coordexp.train.loss.stage1_loss``), the path ``train.fused_loss: false`` takes.

Every path runs on the same inputs (a detection-like label mix: 55% coord targets, 35% text, 10% ignored),
after ``--warmup`` untimed runs; the median of ``--repeats`` timed runs is reported. On CUDA the peak memory
above the inputs (``torch.cuda.max_memory_allocated`` after a reset) is reported too; on the CPU it is null.
A path that cannot run (Liger not installed, out of memory) is recorded with its reason, not fatal.

The GPU figures (``bench/gpu_check.sh`` calls this)::

    python bench/gpu_loss_timing.py --device cuda --dtype bfloat16 --out results/loss_timing.json

A CPU smoke run in seconds (``tests/test_gpu_loss_timing.py``)::

    python bench/gpu_loss_timing.py --device cpu --dtype float32 --n 64 --vocab 2048 --dim 32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from coordexp.core.codec import K
from coordexp.core.config import CoordSoftCEW1Config
from coordexp.train.fused_loss import fused_stage1_loss
from coordexp.train.loss import stage1_loss

PATHS = ("fused_stage1", "liger_flce", "torch_ce", "stage1_unfused")


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Hidden states, an LM head, aligned labels and the coord id map (the coord tokens at the end of the
    vocabulary, as ``build_base`` adds them)."""
    if v <= K:
        raise SystemExit(f"--vocab {v}: needs more than the {K} coord tokens")
    g = torch.Generator().manual_seed(seed)
    cmap = torch.full((v,), -1, dtype=torch.long)
    coord_ids = torch.arange(v - K, v)
    cmap[coord_ids] = torch.arange(K)
    u = torch.rand(n, generator=g)
    labels = torch.where(
        u < 0.55, coord_ids[torch.randint(0, K, (n,), generator=g)], torch.randint(0, v - K, (n,), generator=g)
    )
    labels[u >= 0.9] = -100
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    return hidden, weight, labels.to(device), cmap.to(device)


def _liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100)


def build_step(path: str, hidden, weight, labels, cmap):
    """A closure running one forward + backward of ``path``; raises ImportError where a package is missing."""
    kw = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
    if path == "fused_stage1":
        return lambda: fused_stage1_loss(hidden, weight, labels, cmap, **kw).total
    if path == "stage1_unfused":
        return lambda: stage1_loss((hidden @ weight.T).float(), labels, cmap, **kw).total
    if path == "torch_ce":
        return lambda: F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)
    if path == "liger_flce":
        liger = _liger_loss()
        return lambda: liger(weight, hidden, labels)
    raise ValueError(f"unknown path {path!r}; one of {', '.join(PATHS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_path(path: str, hidden, weight, labels, cmap, warmup: int, repeats: int) -> dict[str, Any]:
    device = hidden.device
    if path == "liger_flce" and device.type != "cuda":
        return {"status": "skipped", "reason": "Liger's kernels are Triton kernels: CUDA only"}
    try:
        step = build_step(path, hidden, weight, labels, cmap)
    except ImportError as exc:
        return {"status": "skipped", "reason": f"not installed: {exc}"}
    times, loss = [], float("nan")
    try:
        for i in range(warmup + repeats):
            hidden.grad = weight.grad = None
            if device.type == "cuda" and i == warmup:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            _sync(device)
            t0 = time.perf_counter()
            total = step()
            total.backward()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            loss = float(total.detach())
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "reason": str(exc).splitlines()[0]}
    out: dict[str, Any] = {
        "status": "ok",
        "ms_median": round(statistics.median(times) * 1e3, 3),
        "ms_all": [round(t * 1e3, 3) for t in times],
        "loss": loss,
        "peak_mem_gib": None,
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
    hidden.grad = weight.grad = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=8192, help="positions of the micro-batch (default 8192)")
    ap.add_argument("--vocab", type=int, default=151_936, help="vocabulary size V (default 151936, Qwen's)")
    ap.add_argument("--dim", type=int, default=2048, help="hidden size D (default 2048, Qwen3-VL-2B's)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda where available)")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the results here as JSON (default: print only)")
    a = ap.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype)
    results: dict[str, Any] = {
        "n": a.n,
        "vocab": a.vocab,
        "dim": a.dim,
        "dtype": a.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "paths": {},
    }
    hidden, weight, labels, cmap = make_inputs(a.n, a.vocab, a.dim, dtype, device)
    for path in a.paths:
        r = time_path(path, hidden, weight, labels, cmap, a.warmup, a.repeats)
        results["paths"][path] = r
        figures = (
            f"{r['ms_median']:.1f} ms, peak {r['peak_mem_gib']} GiB, loss {r['loss']:.4f}"
            if r["status"] == "ok"
            else r["reason"]
        )
        print(f"[loss timing] {path:15s} {r['status']:8s} {figures}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"[loss timing] wrote {a.out}")
    return 0 if any(r["status"] == "ok" for r in results["paths"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
