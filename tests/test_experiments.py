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


@pytest.mark.slow
def test_repro_in_two_clones_gives_the_same_dvc_lock(tmp_path):
    """Two copies of the project in different folders, each with its own empty MLflow store: `dvc repro` writes
    the same dvc.lock (every output hashed the same) and the same reports, so a fresh clone's `make repro`
    leaves `git status` clean. Timings, run ids and machine paths would each break it."""
    tiny = {"train.max_steps": 10, "train.eval_steps": 10, "train.save_steps": 10, "evaluate.limit": 4}
    roots = [make_tiny_project(tmp_path / where / "repo", **tiny) for where in ("a", "elsewhere/b")]
    for root in roots:
        _sh(["dvc", "repro", "-q"], root)
    locks = [(root / "dvc.lock").read_text() for root in roots]
    assert "artifacts/train/final" in locks[0]
    assert locks[0] == locks[1], "\n".join(
        f"{x!r} != {y!r}" for x, y in zip(locks[0].splitlines(), locks[1].splitlines()) if x != y
    )
    for rel in ("reports/metrics/eval.json", "reports/metrics/train.json", "reports/train_history.csv"):
        assert (roots[0] / rel).read_bytes() == (roots[1] / rel).read_bytes(), rel
