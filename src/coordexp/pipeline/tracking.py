"""MLflow plumbing: one place that decides *which* store a run goes to and how it is tagged.

Store resolution, first match wins:

1. ``MLFLOW_TRACKING_URI`` in the environment (a server, or any URI MLflow understands);
2. ``tracking.uri`` in ``params.yaml``;
3. ``sqlite:///<store root>/mlflow.db`` with artifacts under ``<store root>/mlartifacts``.

The *store root* is the project root, except inside a DVC experiment's temporary copy
(``<repo>/.dvc/tmp/exps/...``), where it is the real repository: a queued experiment must land in
the user's store, not in a folder that disappears when the experiment ends (DVC also says so in
``DVC_ROOT``, which is used when set). ``COORDEXP_STORE_ROOT`` overrides.

Every run is tagged with the git commit, the DVC stage, a hash of the validated params and, when
DVC provides it, the experiment name, so a number in the UI can always be traced to its inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from coordexp.core import paths
from coordexp.core.checkpoint import FINAL_DIR, RUN_ID_FILE, weights_digest
from coordexp.core.config import Params
from coordexp.core.errors import StageError


class TrackingError(StageError):
    """The tracking store cannot be used; raised before any work starts."""


def store_root(root: Path | None = None) -> Path:
    env = os.environ.get("COORDEXP_STORE_ROOT") or os.environ.get("DVC_ROOT")  # DVC: the parent repo's root
    if env:
        return Path(env).resolve()
    root = (root or paths.project_root()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(params: Params | None = None, root: Path | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if params is not None and params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{store_root(root) / 'mlflow.db'}"


def artifact_location(params: Params | None = None, root: Path | None = None) -> str:
    if params is not None and params.tracking.artifact_location:
        return str(paths.resolve(params.tracking.artifact_location, store_root(root)))
    return str(store_root(root) / "mlartifacts")


def params_hash(params: Params) -> str:
    blob = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or paths.project_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


PARAM_PREFIX = "cfg."
"""Our params are logged as ``cfg.<key path>``: the trainer's MLflow callback logs its own
arguments (``seed``, ``learning_rate``, ...) into the same run, and MLflow refuses a second
value for an existing key."""


def mlflow_params(params: Params) -> dict[str, Any]:
    flat = flatten(params.model_dump(mode="json"))
    return {PARAM_PREFIX + k: "null" if v is None else v for k, v in flat.items()}


def mlflow_metric_name(name: str) -> str:
    """A metric's MLflow key: MLflow forbids ``@``, so ``f1@0.5`` (its name in ``eval.json``) is ``f1_at_0.5``."""
    return name.replace("@", "_at_")


def metric_name_from_mlflow(key: str) -> str:
    """The inverse of :func:`mlflow_metric_name`: tables and reports use one spelling, the file's."""
    return key.replace("_at_", "@")


WEIGHTS_DIGEST_TAG = "coordexp.weights_digest"
"""Tag of a training run: :func:`coordexp.core.checkpoint.weights_digest` of the checkpoint it produced."""


def run_id_of(params: Params, root: Path | None = None) -> str | None:
    """The MLflow id of the training run that produced ``<train.out_dir>/final``; None before training.

    The train stage writes the id to ``<train.out_dir>/mlflow_run_id``, beside (not inside) the DVC
    output: a random id in a hashed output would change ``dvc.lock`` on every run. When DVC restores
    ``final`` from its cache (a ``dvc exp run`` of params trained before), that file can name another
    run; the run is then found by the weights' digest, which its training run carries as a tag.
    """
    out = paths.resolve(params.train.out_dir, root or paths.project_root())
    f = out / RUN_ID_FILE
    run_id = (f.read_text().strip() or None) if f.is_file() else None
    final = out / FINAL_DIR
    if not any(final.glob("*.safetensors")):
        return run_id
    digest = weights_digest(final)
    client = _mlflow(params).MlflowClient()
    if run_id is not None:
        try:
            if client.get_run(run_id).data.tags.get(WEIGHTS_DIGEST_TAG) in (digest, None):
                return run_id
        except Exception:  # noqa: BLE001 - MlflowException: the run is not in this store
            pass
    exp = client.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{WEIGHTS_DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the URI in the message, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user-given URI
            if resp.status >= 400:
                raise TrackingError(f"MLflow server at {uri} answered HTTP {resp.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({exc}); start it, fix MLFLOW_TRACKING_URI / "
            "tracking.uri, or unset both to use the local SQLite store"
        ) from None


def _mlflow(params: Params | None):
    uri = tracking_uri(params)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return mlflow


def experiment_id(params: Params) -> str:
    """Id of the configured experiment, created with an explicit artifact location if new."""
    mlflow = _mlflow(params)
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=Path(artifact_location(params)).as_uri())


def run_tags(params: Params, stage: str) -> dict[str, str]:
    tags = {
        "coordexp.stage": stage,
        "coordexp.params_hash": params_hash(params),
        "mlflow.source.git.commit": git_commit(),
        "coordexp.git_commit": git_commit(),
    }
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    return tags


@contextmanager
def stage_run(
    params: Params, stage: str, *, run_id: str | None = None, run_name: str | None = None, log_params: bool = True
) -> Iterator[Any]:
    """Start (or resume, given ``run_id``) a run for ``stage``; marks it FAILED if the block raises."""
    mlflow = _mlflow(params)
    exp = experiment_id(params)
    if run_id is not None:
        try:
            run = mlflow.start_run(run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - MlflowException for an unknown id
            raise TrackingError(f"cannot resume MLflow run {run_id} in {tracking_uri(params)}: {exc}") from None
    else:
        run = mlflow.start_run(experiment_id=exp, run_name=run_name or stage)
    try:
        tags = run_tags(params, stage)
        if run_id is not None:
            # a later stage adding to an earlier stage's run keeps that run's identity
            tags = (
                {f"coordexp.{stage}.{k.split('.')[-1]}": v for k, v in tags.items() if k != "coordexp.stage"}
                if mlflow.get_run(run_id).data.tags.get("coordexp.stage") not in (None, stage)
                else tags
            )
        mlflow.set_tags(tags)
        if log_params and run_id is None:
            mlflow.log_params(mlflow_params(params))
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
