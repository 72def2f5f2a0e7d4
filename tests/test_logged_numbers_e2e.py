"""The logged numbers on the MLflow store of real ``swift sft`` runs, at one and at two processes.

One tiny project (data and base model built once) trains twice, 4 optimizer steps of a global batch
of 4 each: one process of batch 4, then two processes of batch 1 with gradient accumulation 2. Logged
every 2 steps (plus the first), evaluated every 2. On the MLflow store, at every logged step, train
and eval: ``coord_softce_w1/loss == loss`` (``eval_*`` alike) and ``loss == text_ce + soft_ce_weight
soft_ce + w1_weight w1 + gate_weight gate`` with the params' weights; the decoder's, vision tower's and
merger's learning rates are logged under their own names and peak at their configured values. The
in-process version of the same identities is ``tests/test_logged_numbers.py``. Last, the same project trains as
two nodes of one process each on the loopback address and logs the two-process run's losses.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import make_tiny_project, run_stage, set_params, stage_env

LR, VIT_LR, ALIGNER_LR = 2e-3, 1e-4, 5e-4
SETTINGS = {
    "train.max_steps": 4,
    "train.logging_steps": 2,
    "train.eval_steps": 2,
    "train.save_steps": 4,
    "train.eval_samples": 4,
    "train.per_device_eval_batch_size": 2,
    "train.learning_rate": LR,
    "train.vit_lr": VIT_LR,
    "train.aligner_lr": ALIGNER_LR,
    "train.lr_scheduler_type": "cosine",
    "train.warmup_ratio": 0.5,  # 2 warm-up steps: the rate logged after step 2 is the peak
}
RUNS = {
    "one": {"train.nproc_per_node": 1, "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1},
    "two": {"train.nproc_per_node": 2, "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2},
}
P = "coord_softce_w1/"


@pytest.fixture(scope="module")
def logged_runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = make_tiny_project(tmp_path_factory.mktemp("logged") / "repo", n_train=24, n_val=4, **SETTINGS)
    for stage in ("preprocess", "build_base"):
        run_stage(root, stage)
    runs = {}
    for name, updates in RUNS.items():  # the same data and base model; the train stage starts afresh
        set_params(root, updates)
        run_stage(root, "train")
        runs[name] = (root / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    return root, runs


def _histories(root: Path, run_id: str) -> dict[str, dict[int, float]]:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    keys = client.get_run(run_id).data.metrics.keys()
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_logged_loss_is_the_trainers_loss_and_the_weighted_sum_of_its_terms(logged_runs, name):
    from coordexp.core.config import load_params

    root, runs = logged_runs
    h = _histories(root, runs[name])
    w = load_params(root / "params.yaml").train.coord_soft_ce_w1
    for pre, steps in (("", [1, 2, 4]), ("eval_", [2, 4])):
        assert sorted(h[f"{pre}loss"]) == steps, (name, pre, h[f"{pre}loss"])
        for step in steps:
            loss = h[f"{pre}loss"][step]
            assert h[f"{pre}{P}loss"][step] == pytest.approx(loss, rel=1e-5), (name, pre, step)
            weighted = (
                h[f"{pre}{P}text_ce"][step]
                + w.soft_ce_weight * h[f"{pre}{P}soft_ce"][step]
                + w.w1_weight * h[f"{pre}{P}w1"][step]
                + w.gate_weight * h[f"{pre}{P}gate"][step]
            )
            assert weighted == pytest.approx(loss, rel=1e-5), (name, pre, step)
    assert h["train_summary.final_eval_loss"][0] == pytest.approx(h[f"eval_{P}loss"][4], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_every_learning_rate_is_logged_under_its_own_name(logged_runs, name):
    root, runs = logged_runs
    h = _histories(root, runs[name])
    for key, peak in (("learning_rate", LR), ("learning_rate/vit", VIT_LR), ("learning_rate/aligner", ALIGNER_LR)):
        assert sorted(h[key]) == [1, 2, 4], key
        assert max(h[key].values()) == pytest.approx(peak, rel=1e-6), key
        assert h[key][2] == pytest.approx(peak, rel=1e-6), key  # the end of the warm-up
        for step, lr in h[key].items():  # one schedule, three base rates
            assert lr == pytest.approx(h["learning_rate"][step] * peak / LR, rel=1e-6), (key, step)


@pytest.mark.slow
def test_two_processes_with_accumulation_log_the_one_process_loss(logged_runs):
    """The same 4 samples make the first optimizer step of both runs, before any update: the same loss."""
    root, runs = logged_runs
    one, two = (_histories(root, runs[n]) for n in ("one", "two"))
    for key in ("loss", f"{P}loss", f"{P}text_ce", f"{P}soft_ce", f"{P}w1", f"{P}gate"):
        assert two[key][1] == pytest.approx(one[key][1], rel=1e-4), key


@pytest.mark.slow
def test_two_nodes_of_one_process_train_like_one_node_of_two(logged_runs):
    """Two stage processes on one machine and one ``artifacts/`` (a shared filesystem, the harder case), the same
    ``params.yaml``, node 1's rank from ``NODE_RANK``: the loss curve of the one-node two-process run, node 0's
    outputs and MLflow run alone. It runs last: it replaces ``artifacts/train`` (the tests above read the store)."""
    root, runs = logged_runs
    reference = _histories(root, runs["two"])["loss"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    set_params(
        root,
        {
            **RUNS["two"],
            "train.nproc_per_node": 1,
            "train.nnodes": 2,
            "train.master_addr": "127.0.0.1",
            "train.master_port": port,
        },
    )
    procs = {
        rank: subprocess.Popen(
            [sys.executable, "stages/train.py"],
            cwd=root,
            env=stage_env(NODE_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (1, 0)  # node 1 first: it waits for node 0 at the rendezvous
    }
    out = {rank: p.communicate(timeout=900)[0] for rank, p in procs.items()}
    for rank, p in procs.items():
        assert p.returncode == 0, f"node {rank}:\n{out[rank][-6000:]}"
    assert "node 1 of 2: trained" in out[1]

    run_id = (root / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    two_nodes = _histories(root, run_id)["loss"]
    assert sorted(two_nodes) == sorted(reference) == [1, 2, 4]
    for step, loss in reference.items():
        assert two_nodes[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    # node 1 wrote nothing of the pipeline: one new MLflow run (node 0's), no other store, no temporary rows left
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before + 1
    assert not (root / "mlruns").exists()
    assert json.loads((root / "reports" / "metrics" / "train.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (root / "artifacts" / "train").iterdir()) == sorted(
        ["coordexp_plugin.json", "data", "final", "mlflow_run_id", "resolved_params.json", "state.json", "swift"]
    )
