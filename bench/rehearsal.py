"""Benchmark: a train step at real scale (V ~ 152k, hidden 2048), fused Stage-1 loss against unfused, and the time of
``build_base`` in expand mode, on the rehearsal checkpoint (``coordexp rehearsal-checkpoint``: Qwen3-VL-2B widths, the
real Qwen vocabulary, 2 decoder layers, random weights).

A train step is what the train stage does per optimizer step, in-process and without ms-swift's loop: one
template-encoded sample (the val image and answer of the embedded shapes set, or a drawn one), forward, the Stage-1
loss (unfused: the model's fp32 logits ``[L, V]`` + ``stage1_loss``; fused: the decoder's last hidden states and the
tied head through ``fused_stage1_loss``, never holding ``[L, V]``), backward, AdamW step, in float32.

Why subprocesses: peak memory is monotonic per process, so each probe runs in a fresh interpreter (the same
kernel counters as bench/fused_loss.py): after one warm-up step (Adam's state allocated) the peak counter is reset
and ``step peak = VmHWM - VmRSS before the timed steps``: what a step adds on top of the resident weights and
optimizer state (gradients, activations, logits). ``process peak`` is the whole process's VmHWM. The probes alternate
(unfused, fused, unfused, ...) so a noisy neighbour on the shared cores hits both alike; times are medians.

Usage (2 shared cores: nice it; about 4 minutes)::

    nice -n 5 .venv/bin/python bench/rehearsal.py --repeats 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANSWER_OBJECTS = 4


def _record(tmp: Path) -> dict:
    """A 64 px image and a 4-object answer (bbox and poly), the shape of the embedded data at ``max_side: 64``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((8, 8, 30, 30), fill=(200, 30, 30))
    img.save(tmp / "img.png")
    objs = []
    for i in range(ANSWER_OBJECTS):
        k = [f"<|coord_{(97 * i + 31 * j) % 1000}|>" for j in range(6 if i % 2 else 4)]
        objs.append({"desc": "red circle" if i % 2 == 0 else "blue triangle", ("poly" if i % 2 else "bbox_2d"): k})
    return {"id": 1, "images": ["img.png"], "width": 64, "height": 64, "objects": objs}


def _child(args) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fused_loss import _hwm_kb, _reset_peak, _rss_kb

    from coordexp.core.config import CoordSoftCEW1Config
    from coordexp.core.template import encode_record, load_template
    from coordexp.core.vocab import coord_id_map
    from coordexp.train.fused_loss import fused_stage1_loss
    from coordexp.train.loss import stage1_loss

    torch.set_num_threads(args.threads)
    base = Path(args.base)
    tmp = Path(tempfile.mkdtemp())
    rec = _record(tmp)
    enc = encode_record(load_template(base, mode="train"), rec, tmp)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    batched = ("input_ids", "attention_mask", "mm_token_type_ids")
    # clones: the template encodes in inference mode, and its tensors cannot enter autograd
    inputs = {k: torch.as_tensor(enc[k]).clone() for k in keys if k in enc}
    inputs = {k: v[None] if k in batched else v for k, v in inputs.items()}
    labels = torch.as_tensor(enc["labels"])[1:]
    cmap = coord_id_map(base)
    kw = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32, local_files_only=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    head = model.get_output_embeddings().weight

    def step() -> float:
        t = time.perf_counter()
        if args.path == "unfused":
            logits = model(**inputs).logits[0, :-1]
            res = stage1_loss(logits, labels, cmap, **kw)
        else:
            hidden = model.model(**inputs).last_hidden_state[0, :-1]
            res = fused_stage1_loss(hidden, head, labels, cmap, **kw)
        res.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    loss0 = None
    with torch.no_grad():
        if args.path == "unfused":
            loss0 = float(stage1_loss(model(**inputs).logits[0, :-1], labels, cmap, **kw).total)
        else:
            loss0 = float(
                fused_stage1_loss(model.model(**inputs).last_hidden_state[0, :-1], head, labels, cmap, **kw).total
            )
    step()  # warm-up: Adam's state is allocated here
    reset = _reset_peak()
    rss0 = _rss_kb()
    times = [step() for _ in range(args.steps)]
    print(
        json.dumps(
            {
                "path": args.path,
                "seq_len": int(inputs["input_ids"].shape[1]),
                "supervised": int((labels != -100).sum()),
                "vocab": int(head.shape[0]),
                "hidden": int(head.shape[1]),
                "loss_before_update": loss0,
                "step_s": statistics.median(times),
                "step_peak_mb": (_hwm_kb() - rss0) / 1024 if reset else None,
                "process_peak_mb": _hwm_kb() / 1024,
            }
        ),
        flush=True,
    )


def _run_child(base: Path, path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--base", str(base), "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{path} probe failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, help="an existing rehearsal checkpoint (default: build one)")
    ap.add_argument("--work", type=Path, help="folder for the checkpoints (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=2, help="probes per path (alternating)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per probe (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=("unfused", "fused"), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.path = args.child
        _child(args)
        return

    from coordexp.build_base.build import build_base
    from coordexp.build_base.rehearsal import build_rehearsal

    work = args.work or Path(tempfile.mkdtemp(prefix="rehearsal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or '?'}"}
    source = args.source
    if source is None:
        t = time.perf_counter()
        source = build_rehearsal("qwen3_vl", work / "rehearsal")
        out["rehearsal_checkpoint_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    summary = build_base("expand", work / "base", expand={"source": str(source), "init": "mean", "ordinal_scale": 0.02})
    out["expand_s"] = round(time.perf_counter() - t, 1)
    out["expand_vocab"] = summary["vocab_size"]
    probes: dict[str, list[dict]] = {"unfused": [], "fused": []}
    for _ in range(args.repeats):
        for path in ("unfused", "fused"):
            r = _run_child(work / "base", path, args)
            probes[path].append(r)
            print(path, json.dumps(r), flush=True)
    rows = []
    for path, rs in probes.items():
        rows.append(
            {
                "path": path,
                "step_s": statistics.median(r["step_s"] for r in rs),
                "step_peak_mb": statistics.median(r["step_peak_mb"] for r in rs)
                if all(r["step_peak_mb"] is not None for r in rs)
                else None,
                "process_peak_mb": statistics.median(r["process_peak_mb"] for r in rs),
                "loss_before_update": rs[0]["loss_before_update"],
                "seq_len": rs[0]["seq_len"],
                "supervised": rs[0]["supervised"],
                "vocab": rs[0]["vocab"],
            }
        )
    out["rows"] = rows
    print(json.dumps(out))
    print("\n| path | V | seq / supervised | step (s, median) | step peak above resident (MB) | process peak (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['vocab']} | {r['seq_len']} / {r['supervised']} | {r['step_s']:.2f} | "
            f"{r['step_peak_mb']:.0f} | {r['process_peak_mb']:.0f} |"
        )
    print(f"\nexpand: {out['expand_s']} s; loss before the update: {[r['loss_before_update'] for r in rows]}")


if __name__ == "__main__":
    main()
