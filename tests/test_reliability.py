"""Fault injection on the real stages: kills, NaNs, tracking servers, no network."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import VENV_BIN, make_tiny_project, run_stage, set_params, side_by_side, stage_env

pytestmark = pytest.mark.slow


def _eval_losses(root: Path) -> dict[int, float]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run_id = (root / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    hist = mlflow.tracking.MlflowClient().get_metric_history(run_id, "eval_loss")
    return {m.step: m.value for m in hist}


KILLED = {"train.max_steps": 20, "train.save_steps": 10, "train.eval_steps": 10}


@pytest.fixture(scope="module")
def straight_losses(tiny_prepared) -> dict[int, float]:
    """The eval losses of the run that nothing interrupts (both signals are checked against it)."""
    ref = tiny_prepared("straight", **KILLED)
    run_stage(ref, "train")
    return _eval_losses(ref)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_training_resumes_in_the_same_run(tiny_prepared, straight_losses, sig):
    """Kill the stage after its first checkpoint; `dvc repro` resumes it; losses match an uninterrupted run."""
    root = tiny_prepared("killed", **KILLED)
    proc = subprocess.Popen(
        [sys.executable, "stages/train.py"],
        cwd=root,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = root / "artifacts" / "train" / "swift" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 600
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert ckpt.is_file(), "no checkpoint before the deadline"
    time.sleep(1.0)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    run_id = (root / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    assert json.loads((root / "artifacts" / "train" / "state.json").read_text())["status"] == "running"

    # --single-item: the upstream stages' outputs are there already (a real project's dvc.lock says so; this
    # copy has none, and DVC would run them again first)
    res = subprocess.run(
        ["dvc", "repro", "--single-item", "train"],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming run {run_id}" in res.stdout
    assert (root / "artifacts" / "train" / "mlflow_run_id").read_text().strip() == run_id
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    runs = mlflow.search_runs(
        experiment_names=["coordexp-stage1"],
        filter_string="tags.`coordexp.stage` = 'train'",
        output_format="list",
    )
    assert [r.info.run_id for r in runs] == [run_id]

    resumed, straight = _eval_losses(root), straight_losses
    # Resume restores weights, optimizer, scheduler, RNG and data position from the checkpoint;
    # what remains is float summation order, so 1e-4 relative.
    assert resumed[20] == pytest.approx(straight[20], rel=1e-4)


NAN_PLUGIN = Path(__file__).resolve().parent / "plugins" / "nan_at_step.py"
"""Test-only ms-swift plugin: NaN into the Stage-1 loss at the step named in ``COORDEXP_TEST_NAN_AT_STEP``."""


def test_nan_stops_training_names_the_step_and_keeps_the_checkpoint(tiny_prepared):
    root = tiny_prepared("nan", **{"train.max_steps": 20, "train.save_steps": 5})
    set_params(root, {"train.swift_plugins": [str(NAN_PLUGIN)]})
    res = run_stage(root, "train", check=False, COORDEXP_TEST_NAN_AT_STEP="7")
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert "non-finite loss term(s)" in err and "at step 7" in err
    assert "images/train/" in err and "(unmatched)" not in err  # the batch's samples are named
    good = root / "artifacts" / "train" / "swift" / "checkpoint-5"
    assert (good / "model.safetensors").is_file() and (good / "trainer_state.json").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run_id = (root / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    assert mlflow.get_run(run_id).info.status == "FAILED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_training(tiny_prepared):
    root = tiny_prepared("unreachable")
    res = run_stage(root, "train", check=False, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_free_port()}")
    assert res.returncode == 2
    assert "cannot reach the MLflow tracking server" in res.stderr
    assert not (root / "artifacts" / "train" / "swift").exists()


def test_runs_land_on_a_tracking_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        root = make_tiny_project(tmp_path / "repo")
        run_stage(root, "preprocess", MLFLOW_TRACKING_URI=uri)
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=["coordexp-stage1"], output_format="list")
        assert [r.data.tags["coordexp.stage"] for r in runs] == ["preprocess"]
        assert not (root / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


_BLOCK = """
import socket
_connect = socket.socket.connect
def _blocked(self, address):
    if self.family == socket.AF_UNIX:
        return _connect(self, address)
    raise OSError(f"network disabled by the no-network test: connect to {address}")
socket.socket.connect = _blocked
socket.socket.connect_ex = lambda self, address: _blocked(self, address)
"""


def test_pipeline_runs_with_sockets_blocked(tmp_path):
    """sitecustomize makes every TCP/UDP connect raise in every stage process (and their children)."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(_BLOCK)
    root = make_tiny_project(
        tmp_path / "repo",
        **{"train.max_steps": 10, "train.eval_steps": 10, "train.save_steps": 10, "evaluate.limit": 4},
    )
    for stage in ("preprocess", "build_base", "train", "evaluate"):
        run_stage(root, stage, PYTHONPATH=str(block))
    assert json.loads((root / "reports" / "metrics" / "eval.json").read_text())["nan_scores"] == 0


def test_same_seed_same_metrics(tmp_path):
    updates = {"train.max_steps": 10, "train.eval_steps": 10, "train.save_steps": 10}
    roots = [make_tiny_project(tmp_path / name, **updates) for name in ("a", "b")]

    def chain(root: Path) -> None:
        for stage in ("preprocess", "build_base", "train"):
            run_stage(root, stage)

    side_by_side(*(lambda r=r: chain(r) for r in roots))
    metrics = []
    for root in roots:
        m = json.loads((root / "reports" / "metrics" / "train.json").read_text())
        metrics.append({k: v for k, v in m.items() if k.startswith("final_")})
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        run = mlflow.get_run((root / "artifacts" / "train" / "mlflow_run_id").read_text().strip())
        assert run.data.tags["coordexp.git_commit"] != "unknown" and run.data.tags["coordexp.params_hash"]
    assert metrics[0] == metrics[1]


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    """A kill while checkpoint-20 is written leaves it without trainer_state.json: resume from checkpoint-10,
    not from scratch (CI once killed the 20-step run right inside that window)."""
    from coordexp.core.config import load_params
    from coordexp.train.stage import STATE_FILE, SWIFT_DIR, resumable, training_fingerprint

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    out = tmp_path / "train"
    for step, complete in ((10, True), (20, False)):
        ckpt = out / SWIFT_DIR / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
    state = {"fingerprint": training_fingerprint(params), "run_id": "r1", "status": "running"}
    (out / STATE_FILE).write_text(json.dumps(state))
    assert resumable(out, params) == ("r1", out / SWIFT_DIR / "checkpoint-10")
    (out / SWIFT_DIR / "checkpoint-10" / "trainer_state.json").unlink()
    assert resumable(out, params) is None  # nothing complete: start over
    (out / STATE_FILE).write_text(json.dumps({**state, "status": "done"}))
    assert resumable(out, params) is None
