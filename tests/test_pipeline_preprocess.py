"""The preprocess stage through real DVC, in a fresh copy of the repository."""

import json
import subprocess

import mlflow
import pytest
from conftest import stage_env

from coordexp.preprocess.coco import TOTAL_METRICS


def _run(cmd, cwd, **env):
    res = subprocess.run(cmd, cwd=cwd, env=stage_env(**env), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.slow
def test_dvc_pull_and_repro_preprocess(repo_copy):
    _run(["dvc", "pull", "-q", "data.dvc"], repo_copy)
    assert (repo_copy / "data" / "shapes" / "annotations" / "instances_train.json").is_file()
    _run(["dvc", "repro", "preprocess"], repo_copy)
    metrics = json.loads((repo_copy / "reports" / "metrics" / "preprocess.json").read_text())
    # the DVC metrics are the totals (a readable `dvc exp show`); every count is in preprocess_counts.json
    assert sorted(metrics) == sorted(TOTAL_METRICS)
    assert metrics["records_out"] > 0 and metrics["rejects"] == 0
    assert metrics["records_in"] == metrics["records_out"]
    assert metrics["border_clamped"] == metrics["multi_part_polygons"] == 0  # the shapes are drawn inside, in one part
    counts = json.loads((repo_copy / "reports" / "preprocess_counts.json").read_text())
    assert counts["total"] == metrics and set(counts["splits"]) == {"train", "val"}
    status = _run(["dvc", "status", "preprocess"], repo_copy).stdout
    assert "up to date" in status.lower() or status.strip() == ""
    # the stage logged its statistics to the project's own SQLite store, tagged for traceability
    mlflow.set_tracking_uri(f"sqlite:///{repo_copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["coordexp-stage1"], output_format="list")
    (run,) = runs
    assert run.data.tags["coordexp.stage"] == "preprocess"
    assert len(run.data.tags["coordexp.params_hash"]) == 16
    assert run.data.tags["coordexp.git_commit"] != "unknown"
    assert run.data.metrics["preprocess.records_out"] == metrics["records_out"]
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_stage_refuses_bad_params_before_work(repo_copy):
    p = repo_copy / "params.yaml"
    p.write_text(p.read_text().replace("  coord_soft_ce_w1:\n", "  coord_loss: {l1: 1}\n  coord_soft_ce_w1:\n"))
    res = subprocess.run(
        ["python", "stages/preprocess.py"], cwd=repo_copy, env=stage_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 2
    assert "train.coord_loss" in res.stderr
    assert not (repo_copy / "artifacts").exists()
