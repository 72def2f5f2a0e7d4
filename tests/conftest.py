"""Shared fixtures: a temporary copy of the repository, and an isolated MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordexp.pipeline.workspace import copy_project

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


SMALL_MODEL = dict(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    vision_hidden_size=32,
    vision_depth=2,
    vision_heads=2,
    vision_warmup={"steps": 0},
)
"""``build_base.tiny`` dims of the smallest tiny model the unit tests build (the warm-up is off here: it has tests
of its own in test_vision_warmup.py)."""


def copy_repo(dest: Path) -> Path:
    """A fresh working copy of the project (own git repo, DVC cache empty), like a new clone."""
    return copy_project(ROOT, dest)


def stage_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COORDEXP_", "DVC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# ------------------------------------------------------------------------------------------
# a tiny real project: small synthetic data, the real stages, the real tools


def set_params(root: Path, updates: dict) -> None:
    """Deep-update ``root/params.yaml`` (keys as dotted paths)."""
    from coordexp.core.config import override_params_file

    override_params_file(root / "params.yaml", updates)


TINY_TRAIN = {
    "train.max_steps": 30,
    "train.per_device_train_batch_size": 4,
    "train.per_device_eval_batch_size": 4,
    "train.logging_steps": 5,
    "train.eval_steps": 10,
    "train.save_steps": 10,
    "train.eval_samples": 4,
    "train.learning_rate": 0.002,
    "train.warmup_ratio": 0.0,
    "train.nproc_per_node": 1,
    "build_base.tiny.vision_warmup.steps": 3,
    "build_base.tiny.vision_warmup.batch_size": 4,
    "evaluate.limit": 8,
    "evaluate.batch_size": 8,
    "evaluate.max_new_tokens": 64,
}


def make_tiny_project(dest: Path, n_train: int = 48, n_val: int = 8, **updates) -> Path:
    """A repo copy whose data is a small freshly generated shapes set (no DVC pull needed)."""
    from coordexp.preprocess.synth import generate_coco_shapes

    root = copy_repo(dest)
    generate_coco_shapes(root / "data" / "shapes", n_train=n_train, n_val=n_val, seed=1, progress=False)
    set_params(root, {**TINY_TRAIN, **updates})
    return root


def run_stage(root: Path, name: str, *, check: bool = True, timeout: int = 900, **env: str):
    res = subprocess.run(
        [sys.executable, f"stages/{name}.py"],
        cwd=root,
        env=stage_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert res.returncode == 0, f"stage {name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res
