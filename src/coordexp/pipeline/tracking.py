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
It is named ``<stage>/<DVC experiment name>`` (:func:`run_name`), so runs can be told apart in the
UI's compare view, and its params are the validated ``params.yaml`` keys only (``cfg.<key path>``):
the trainer's several hundred arguments go to an artifact (:func:`trainer_env`). Paths in tags and
artifacts are relative to the repository (:func:`repo_relative`), and so is the source of every
dataset input (:func:`log_dataset`): a run reads the same on every machine.

The experiment is tagged as a model-training experiment (:data:`EXPERIMENT_KIND`), so MLflow 3's UI
opens it on runs and charts, not on the GenAI traces view. Its artifact location follows the
repository the store lives in (:func:`experiment_id`): a copied repository, ``mlflow.db`` included,
logs into its own ``mlartifacts/``.

An HTTP server may go away for a while: :func:`retry_env` makes MLflow's own client retries span
``tracking.outage_limit_s``, and :func:`log_kept_metrics` sends what a training process kept past that limit
(:mod:`coordexp.train.outage`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

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


def _own_store(params: Params | None) -> bool:
    """True when the store in use is this repository's own SQLite file, ``<store root>/mlflow.db``
    (compared by URI: ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI`` itself)."""
    return tracking_uri(params) == f"sqlite:///{store_root() / 'mlflow.db'}"


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
"""Our params are logged as ``cfg.<key path>``: the prefix tells the validated ``params.yaml`` keys
apart from anything else a run may carry (a user's plugin, MLflow autologging) and keeps the
columns of runs logged before comparable with today's."""


def mlflow_params(params: Params) -> dict[str, Any]:
    """The run's params: every validated ``params.yaml`` key (values as written there, so paths stay
    relative to the repository), and nothing else."""
    flat = flatten(params.model_dump(mode="json"))
    return {PARAM_PREFIX + k: "null" if v is None else v for k, v in flat.items()}


def loss_kind(params: Params) -> str:
    """``stage1`` or ``ce-baseline``: what a training run is when DVC gives it no experiment name."""
    return "stage1" if params.train.coord_soft_ce_w1.enabled else "ce-baseline"


def run_name(params: Params, stage: str) -> str:
    """The one name a stage's run gets: ``<stage>/<DVC experiment name>`` (``train/w1zero``; DVC sets
    ``DVC_EXP_NAME`` during ``dvc exp run``); without an experiment, ``train/<loss kind>`` for the
    train stage and the bare stage name for the others (there is one per ``dvc repro``). The train
    stage hands the same name to ms-swift, whose MLflow callback would otherwise rename the run when
    it resumes it."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return f"{stage}/{exp}"
    return f"train/{loss_kind(params)}" if stage == "train" else stage


def repo_relative(value: Any, root: Path | None = None) -> Any:
    """``value`` with the repository's absolute path taken out of every string in it (nested lists
    and dicts too): ``/home/me/repo/artifacts/base`` -> ``artifacts/base``. Tags, params and config
    artifacts then read the same on every machine and in every copy of the repository."""
    base = str((root or paths.project_root()).resolve())
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return "." if value == base else value.replace(base + os.sep, "")
    if isinstance(value, Mapping):
        return {k: repo_relative(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [repo_relative(v, root) for v in value]
    return value


RETRY_LIMIT = 10
"""Most retries MLflow's HTTP client accepts (``_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT``)."""
BACKOFF_MAX_S = 120
"""Longest wait urllib3 puts between two retries (``Retry.DEFAULT_BACKOFF_MAX``)."""


def _retry_span(retries: int, factor: int) -> int:
    """Seconds urllib3 waits in all between the first attempt and the last of ``retries`` retries: nothing
    before the first retry, then ``factor * 2**k`` (k = 1 ... retries - 1), each at most :data:`BACKOFF_MAX_S`."""
    return sum(min(BACKOFF_MAX_S, factor * 2**k) for k in range(1, retries))


