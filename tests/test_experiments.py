"""`dvc exp run` ablations land in the user's MLflow store, each its own run tagged and named after its experiment,
two of them at once from DVC's queue; `dvc repro` in two clones writes the same dvc.lock."""

import re
import subprocess
import time

import mlflow
import pytest
from conftest import make_tiny_project, side_by_side, stage_env


def _sh(cmd, cwd, check=True):
    res = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=1200)
    assert not check or res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory):
    """A tiny project under git and DVC, its data and base checkpoint in the DVC cache: experiments start at train."""
    tiny = {"train.max_steps": 10, "train.eval_steps": 10, "train.save_steps": 10, "evaluate.limit": 2}
    root = make_tiny_project(tmp_path_factory.mktemp("exp") / "repo", **tiny, **{"evaluate.max_new_tokens": 32})
    _sh(["dvc", "add", "-q", "data"], root)
    _sh(["dvc", "repro", "-q", "build_base"], root)
    _sh(["git", "add", "-A"], root)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny data"], root)
    return root


def _train_runs(root, exp_names):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["coordexp-stage1"],
        filter_string="tags.`coordexp.stage` = 'train'",
        output_format="list",
    )
    return [r for r in runs if r.data.tags.get("dvc.exp_name") in exp_names]


@pytest.mark.slow
def test_repro_in_two_clones_gives_the_same_dvc_lock(tmp_path):
    """Two copies of the project in different folders, each with its own empty MLflow store: `dvc repro` writes
    the same dvc.lock (every output hashed the same) and the same reports, so a fresh clone's `make repro`
    leaves `git status` clean. Timings, run ids and machine paths would each break it."""
    tiny = {"train.max_steps": 10, "train.eval_steps": 10, "train.save_steps": 10, "evaluate.limit": 4}
    roots = [make_tiny_project(tmp_path / where / "repo", **tiny) for where in ("a", "elsewhere/b")]
    side_by_side(*(lambda r=r: _sh(["dvc", "repro", "-q"], r) for r in roots))
    locks = [(root / "dvc.lock").read_text() for root in roots]
    assert "artifacts/train/final" in locks[0]
    assert locks[0] == locks[1], "\n".join(
        f"{x!r} != {y!r}" for x, y in zip(locks[0].splitlines(), locks[1].splitlines()) if x != y
    )
    for rel in ("reports/metrics/eval.json", "reports/metrics/train.json", "reports/train_history.csv"):
        assert (roots[0] / rel).read_bytes() == (roots[1] / rel).read_bytes(), rel


def _artifacts(client, run_id, path=None):
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.mark.slow
def test_queued_experiments_run_at_once_into_one_store(exp_repo):
    """Two `dvc exp run --queue`, then `dvc queue start --jobs 2`: both train and evaluate at the same time into the
    repository's one SQLite store; both runs end FINISHED with the same metrics and artifacts, none lost to a lock."""
    root = exp_repo
    # a worker started once on the empty queue leaves the file broker's exchange tables behind: two workers that
    # create them at the same instant race and the loser dies at start-up (treeverse/dvc-task#73), after which
    # the experiments run one after the other
    celery = root / ".dvc" / "tmp" / "exps" / "celery"
    _sh(["dvc", "queue", "start"], root)
    deadline = time.time() + 1500
    while (
        not (celery / "dvc-exp-worker-1.out").is_file() or " done" not in (celery / "dvc-exp-worker-1.out").read_text()
    ):
        assert time.time() < deadline, "the first queue worker did not stop on the empty queue"
        time.sleep(1)
    lrs = {"lr-low": 0.001, "lr-high": 0.004}
    for name, lr in lrs.items():
        _sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={lr}", "evaluate"], root)
    _sh(["dvc", "queue", "start", "--jobs", "2"], root)

    def done(status):
        lines = status.splitlines()
        return all(any(f" {n} " in f" {x} " and re.search(r"\b(Success|Failed)\b", x) for x in lines) for n in lrs)

    while not done(status := _sh(["dvc", "queue", "status"], root).stdout) and time.time() < deadline:
        time.sleep(5)
    for name in lrs:
        line = next((x for x in status.splitlines() if f" {name} " in f" {x} "), "")
        logs = _sh(["dvc", "queue", "logs", name], root, check=False).stdout if "Success" not in line else ""
        assert "Success" in line, f"{status}\n{logs[-6000:]}"

    runs = {r.data.tags["dvc.exp_name"]: r for r in _train_runs(root, lrs)}
    assert set(runs) == set(lrs)
    client = mlflow.MlflowClient()
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.info.run_name == f"train/{name}", name  # named after its experiment in the MLflow UI
        assert float(run.data.params["cfg.train.learning_rate"]) == lrs[name]
        assert "coordexp.evaluate.params_hash" in run.data.tags  # evaluate logged into the training run
    a, b = runs.values()
    assert max(a.info.start_time, b.info.start_time) < min(a.info.end_time, b.info.end_time), "not at once"
    keys = [set(r.data.metrics) for r in (a, b)]
    assert keys[0] == keys[1] and {"loss", "eval_loss", "train_summary.steps", "bbox_mAP"} <= keys[0]
    steps = [[m.step for m in client.get_metric_history(r.info.run_id, "loss")] for r in (a, b)]
    assert steps[0] == steps[1] == [1, 5, 10]
    files = [_artifacts(client, r.info.run_id) for r in (a, b)]
    assert files[0] == files[1]
    assert {"config/swift_args.json", "history/train_history.csv", "eval/coco_results.json"} <= files[0]
    shown = _sh(["dvc", "exp", "show", "--no-pager", "--csv"], root).stdout
    assert all(name in shown for name in lrs)
