"""A real ``mlflow server`` that goes away in the middle of the train stage: briefly (MLflow's client retries and
nothing is lost) and past ``tracking.outage_limit_s`` (checkpoint, stop, resume into the same run)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from conftest import VENV_BIN, set_params, stage_env

from coordexp.core.config import Params
from coordexp.pipeline import tracking

STEPS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on a fixed port and SQLite file, which the test kills and starts again."""

    def __init__(self, tmp: Path):
        self.port, self.tmp, self.proc = _free_port(), tmp, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}", "--workers", "1"]
        cmd += ["--default-artifact-root", str(self.tmp / "server-artifacts")]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=stage_env(), start_new_session=True
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                tracking.check_reachable(self.uri, timeout=1)
                return
            except tracking.TrackingError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server on port {self.port} did not start")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _logged_steps(swift_out: Path) -> int:
    """Training steps the trainer has logged so far (ms-swift's logging.jsonl)."""
    f = swift_out / "logging.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
    return max((int(str(r["global_step/max_steps"]).split("/")[0]) for r in rows if "loss" in r), default=0)


def _start_train(root: Path, uri: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "python"), "stages/train.py"],
        cwd=root,
        env=stage_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_after(server: Server, proc: subprocess.Popen, swift_out: Path, step: int) -> None:
    deadline = time.time() + 600
    while _logged_steps(swift_out) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and _logged_steps(swift_out) >= step, "training ended before the server was killed"
    server.kill()


def test_retries_span_the_outage_limit(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    for limit in (1, 3, 40, 300, 1080):
        env = tracking.retry_env(Params.model_validate({"tracking": {"outage_limit_s": limit}}))
        retries, factor = int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), int(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
        assert limit <= tracking._retry_span(retries, factor) <= max(limit * 1.1, limit + 3), limit
        assert retries <= tracking.RETRY_LIMIT and int(env["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 120
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert tracking.retry_env(Params()) == {}


@pytest.mark.slow
def test_server_away_short_and_long(tmp_path, tiny_prepared):
    """One training run, two outages. (1) Killed past a 3 s limit and left down: the stage saves a checkpoint at
    that step, keeps the unsent points and stops with how to resume. (2) Server back, limit 60 s: the rerun resumes
    into the same run, sends the kept points, rides out a ~5 s kill-and-restart, and ends FINISHED with every
    point the trainer logged, each step exactly once."""
    server = Server(tmp_path)
    server.start()
    upd = {"train.max_steps": STEPS, "train.logging_steps": 1, "train.save_steps": STEPS, "train.eval_steps": STEPS}
    root = tiny_prepared("outage", **upd)  # its data and base logged locally: only training meets the server
    set_params(root, {"tracking.outage_limit_s": 3})
    out = root / "artifacts" / "train"
    swift_out = out / "swift"
    try:
        # (1) the long outage
        proc = _start_train(root, server.uri)
        _kill_after(server, proc, swift_out, 3)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stdout[-3000:] + stderr[-3000:]
        err = stderr.strip().splitlines()[-1]
        run_id = (out / "mlflow_run_id").read_text().strip()
        step = int(re.search(r"at step (\d+)", err).group(1))
        assert 3 <= step < STEPS and "tracking.outage_limit_s" in err and "dvc repro train" in err
        assert f"same MLflow run {run_id}" in err
        assert (swift_out / f"checkpoint-{step}" / "trainer_state.json").is_file()
        kept = [json.loads(x) for x in (swift_out / "coordexp_kept_metrics.jsonl").read_text().splitlines()]
        assert kept[0]["step"] == step and "loss" in kept[0]["metrics"]

        # (2) back, resumed, and a short outage
        server.start()
        set_params(root, {"tracking.outage_limit_s": 60})
        proc = _start_train(root, server.uri)
        _kill_after(server, proc, swift_out, step + 2)
        time.sleep(5)
        server.start()
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert f"resuming run {run_id}" in stdout and "metric point(s) kept during the outage" in stdout

        mlflow.set_tracking_uri(server.uri)
        client = mlflow.MlflowClient()
        assert client.get_run(run_id).info.status == "FINISHED"
        assert (out / "mlflow_run_id").read_text().strip() == run_id
        state = json.loads((swift_out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
        logged = [e for e in state["log_history"] if "loss" in e]
        assert [e["step"] for e in logged] == list(range(1, STEPS + 1))
        for key in ("loss", "grad_norm", "learning_rate"):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert [s for s, _ in hist] == [e["step"] for e in logged], key
            assert [v for _, v in hist] == pytest.approx([e[key] for e in logged]), key
        assert {m.step for m in client.get_metric_history(run_id, "eval_loss")} == {STEPS}
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
