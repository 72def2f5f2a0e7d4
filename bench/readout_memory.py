"""Generation memory of the coord-distribution capture at a real vocabulary, and mAP by readout and by score.

``memory``: the checkpoint's embeddings and head are resized to ``--vocab`` rows (152k, Qwen's size; the coord
ids keep their rows, the new rows are masked so they are never emitted), and one batch of val images is decoded
for exactly N new tokens (the end tokens are masked too) in three ways, each in its own subprocess:

* ``plain``: greedy decoding with nothing kept (the floor: weights, activations and the KV cache);
* ``old``: what ``Detector.generate`` did before: ``output_scores=True`` and the softmax of every step stacked
  (``batch x steps x V`` twice);
* ``new``: ``Detector.generate`` with :class:`coordexp.evaluate.generate.CoordCapture`.

Peak memory is the process's resident high-water mark (``VmHWM`` of ``/proc/self/status``), reset just before
the measured call by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), minus the resident size at that
moment: exact for whatever the CPU allocator touches, including torch's (which ``tracemalloc`` does not see), and
unaffected by the model load's own transient peak.

``map``: one generation over the val records with the trained checkpoint; every readout and every score
definition is measured on it (``coordexp.evaluate.stage.compute_metrics``), with the calibration section.

    python bench/readout_memory.py memory --checkpoint artifacts/base --val artifacts/preprocess/val.jsonl
    python bench/readout_memory.py map --checkpoint artifacts/train/final --val artifacts/preprocess/val.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Mask(LogitsProcessor):
    """Never emit the resized rows nor an end token: every run generates exactly ``max_new_tokens``."""

    def __init__(self, first_new: int, eos: list[int]) -> None:
        self.first_new, self.eos = first_new, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.first_new :] = -math.inf
        scores[:, self.eos] = -math.inf
        return scores


def _one(args: argparse.Namespace) -> None:
    from coordexp.core.contract import read_jsonl
    from coordexp.evaluate.generate import Detector

    torch.set_num_threads(args.threads)
    det = Detector(args.checkpoint, device="cpu")
    old_v = det.model.get_output_embeddings().weight.shape[0]
    det.model.resize_token_embeddings(args.vocab, mean_resizing=False)
    mask = _Mask(old_v, det.eos_ids)
    records = read_jsonl(args.val)[: args.batch]
    rows = det.rows(records, Path(args.val).parent)
    inputs = det.inputs(rows)

    def run(n: int) -> int:
        with torch.no_grad():
            if args.mode == "new":
                return sum(g.n_tokens for g in det.generate(rows, n, logits_processors=[mask]))
            kw: dict[str, Any] = {**det.greedy_kwargs(n), "logits_processor": LogitsProcessorList([mask])}
            if args.mode == "plain":
                seqs = det.model.generate(**inputs, **kw)
                return int(seqs.shape[0] * (seqs.shape[1] - inputs["input_ids"].shape[1]))
            out = det.model.generate(**inputs, **kw, output_scores=True, return_dict_in_generate=True)
            seqs = out.sequences[:, inputs["input_ids"].shape[1] :]
            step_probs = torch.stack([torch.softmax(s.float(), dim=-1) for s in out.scores], dim=1)
            chosen = step_probs.gather(2, seqs[:, : step_probs.shape[1], None]).squeeze(2)
            return int(chosen.numel())

    run(2)  # warm-up: first-call allocations
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    n_tok = run(args.max_new_tokens)
    secs = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(
        json.dumps(
            {
                "mode": args.mode,
                "max_new_tokens": args.max_new_tokens,
                "vocab": det.model.get_output_embeddings().weight.shape[0],
                "batch": len(rows),
                "generated_tokens": n_tok,
                "peak_growth_mb": (peak - base) / 1024,
                "seconds": secs,
            }
        )
    )


def _memory(args: argparse.Namespace) -> None:
    results = []
    for n in args.lengths:
        for mode in ("plain", "old", "new"):
            cmd = [sys.executable, __file__, "_one", "--mode", mode, "--max-new-tokens", str(n)]
            cmd += ["--checkpoint", str(args.checkpoint), "--val", str(args.val), "--vocab", str(args.vocab)]
            cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if res.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print("\n| max_new_tokens | mode | generated tokens | peak growth (MB) | seconds |\n|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['max_new_tokens']} | {r['mode']} | {r['generated_tokens']} | {r['peak_growth_mb']:.0f} | "
            f"{r['seconds']:.1f} |"
        )


def _map(args: argparse.Namespace) -> None:
    from coordexp.core.contract import read_jsonl, record_to_json
    from coordexp.evaluate.generate import Detector
    from coordexp.evaluate.stage import compute_metrics, predict_records

    torch.set_num_threads(args.threads)
    records = read_jsonl(args.val)[: args.limit]
    det = Detector(args.checkpoint, device="cpu", local_window=args.window)
    t0 = time.perf_counter()
    preds, parses, _ = predict_records(
        det, records, Path(args.val).parent, batch_size=16, max_new_tokens=256, readout=args.readout
    )
    ips = len(records) / (time.perf_counter() - t0)
    m = compute_metrics([record_to_json(r) for r in records], preds, parses, readout=args.readout)
    print(f"{len(records)} images, {ips:.1f} images/s, parse_rate {m['parse_rate']:.3f}")
    print("\n| readout | bbox_mAP | bbox_mAP50 | bbox_mAP75 | f1_at_0.5 |\n|---|---|---|---|---|")
    for name, r in m["readouts"].items():
        print(
            f"| {name} | {r['bbox_mAP']:.3f} | {r['bbox_mAP50']:.3f} | {r['bbox_mAP75']:.3f} | {r['f1_at_0.5']:.3f} |"
        )
    print(f"\n| score (coordinates: {args.readout}) | bbox_mAP | bbox_mAP50 |\n|---|---|---|")
    for name, r in m["scores"].items():
        print(f"| {name} | {r['bbox_mAP']:.3f} | {r['bbox_mAP50']:.3f} |")
    c = m["calibration"]
    print(
        f"\ncalibration of {m['score']}: ece {c['ece']:.3f}, ece_fitted ({c['fit']}, held-out halves) "
        f"{c['ece_fitted']:.3f}, {c['n_predictions']} predictions, matched_rate {c['matched_rate']:.3f}, "
        f"mean_score {c['mean_score']:.3f}"
    )
    print(json.dumps({k: m[k] for k in ("readouts", "scores", "calibration")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("memory", "_one", "map"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", type=Path, required=True)
        p.add_argument("--val", type=Path, required=True)
        p.add_argument("--threads", type=int, default=1)
        if name == "map":
            p.add_argument("--limit", type=int, default=200)
            p.add_argument("--readout", default="median")
            p.add_argument("--window", type=int, default=8)
        else:
            p.add_argument("--vocab", type=int, default=152064)
            p.add_argument("--batch", type=int, default=8)
        if name == "memory":
            p.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
        if name == "_one":
            p.add_argument("--mode", choices=["plain", "old", "new"], required=True)
            p.add_argument("--max-new-tokens", type=int, required=True)
    args = ap.parse_args()
    {"memory": _memory, "_one": _one, "map": _map}[args.cmd](args)


if __name__ == "__main__":
    main()
