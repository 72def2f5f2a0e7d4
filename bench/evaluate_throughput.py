"""Evaluate throughput of one code version on the trained default: 200 val images, batch 16, 256 new tokens.

``old`` runs the evaluation code of a checkout from before issue 20 (free greedy decoding, arg-max coordinates,
one score; put that checkout's ``src`` on PYTHONPATH); ``free`` / ``constrained`` run this checkout's, with the
distribution capture and every readout, score and the calibration. Prints images/s of the generation alone and of
generation plus metrics, by the wall clock and by the process's CPU time (less moved by other tenants of a
shared machine), as one JSON line. Run the versions alternately, several times, on a quiet machine::

    git worktree add /tmp/old 4b96245
    for i in 1 2 3; do
      PYTHONPATH=/tmp/old/src .venv/bin/python bench/evaluate_throughput.py old
      PYTHONPATH=src .venv/bin/python bench/evaluate_throughput.py constrained
    done
"""

import json
import sys
import time
from pathlib import Path

import torch

from coordexp.core.contract import read_jsonl, record_to_json
from coordexp.evaluate import stage
from coordexp.evaluate.generate import Detector

mode = sys.argv[1]
root = Path(__file__).resolve().parents[1]
records = read_jsonl(root / "artifacts/preprocess/val.jsonl")[:200]
det = Detector(root / "artifacts/train/final")
kw = {}
if mode != "old":
    from coordexp.core.config import load_params
    from coordexp.evaluate import grammar as g

    cfg = load_params(root / "params.yaml").evaluate.model_copy(update={"decoding": mode})
    kw = dict(
        readout=cfg.readout,
        score=cfg.score,
        grammar=g.for_detector(det, cfg, root / "artifacts/preprocess/train.jsonl"),
    )
stage.predict_records(
    det, records[:16], root / "artifacts/preprocess", batch_size=16, max_new_tokens=256, **kw
)  # warm-up
t0, c0 = time.perf_counter(), time.process_time()
preds, parses, raw = stage.predict_records(
    det, records, root / "artifacts/preprocess", batch_size=16, max_new_tokens=256, **kw
)
gen_s, gen_cpu = time.perf_counter() - t0, time.process_time() - c0
if mode == "old":
    m = stage.compute_metrics([record_to_json(r) for r in records], preds, parses)
else:
    m = stage.compute_metrics(
        [record_to_json(r) for r in records],
        preds,
        parses,
        readout=cfg.readout,
        score=cfg.score,
        decoding=mode,
        calibration_bins=cfg.calibration_bins,
        calibration_fit=cfg.calibration_fit,
    )
tot_s, tot_cpu = time.perf_counter() - t0, time.process_time() - c0
print(
    json.dumps(
        {
            "mode": mode,
            "threads": torch.get_num_threads(),
            "images_per_second_generation": 200 / gen_s,
            "images_per_second_with_metrics": 200 / tot_s,
            "images_per_cpu_second_generation": 200 / gen_cpu,
            "images_per_cpu_second_with_metrics": 200 / tot_cpu,
            "parse_rate": m["parse_rate"],
            "bbox_mAP50": m["bbox_mAP50"],
        }
    )
)