def retry_env(params: Params) -> dict[str, str]:
    """MLflow's HTTP retry settings that make a client give up after about ``tracking.outage_limit_s``.

    MLflow's client retries every request itself with exponential backoff
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR``; by default about 4 minutes), so a server
    that restarts only pauses the caller. Here the retries span at least the limit (a shorter outage never
    fails a request) and at most 10 % more where a choice allows it, with as many retries as possible so a
    returning server is noticed soon. ``MLFLOW_HTTP_REQUEST_TIMEOUT`` bounds each attempt to its share of
    the limit, so a server that drops packets instead of refusing them is given up on in time too.
    Empty for a store that is no HTTP server."""
    if not tracking_uri(params).startswith(("http://", "https://")):
        return {}
    limit = params.tracking.outage_limit_s
    fits = [(r, f) for r in range(RETRY_LIMIT + 1) for f in range(BACKOFF_MAX_S + 1) if _retry_span(r, f) >= limit]
    shortest = min(_retry_span(r, f) for r, f in fits)
    retries, factor = max(
        ((r, f) for r, f in fits if _retry_span(r, f) <= max(shortest, 1.1 * limit)),
        key=lambda rf: (rf[0], -_retry_span(*rf)),
    )
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(10, min(120, -(-limit // (retries + 1))))),
    }


def trainer_env(params: Params, run_id: str) -> dict[str, str]:
    """The environment that points HF's ``MLflowCallback`` (in the ms-swift processes) at our run.

    It resumes the run through ``MLFLOW_RUN_ID`` and logs the trainer's metrics there from rank 0.
    ``MLFLOW_MAX_LOG_PARAMS=0`` (the callback's own setting) stops it from logging its ~260
    arguments and model-config entries as params, absolute paths included: the run's params are the
    project's (:func:`mlflow_params`), and the launcher's arguments are an artifact
    (``config/swift_args.json``). With an HTTP server, :func:`retry_env` makes its client wait for a
    server that went away up to ``tracking.outage_limit_s``."""
    return {
        "MLFLOW_TRACKING_URI": tracking_uri(params),
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_EXPERIMENT_NAME": params.tracking.experiment,
        "MLFLOW_MAX_LOG_PARAMS": "0",
        **{k: os.environ.get(k, v) for k, v in retry_env(params).items()},  # a user's own setting wins
    }


DATASET_CONTEXTS = {"train": "training", "val": "validation"}
"""MLflow's input context of each preprocess split (any other split is logged under its own name)."""


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: the hash DVC records for it (``dvc.lock``, the cache)."""
    h = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log_dataset(
    path: Path, context: str, *, name: str | None = None, records: int | None = None, root: Path | None = None
) -> None:
    """Log a contract JSONL file as an MLflow dataset input of the active run: its source is the
    path relative to the repository and its digest the file's DVC md5, so the UI's dataset view
    names the exact data a run saw and ``dvc.lock`` confirms it. ``records`` (when part of the
    file was used) goes into the input's tags."""
    # lazy: mlflow.data imports the dataset sources on first use
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(repo_relative(str(path.resolve()), root))
    ds = MetaDataset(source, name=name or path.stem, digest=file_md5(path))
    tags = {"coordexp.records": str(records)} if records is not None else None
    mlflow.log_input(ds, context=context, tags=tags)


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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The experiment tag MLflow 3's UI reads to choose its view: ``custom_model_development`` is its
"machine learning" workflow (runs, params, metric charts); without it the UI guesses, and an
experiment whose first runs have no metrics yet may open in the GenAI view."""


def experiment_id(params: Params) -> str:
    """Id of the configured experiment, created with an explicit artifact location if new, tagged
    as model training (:data:`EXPERIMENT_KIND`) whether new or not, and, in the repository's own
    store, with its artifact location moved to this repository when the store was copied from
    another one (:func:`_follow_repository`)."""
    mlflow = _mlflow(params)
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return mlflow.create_experiment(
            name,
            artifact_location=Path(artifact_location(params)).as_uri(),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if _own_store(params) and not params.tracking.artifact_location:
        _follow_repository(exp, Path(artifact_location(params)))
    return exp.experiment_id


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if not parsed.scheme else None


def _follow_repository(exp: Any, expected: Path) -> None:
    """Keep the artifacts of the repository's own store inside the repository.

    MLflow fixes an experiment's artifact location when it creates it, as an absolute path. A
    repository copied with its ``mlflow.db`` (``cp -r``, a backup restored elsewhere) would therefore
    go on logging every artifact into the *original* repository's ``mlartifacts/``. When the
    experiment's location is another folder named ``mlartifacts``, the store moved: the experiment
    is pointed at this repository's ``mlartifacts/`` (new runs log there), and each earlier run whose
    artifacts were copied along is pointed at its copy (runs whose artifacts were not copied keep
    pointing where their files are). Any other location was chosen by someone (an earlier
    ``tracking.artifact_location``): the stage then stops and says where it would log and how to
    choose.
    """
    old = _local_path(exp.artifact_location)
    if old is not None and old.resolve() == expected.resolve():
        return
    store = store_root() / "mlflow.db"  # the repository's own store (see the caller)
    if old is None or old.name != "mlartifacts":
        raise TrackingError(
            f"MLflow experiment '{exp.name}' keeps its artifacts in {exp.artifact_location}, not in this "
            f"repository's {expected}: set tracking.artifact_location to {exp.artifact_location} to keep "
            "logging there, or set tracking.experiment to a new name to start an experiment in this repository"
        )
    new_uri, old_uri = expected.resolve().as_uri(), exp.artifact_location.rstrip("/")
    with closing(sqlite3.connect(store)) as db, db:
        db.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new_uri, int(exp.experiment_id))
        )
        rows = db.execute(
            "SELECT run_uuid, artifact_uri FROM runs WHERE experiment_id = ?", (int(exp.experiment_id),)
        ).fetchall()
        moved = [
            (new_uri + uri[len(old_uri) :], run)
            for run, uri in rows
            if uri.startswith(old_uri + "/") and (expected / uri[len(old_uri) + 1 :]).is_dir()
        ]
        db.executemany("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", moved)
    print(
        f"[tracking] mlflow.db was copied from another repository: experiment '{exp.name}' now keeps its "
        f"artifacts in {expected} (was {old}; {len(moved)} earlier run(s) with copied artifacts moved along)",
        file=sys.stderr,
        flush=True,
    )


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
def stage_run(params: Params, stage: str, *, run_id: str | None = None, log_params: bool = True) -> Iterator[Any]:
    """Start (or resume, given ``run_id``) a run for ``stage``, named by :func:`run_name`; marks it
    FAILED if the block raises."""
    mlflow = _mlflow(params)
    exp = experiment_id(params)
    if run_id is not None:
        try:
            run = mlflow.start_run(run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - MlflowException for an unknown id
            raise TrackingError(f"cannot resume MLflow run {run_id} in {tracking_uri(params)}: {exc}") from None
    else:
        run = mlflow.start_run(experiment_id=exp, run_name=run_name(params, stage))
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


def log_kept_metrics(path: Path, run_id: str) -> int:
    """Send the metric points a training process kept in ``path`` (one JSON object a line: ``step``,
    ``timestamp`` in ms, ``metrics``) while the server was away, into run ``run_id``; returns how many.

    The file is removed only once every point has been sent, so a server that fails again keeps them."""
    from mlflow.entities import Metric

    points = [
        Metric(key, float(value), int(row["timestamp"]), int(row["step"]))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
        for row in [json.loads(line)]
        for key, value in row["metrics"].items()
    ]
    client = mlflow.MlflowClient()
    for i in range(0, len(points), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=points[i : i + 1000])
    path.unlink()
    return len(points)
