"""`dvc exp run` ablations land in the user's MLflow store, tagged with the experiment name."""

import subprocess

import mlflow
import pytest
from conftest import make_tiny_project, stage_env


def _sh(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_dvc_experiment_is_its_own_tagged_run(tmp_path):
    root = make_tiny_project(
        tmp_path / "repo", **{"train.max_steps": 10, "train.eval_steps": 10, "train.save_steps": 10}
    )
    _sh(["dvc", "add", "-q", "data"], root)
    _sh(["git", "add", "-A"], root)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny data"], root)
    _sh(["dvc", "exp", "run", "-n", "w1zero", "-S", "train.coord_soft_ce_w1.w1_weight=0", "train"], root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["coordexp-stage1"],
        filter_string="tags.`coordexp.stage` = 'train'",
        output_format="list",
    )
    (run,) = runs
    assert run.data.tags["dvc.exp_name"] == "w1zero" and run.info.run_name == "train/w1zero"
    assert float(run.data.params["cfg.train.coord_soft_ce_w1.w1_weight"]) == 0.0
    shown = _sh(["dvc", "exp", "show", "--no-pager", "--csv"], root).stdout
    assert "w1zero" in shown
