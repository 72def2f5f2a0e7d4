"""``bench/gpu_loss_timing.py`` (called by ``bench/gpu_check.sh``) at tiny sizes on the CPU: every path that can
run here runs, the fused and unfused Stage-1 losses agree, and the results file holds what the summary says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_loss_timing_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "timing.json"
    cmd = [sys.executable, "bench/gpu_loss_timing.py", "--device", "cpu", "--dtype", "float32"]
    cmd += ["--n", "48", "--vocab", "1536", "--dim", "16", "--repeats", "2", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(out.read_text())
    assert (r["n"], r["vocab"], r["dim"], r["dtype"]) == (48, 1536, 16, "float32")
    paths = r["paths"]
    for name in ("fused_stage1", "stage1_unfused", "torch_ce"):
        assert paths[name]["status"] == "ok", paths[name]
        assert len(paths[name]["ms_all"]) == 2 and paths[name]["ms_median"] > 0
        assert paths[name]["peak_mem_gib"] is None  # measured on CUDA only
        assert f"[loss timing] {name}" in res.stdout
    assert paths["fused_stage1"]["loss"] == pytest.approx(paths["stage1_unfused"]["loss"], rel=1e-5)
    assert paths["liger_flce"]["status"] == "skipped" and "CUDA only" in paths["liger_flce"]["reason"]


def test_loss_timing_refuses_a_vocabulary_without_room_for_the_coord_tokens():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_loss_timing", ROOT / "bench" / "gpu_loss_timing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match="needs more than the 1000 coord tokens"):
        bench.make_inputs(4, 1000, 4, torch.float32, torch.device("cpu"))
