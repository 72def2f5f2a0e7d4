"""Shared fixtures: a temporary copy of the repository, an isolated MLflow store, tiny projects (prepared ones
shared across the slow tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


TRAIN_ONWARDS = ("train", "evaluate", "report", "compare")
"""Top-level ``params.yaml`` sections that ``preprocess`` and ``build_base`` do not read."""


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """``tiny_prepared(name, n_train=48, n_val=8, **updates)``: a tiny project with ``preprocess`` and ``build_base``
    already run, under ``tmp_path_factory.mktemp(name)``.

    Each distinct data and base set-up (the sizes and the updates outside :data:`TRAIN_ONWARDS`) runs the two stages
    once per session; later projects are copies of it, ``artifacts/``, ``mlflow.db`` and ``mlartifacts/`` included,
    as ``cp -r`` copies a repository (which the workbench supports: the first stage in the copy points the MLflow
    experiment at the copy's own ``mlartifacts/``). Tests of ``preprocess`` or ``build_base`` themselves, of a
    fresh clone, or of where those stages log, make their own project with :func:`make_tiny_project`."""
    made: dict[str, Path] = {}

    def make(name: str, n_train: int = 48, n_val: int = 8, **updates) -> Path:
        upstream = {k: v for k, v in updates.items() if k.split(".", 1)[0] not in TRAIN_ONWARDS}
        key = json.dumps([n_train, n_val, upstream], sort_keys=True, default=str)
        if key not in made:
            src = make_tiny_project(tmp_path_factory.mktemp("prepared") / "repo", n_train, n_val, **upstream)
            for stage in ("preprocess", "build_base"):
                run_stage(src, stage)
            made[key] = src
        dest = tmp_path_factory.mktemp(name) / "repo"
        shutil.copytree(made[key], dest, symlinks=True)
        set_params(dest, {**TINY_TRAIN, **updates})
        return dest

    return make


def side_by_side(*jobs: Callable[[], object]) -> list[object]:
    """Run independent jobs (each a chain of stage processes in its own project) at the same time and return
    their results in order. Stage processes spend much of their time in single-threaded start-up, so two chains
    on two cores take well under twice one; an exception in a job is raised here."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]
