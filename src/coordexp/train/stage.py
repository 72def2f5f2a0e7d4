"""The ``train`` stage: ``params.yaml`` -> ms-swift ``sft`` -> checkpoint, metrics, MLflow run.

Training runs through ms-swift's own command line (``swift sft``), which is also what scales
out: with ``train.nproc_per_node > 1`` it launches torchrun itself, and ``train.deepspeed``
selects a ZeRO stage. Across machines every node runs this stage with the same params
(``train.nnodes``, ``master_addr``, ``master_port``; ``node_rank`` or ``NODE_RANK`` per node, see
:func:`launch_settings`); node 0 writes the outputs and the MLflow run, the other nodes only train.
The project's template, trainer and loss reach it through ``--external_plugins``
(:mod:`coordexp.train.swift_plugin`), configured by a JSON file named in ``COORDEXP_TRAIN_CONFIG``.

``train.tuner`` picks full training (``train.freeze`` leaves parts as built) or LoRA adapters; with LoRA the
stage merges the last checkpoint's adapters and coord rows into the base (:mod:`coordexp.train.merge`), so
``artifacts/train/final`` is a standalone checkpoint either way.

MLflow: the stage creates the run (tags, params, dataset inputs, the launcher's arguments as
``config/swift_args.json``), hands its id to the trainer's MLflow callback through the environment
of :func:`coordexp.pipeline.tracking.trainer_env` (metrics only, under the same run name), and,
after training, reopens the same run to log the artifacts and the summary. The run id is written to ``<out_dir>/mlflow_run_id`` so that ``evaluate`` and
``report`` add to the same run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from coordexp.core import paths
from coordexp.core.checkpoint import (
    FINAL_DIR,
    RUN_ID_FILE,
    SUPPORTED_MODEL_TYPES,
    SWIFT_DIR,
    last_checkpoint,
    model_type,
    refuse_remote_code,
    weights_digest,
)
from coordexp.core.config import Params
from coordexp.core.contract import read_jsonl
from coordexp.core.errors import MissingInputError, StageError, UserError
from coordexp.core.io import atomic_open, write_json, write_jsonl
from coordexp.core.template import build_messages
from coordexp.pipeline import tracking
from coordexp.train.merge import merge_lora
from coordexp.train.swift_config import KEPT_METRICS_FILE, TRACKING_OUTAGE_FILE, TRAINABLE_FILE
from coordexp.train.swift_plugin import LOSS_NAME, PLUGIN_FILE


class TrainingError(StageError):
    """Training could not start or did not finish; the message says why and what to do."""


class TrackingOutage(TrainingError):
    """The tracking server stayed away past ``tracking.outage_limit_s``: training saved a checkpoint and stopped."""


class HardwareError(UserError, ValueError):
    """A ``train`` setting this machine cannot run (packing, DeepSpeed or bf16 without a GPU, ...)."""


class LaunchError(UserError, ValueError):
    """Launch settings (``train.nnodes``, ``node_rank``, ``master_addr``, ``master_port``, ``nproc_per_node`` and
    the environment variables ms-swift reads for them) that cannot start a run; the message names the keys."""


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TORCHRUN_PORT = 29500
"""torchrun's own default ``--master_port``: what every node of a multi-node run agrees on when no port is set
(a free port picked on one machine would be unknown to the others)."""

LAUNCH_ENV = {"nnodes": "NNODES", "node_rank": "NODE_RANK", "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}
"""The ``train`` keys and the environment variables ms-swift's launcher (``swift/cli/main.py``) turns into
torchrun's arguments. A variable fills in its key where ``params.yaml`` leaves the schema's default, so one
``params.yaml`` serves every node (``NODE_RANK`` per node); a key set in both to different values is refused."""


@dataclass(frozen=True)
class Launch:
    """Where this node's training processes sit in the run: what ms-swift's torchrun launcher is given."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str | None
    master_port: int | None
    deepspeed: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def torchrun(self) -> bool:
        """Whether ms-swift starts torchrun: several processes, or DeepSpeed, which initialises a process group
        even for one process and needs the rank and rendezvous variables torchrun sets."""
        return self.world_size > 1 or self.deepspeed

    @property
    def is_main(self) -> bool:
        """Node 0 holds the world's rank 0, the only rank that saves checkpoints and logs (HF and ms-swift
        alike), so only its stage writes the pipeline's outputs and the MLflow run."""
        return self.node_rank == 0

    def env(self) -> dict[str, str]:
        """The launcher's variables: all five under torchrun, none for one plain process (a stray ``NNODES``
        would otherwise make ms-swift start torchrun for it)."""
        if not self.torchrun:
            return {}
        out = {"NPROC_PER_NODE": str(self.nproc_per_node), "NNODES": str(self.nnodes), "NODE_RANK": str(self.node_rank)}
        if self.master_addr is not None:
            out["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        return out


def _env_value(var: str, raw: str, kind: type) -> Any:
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise LaunchError(f"{var}={raw!r} in the environment is not a whole number; fix or unset it") from None
    return raw


def launch_settings(params: Params, environ: Mapping[str, str]) -> Launch:
    """The resolved launch of this node: ``params.train``'s launch keys, filled in from ``environ``, checked.

    Why the environment takes part: cluster schedulers and the usual ``torchrun`` recipes hand each node its rank
    in ``NODE_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); ms-swift's launcher reads the same variables. Taking
    them where ``params.yaml`` is silent lets every node share one ``params.yaml`` and one DVC stage definition;
    refusing a disagreement keeps a stale exported variable from silently moving a node."""
    t = params.train
    fields = type(t).model_fields
    values: dict[str, Any] = {}
    for key, var in LAUNCH_ENV.items():
        mine, default = getattr(t, key), fields[key].default
        raw = environ.get(var)
        if raw is None or raw == "":
            values[key] = mine
            continue
        theirs = _env_value(var, raw, str if key == "master_addr" else int)
        if mine == default or mine == theirs:
            values[key] = theirs
        else:
            raise LaunchError(
                f"train.{key}: {mine} in params.yaml and {var}={raw} in the environment disagree: unset {var}, "
                f"or set train.{key} to {theirs} (or back to its default {default} so that {var} applies)"
            )
    raw = environ.get("NPROC_PER_NODE")
    if raw and _env_value("NPROC_PER_NODE", raw, int) != t.nproc_per_node:
        raise LaunchError(
            f"train.nproc_per_node: {t.nproc_per_node} in params.yaml and NPROC_PER_NODE={raw} in the environment "
            f"disagree: ms-swift would start NPROC_PER_NODE processes; unset it or set train.nproc_per_node: {raw}"
        )
    nnodes, rank = values["nnodes"], values["node_rank"]
    if nnodes < 1:
        raise LaunchError(f"NNODES={nnodes}: a run has at least one node; fix or unset NNODES")
    if not 0 <= rank < nnodes:
        raise LaunchError(
            f"train.node_rank (or NODE_RANK) {rank} is not a node of train.nnodes (or NNODES) {nnodes}: "
            f"give each node its rank 0 .. {nnodes - 1}, 0 on the node at train.master_addr"
        )
    port = values["master_port"]
    if port is not None and not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={port}: not a TCP port (1 .. 65535); fix or unset it")
    if nnodes > 1:
        if not values["master_addr"]:
            raise LaunchError(
                f"train.nnodes: {nnodes} needs the address of node 0 that every node reaches: set "
                "train.master_addr (or MASTER_ADDR on every node)"
            )
        if port is None:
            port = TORCHRUN_PORT
    elif (t.nproc_per_node > 1 or t.deepspeed) and port is None:
        port = _free_port()  # two runs side by side on one machine must not collide
    return Launch(t.nproc_per_node, nnodes, rank, values["master_addr"], port, deepspeed=t.deepspeed is not None)


def rank_threads(params: Params) -> int | None:
    """Torch threads per training process for CPU data parallel (``nproc_per_node > 1`` without a
    GPU): the cores split evenly. Why: a tiny model's matrices are too small for several threads to
    share one product well, so N processes of ``cores / N`` threads each step faster than one
    process of ``cores`` threads (bench/RESULTS.md, ``## embedded_default``). None: leave it to torch."""
    t = params.train
    if t.nproc_per_node <= 1 or _cuda_available():
        return None
    return max(1, _cpu_count() // t.nproc_per_node)


def check_hardware(params: Params) -> None:
    t = params.train
    if t.packing and not _cuda_available():
        raise HardwareError(
            "train.packing: ms-swift packing needs flash-attention, which needs a CUDA GPU; this machine has "
            "none. Set train.packing: false to train on the CPU."
        )
    if t.deepspeed and not _cuda_available():
        raise HardwareError(f"train.deepspeed: {t.deepspeed} needs CUDA GPUs; set train.deepspeed: null on the CPU")
    if t.nproc_per_node > 1 and not _cuda_available() and t.nproc_per_node > _cpu_count():
        raise HardwareError(
            f"train.nproc_per_node: {t.nproc_per_node} CPU processes on a machine with {_cpu_count()} cores; "
            f"set it to at most {_cpu_count()} (one process per core is the fastest CPU layout)"
        )
    if t.dtype != "float32" and not _cuda_available():
        raise HardwareError(f"train.dtype: {t.dtype} training needs a GPU here; use float32 on the CPU")


def swift_rows(jsonl: Path, out: Path, limit: int | None = None) -> int:
    """Contract records -> ms-swift conversation rows, through THE template builder."""
    records = read_jsonl(jsonl)[:limit]
    return write_jsonl(out, (build_messages(r, jsonl.parent, with_answer=True) for r in records))


def swift_cli_args(
    params: Params,
    base: Path,
    train_rows: Path,
    val_rows: Path,
    out: Path,
    root: Path | None = None,
    launch: Launch | None = None,
) -> list[str]:
    t = params.train
    launch = launch or launch_settings(params, {})
    mtype = model_type(base)
    refuse_remote_code(base, stage="training")
    args: dict[str, Any] = {
        "model": base,
        "model_type": mtype,
        "template": SUPPORTED_MODEL_TYPES[mtype].template,
        "external_plugins": PLUGIN_FILE,
        "loss_type": LOSS_NAME,
        "tuner_type": t.tuner,
        "torch_dtype": t.dtype,
        "freeze_vit": str(t.frozen.vit).lower(),
        "freeze_aligner": str(t.frozen.aligner).lower(),
        "freeze_llm": str(t.frozen.llm).lower(),
        "dataset": train_rows,
        "val_dataset": val_rows,
        "split_dataset_ratio": 0,
        "output_dir": out,
        "add_version": "false",
        "create_checkpoint_symlink": "false",
        "max_steps": t.max_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_ratio": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "logging_steps": t.logging_steps,
        "logging_first_step": "true",
        "eval_strategy": "steps",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "max_length": t.max_length,
        "truncation_strategy": "delete",
        "seed": t.seed,
        "data_seed": t.seed,
        "dataloader_num_workers": t.dataloader_num_workers,
        "dataset_num_proc": 1,
        "load_from_cache_file": "false",
        "report_to": "mlflow",
        "use_hf": "true",
        "check_model": "false",  # else ms-swift asks the ModelScope hub about the local model (retries offline)
        "attn_impl": "flash_attn" if t.packing else "sdpa",
        "run_name": tracking.run_name(params, "train"),  # HF's MLflow callback renames the run to this
    }
    if t.tuner == "lora":
        args.update(lora_rank=t.lora.rank, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout)
    if t.save_total_limit:
        args["save_total_limit"] = t.save_total_limit
    for key in ("vit_lr", "aligner_lr"):  # ms-swift then builds its multimodal optimizer (param groups)
        if getattr(t, key) is not None:
            args[key] = getattr(t, key)
    if t.fused_loss:
        # the trainer asks the model for one position of logits and the last hidden states
        # (CoordExpTrainer._prepare_inputs); swift's own trimming would cut the labels instead
        args["use_logits_to_keep"] = "false"
    if launch.world_size > 1 and not _cuda_available():
        # without both, transformers sees one process per rank: no gradient sync, every rank saves
        args["use_cpu"], args["ddp_backend"] = "true", "gloo"
    if t.packing:
        args["packing"] = "true"
    if t.deepspeed:
        args["deepspeed"] = t.deepspeed
    cli: list[str] = []
    for k, v in args.items():
        cli += [f"--{k}", str(v)]
        if k == "external_plugins":  # the user's plugins load after the project's
            cli += [str(paths.resolve(p, root)) for p in t.swift_plugins]
    if t.tuner == "lora":
        cli += ["--target_modules", *t.lora.target_modules]
    return cli


def _history(swift_out: Path) -> list[dict[str, Any]]:
    f = swift_out / "logging.jsonl"
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _num(v: Any) -> Any:
    """swift logs some values as strings like '12.3%'; keep only numbers."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    return None


TIMING_FIELDS = ("runtime", "_per_second", "train_speed", "memory")
"""Substrings of the logged fields that measure the machine, not the model (``train_speed(s/it)``,
``train_runtime``, ``eval_samples_per_second``, ``memory(GiB)``, ...)."""


def is_timing(name: str) -> bool:
    return any(t in name for t in TIMING_FIELDS)


def write_history_csv(rows: list[dict[str, Any]], path: Path) -> int:
    """One row per logging event (train or eval) with every numeric field as a column.

    Timings are left out (they stay in MLflow): DVC hashes this file, and the same params must give
    the same bytes on every rerun and every clone."""
    keep = [r for r in rows if "global_step/max_steps" in r or "loss" in r or "eval_loss" in r]
    cols: list[str] = ["step", "split"]
    out_rows = []
    for r in keep:
        step = r.get("global_step/max_steps", "")
        step = int(str(step).split("/")[0]) if step else r.get("step")
        split = "eval" if any(k.startswith("eval_") for k in r) else "train"
        flat = {"step": step, "split": split}
        for k, v in r.items():
            n = _num(v)
            if n is None or is_timing(k):
                continue
            name = k[5:] if split == "eval" and k.startswith("eval_") else k
            flat[name] = n
            if name not in cols:
                cols.append(name)
        out_rows.append(flat)
    with atomic_open(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in out_rows:
            w.writerow(r)
    return len(out_rows)


TRAINER_STATE = ("args.json", "trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*")
"""The files of a ``checkpoint-N`` folder that resume training but are not the model. ``final`` (the DVC
output) leaves them out: they hold absolute paths and timings, so they would differ on every run."""


def _link_model(src: Path, dst: Path) -> None:
    """Hard-link (same filesystem) or copy a checkpoint's model files, so ``final`` costs no extra space."""
    if dst.exists():
        shutil.rmtree(dst)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns(*TRAINER_STATE))


MODEL_ARGS = ("swift_version", "model_type", "template", "tuner_type", "task_type", "torch_dtype", "attn_impl")
"""What ms-swift reads back from a checkpoint's ``args.json`` to load it (``model_type`` above all: a Qwen3-VL
config matches several ms-swift model types); ``final/args.json`` keeps only these, none of them a path or a time."""


def _write_model_args(ckpt: Path, final: Path) -> None:
    src = ckpt / "args.json"
    if src.is_file():
        args = json.loads(src.read_text(encoding="utf-8"))
        kept = {k: args[k] for k in MODEL_ARGS if k in args}
        if "tuner_type" in kept:  # a LoRA run's final checkpoint is merged: a full model to whatever loads it
            kept["tuner_type"] = "full"
        write_json(final / "args.json", kept)


def summary(rows: list[dict[str, Any]], throughput: dict[str, Any]) -> dict[str, Any]:
    """The run's figures for ``reports/metrics/train.json``: a function of the params (no timings, see
    :func:`timings`)."""
    train = [r for r in rows if "loss" in r and _num(r.get("loss")) is not None]
    evals = [r for r in rows if "eval_loss" in r]
    out: dict[str, Any] = {
        "steps": throughput.get("global_step"),
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
    }
    for key in ("coord_softce_w1/coord_vocab_mass", "coord_softce_w1/soft_ce", "coord_softce_w1/w1", "token_acc"):
        if train and key in train[-1]:
            out[f"final_train_{key.split('/')[-1]}"] = train[-1][key]
        if evals and f"eval_{key}" in evals[-1]:
            out[f"final_eval_{key.split('/')[-1]}"] = evals[-1][f"eval_{key}"]
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def timings(throughput: dict[str, Any]) -> dict[str, float]:
    """Wall time and token throughput: logged to MLflow and printed, never written to a DVC output."""
    out = {
        "wall_time_s": round(throughput.get("wall_time_s", float("nan")), 2),
        "tokens_per_second": round(throughput.get("tokens_per_second", float("nan")), 2),
    }
    return {k: v for k, v in out.items() if math.isfinite(v)}


STATE_FILE = "state.json"


def training_fingerprint(params: Params) -> str:
    """Hash of everything that shapes the training run (not evaluate/report knobs)."""
    d = params.model_dump(mode="json")
    keep = {k: d[k] for k in ("seed", "preprocess", "build_base", "train")}
    for key in ("node_rank", "master_addr", "master_port"):  # where the processes meet, not what they train
        keep["train"].pop(key)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def resumable(out: Path, params: Params) -> tuple[str, Path] | None:
    """(run id, last checkpoint) of an interrupted run with the same params, else None.

    A run killed between checkpoints (SIGTERM, SIGKILL, a crash) leaves ``state.json`` saying
    ``running``; ``dvc repro`` then starts the stage again (its outputs are ``persist``-ed) and
    training continues from the last checkpoint in the same MLflow run, instead of starting over.
    """
    state_file = out / STATE_FILE
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return None
    ckpt = last_checkpoint(out / SWIFT_DIR, complete=True)  # the trainer rewrites a cut one when it gets there
    if state.get("status") != "running" or state.get("fingerprint") != training_fingerprint(params) or ckpt is None:
        return None
    return state["run_id"], ckpt


def _plugin_config(params: Params, base: Path, data_dir: Path) -> dict[str, Any]:
    t = params.train
    return {
        "coord_vocab": str(base / "coord_vocab.json"),
        "loss": t.coord_soft_ce_w1.model_dump(),
        "token_type_metrics": t.token_type_metrics.enabled,
        "fused_loss": t.fused_loss,
        "coord_diag": t.coord_diag,
        "coord_rows_only": t.coord_rows_only,
        "train_rows": str(data_dir / "train.jsonl"),
        "tracking_outage_limit_s": params.tracking.outage_limit_s,
    }


def swift_env(params: Params, launch: Launch, plugin_file: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of ``swift sft``: this process's, the plugin's config file, ``extra`` (MLflow on node 0),
    offline switches, and exactly the launcher variables of ``launch`` (inherited ones are dropped, then set)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", *LAUNCH_ENV.values())}
    env.update(
        {
            "COORDEXP_TRAIN_CONFIG": str(plugin_file),
            **extra,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            **launch.env(),
        }
    )
    threads = rank_threads(params)
    if threads and "OMP_NUM_THREADS" not in os.environ:  # a user's own setting wins
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_other_node(params: Params, root: Path, launch: Launch, pre_dir: Path, base: Path, out: Path) -> dict[str, Any]:
    """Train on a node other than 0: its processes join node 0's, and nothing of the pipeline is written here.

    Only the world's rank 0 (on node 0) saves checkpoints, ``logging.jsonl`` and MLflow metrics, so node 0's stage
    builds ``artifacts/train``, the reports and the MLflow run. This node reads its own ``artifacts/preprocess``
    and ``artifacts/base`` (the same params give the same files) and writes its training rows and plugin config
    to a temporary folder, so a shared ``artifacts/`` sees no second writer. ms-swift's ``--output_dir`` is node
    0's path: every rank saves its RNG state there and DeepSpeed its optimizer shards, which resuming needs on a
    shared filesystem."""
    t = params.train
    resume = resumable(out, params)  # node 0's state where artifacts/ is shared; read only
    with tempfile.TemporaryDirectory(prefix=f"coordexp-train-node{launch.node_rank}-") as tmp:
        data_dir = Path(tmp) / "data"
        n_train = swift_rows(pre_dir / "train.jsonl", data_dir / "train.jsonl")
        n_val = swift_rows(pre_dir / "val.jsonl", data_dir / "val.jsonl", t.eval_samples)
        plugin_file = Path(tmp) / "coordexp_plugin.json"
        write_json(plugin_file, _plugin_config(params, base, data_dir))
        cli = [
            "swift",
            "sft",
            *swift_cli_args(
                params, base, data_dir / "train.jsonl", data_dir / "val.jsonl", out / SWIFT_DIR, root, launch
            ),
        ]
        if resume is not None:
            cli += ["--resume_from_checkpoint", str(resume[1])]
        print(
            f"[train] node {launch.node_rank} of {launch.nnodes}: joining {launch.master_addr}:{launch.master_port}; "
            f"node 0 writes the outputs and the MLflow run; launching: {' '.join(cli)}",
            flush=True,
        )
        proc = subprocess.run(cli, env=swift_env(params, launch, plugin_file, {}), cwd=root)
    if proc.returncode != 0:
        raise TrainingError(
            f"ms-swift training failed on node {launch.node_rank} (exit {proc.returncode}): see its output above "
            f"and node 0's; check that {launch.master_addr}:{launch.master_port} is reachable from this node"
        )
    return {"node_rank": launch.node_rank, "nnodes": launch.nnodes, "train_samples": n_train, "val_samples": n_val}


def _outage(swift_out: Path, run_id: str) -> TrackingOutage:
    """The stop the trainer made when the tracking server stayed away (see :mod:`coordexp.train.outage`)."""
    note = json.loads((swift_out / TRACKING_OUTAGE_FILE).read_text())
    ckpt = last_checkpoint(swift_out, complete=True)
    return TrackingOutage(
        f"the MLflow tracking server at {note['uri']} did not answer for {note['limit_s']} s "
        f"(tracking.outage_limit_s) at step {note['step']} ({note['error']}). Training stopped and saved "
        f"{ckpt}; the metric points it could not send are kept in {swift_out / KEPT_METRICS_FILE}. Once the server "
        f"answers again, run `dvc repro train` (or `python stages/train.py`): training resumes from that checkpoint "
        f"into the same MLflow run {run_id} and sends the kept points first."
    )


def run(params: Params, root: Path | None = None) -> dict[str, Any]:
    """Train; on node 0 (or alone) build ``artifacts/train``, the train reports and the MLflow run, and return the
    summary; on another node only train (:func:`_run_other_node`) and return its place and sample counts."""
    root = root or paths.project_root()
    check_hardware(params)
    launch = launch_settings(params, os.environ)
    t = params.train
    pre_dir = paths.resolve(params.preprocess.out_dir, root)
    base = paths.resolve(params.build_base.out_dir, root)
    out = paths.resolve(t.out_dir, root)
    for f in (pre_dir / "train.jsonl", pre_dir / "val.jsonl"):
        if not f.is_file():
            raise MissingInputError(f"{f}: missing; run `dvc repro preprocess` first")
    if not (base / "coord_vocab.json").is_file():
        raise MissingInputError(f"{base}/coord_vocab.json: missing; run `dvc repro build_base` first")
    if not launch.is_main:
        return _run_other_node(params, root, launch, pre_dir, base, out)

    uri = tracking.tracking_uri(params)
    tracking.check_reachable(uri)  # fail before any work, not after the run
    for key, value in tracking.retry_env(params).items():  # this process waits for the server as long as training
        os.environ.setdefault(key, value)
    resume = resumable(out, params)
    if resume is None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    else:
        print(f"[train] resuming run {resume[0]} from {resume[1]}", flush=True)
    data_dir = out / "data"
    n_train = swift_rows(pre_dir / "train.jsonl", data_dir / "train.jsonl")
    n_val = swift_rows(pre_dir / "val.jsonl", data_dir / "val.jsonl", t.eval_samples)
    write_json(out / "coordexp_plugin.json", _plugin_config(params, base, data_dir))
    write_json(out / "resolved_params.json", params.model_dump(mode="json"))
    swift_out = out / SWIFT_DIR
    cli = [
        "swift",
        "sft",
        *swift_cli_args(params, base, data_dir / "train.jsonl", data_dir / "val.jsonl", swift_out, root, launch),
    ]

    if resume is not None:
        cli += ["--resume_from_checkpoint", str(resume[1])]
    with tracking.stage_run(params, "train", run_id=resume[0] if resume else None) as r:
        run_id = r.info.run_id
        (out / RUN_ID_FILE).write_text(run_id + "\n")
        write_json(
            out / STATE_FILE, {"fingerprint": training_fingerprint(params), "run_id": run_id, "status": "running"}
        )
        mlflow.set_tags(
            {
                "coordexp.loss": "stage1_softce_w1" if t.coord_soft_ce_w1.enabled else "ce_baseline",
                "coordexp.base_checkpoint": tracking.repo_relative(base, root),
            }
        )
        kept = swift_out / KEPT_METRICS_FILE
        if kept.is_file():  # points the trainer kept while the server was away: sent before training goes on
            print(f"[train] sending {tracking.log_kept_metrics(kept, run_id)} metric point(s) kept during the outage")
        (swift_out / TRACKING_OUTAGE_FILE).unlink(missing_ok=True)
        tracking.log_dataset(pre_dir / "train.jsonl", "training", records=n_train, root=root)
        tracking.log_dataset(pre_dir / "val.jsonl", "validation", records=n_val, root=root)
        mlflow.log_dict(tracking.repo_relative({"command": cli}, root), "config/swift_args.json")
        env = swift_env(params, launch, out / "coordexp_plugin.json", tracking.trainer_env(params, run_id))
        # the callback must not end our run: it resumes it and we finish it after the artifacts
        mlflow.end_run()  # detach in this process; reopened below
        print(f"[train] {n_train} train / {n_val} val samples; launching: {' '.join(cli)}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cli, env=env, cwd=root)
        wall = time.time() - t0
        if (swift_out / TRACKING_OUTAGE_FILE).is_file():  # the server is away: nothing here may call it
            raise _outage(swift_out, run_id)
        mlflow.start_run(run_id=run_id)
        resolved = swift_out / "args.json"  # every argument ms-swift and the HF trainer resolved
        if resolved.is_file():
            args = json.loads(resolved.read_text())
            mlflow.log_dict(tracking.repo_relative(args, root), "config/swift_resolved_args.json")
        if proc.returncode != 0:
            failure = swift_out / "coordexp_failure.txt"
            cause = failure.read_text().strip() if failure.is_file() else "see its output above"
            raise TrainingError(
                f"ms-swift training failed (exit {proc.returncode}): {cause} The MLflow run {run_id} "
                f"is marked FAILED; checkpoints saved so far are in {swift_out}"
            )
        rows = _history(swift_out)
        tp_file = swift_out / "coordexp_throughput.json"
        throughput = json.loads(tp_file.read_text()) if tp_file.is_file() else {"wall_time_s": wall}
        ckpt = last_checkpoint(swift_out)
        if ckpt is None:
            raise TrainingError(f"{swift_out}: training ended without a checkpoint")
        final = out / FINAL_DIR
        if t.tuner == "lora":  # a standalone checkpoint, so evaluate, predict and report load it like a full one
            print(f"[train] merging the LoRA adapters of {ckpt.name} into {final}", flush=True)
            merge_lora(base, ckpt, final, t.dtype)
        else:
            _link_model(ckpt, final)
        _write_model_args(ckpt, final)
        shutil.copy2(base / "coord_vocab.json", final / "coord_vocab.json")
        metrics = summary(rows, throughput)
        metrics["final_checkpoint"] = str(final.relative_to(root)) if final.is_relative_to(root) else str(final)
        metrics["train_samples"], metrics["val_samples"] = n_train, n_val
        trainable = swift_out / TRAINABLE_FILE
        if trainable.is_file():  # the trainer's count: what the optimizer moves (coord rows only where masked)
            metrics.update(json.loads(trainable.read_text()))
        write_json(paths.metrics_dir(root) / "train.json", metrics)
        hist = paths.resolve(params.report.out_dir, root) / "train_history.csv"
        write_history_csv(rows, hist)
        clock = timings(throughput)
        mlflow.log_metrics(
            {
                f"train_summary.{k}": float(v)
                for k, v in {**metrics, **clock}.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        mlflow.log_artifact(str(out / "resolved_params.json"), "config")
        mlflow.log_artifact(str(base / "coord_vocab.json"), "config")
        mlflow.log_artifact(str(hist), "history")
        if t.log_checkpoint == "full":
            mlflow.log_artifacts(str(final), "checkpoint")
        mlflow.set_tag("coordexp.final_checkpoint", tracking.repo_relative(final, root))
        mlflow.set_tag(tracking.WEIGHTS_DIGEST_TAG, weights_digest(final))
        write_json(out / STATE_FILE, {"fingerprint": training_fingerprint(params), "run_id": run_id, "status": "done"})
    return {**metrics, **clock}
