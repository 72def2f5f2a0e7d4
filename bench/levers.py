"""What each design lever of the embedded default buys in detection quality (issue 7).

Every variant is the embedded default with a few ``params.yaml`` keys changed. Each runs in its
own fresh copy of the project (tracked files only, own DVC cache pulled from the in-repo remote,
own MLflow store) through the real pipeline, ``dvc repro evaluate`` (preprocess -> build_base ->
train -> evaluate), so a lever that touches the data or the model rebuilds exactly what it must.
Results (``reports/metrics/eval.json`` + ``train.json`` of the copy, and the wall time) are
appended as JSON lines to ``--out`` and printed as a Markdown table.

Runs may go in parallel (``--jobs``); each then gets ``--threads`` torch threads so they do not
oversubscribe the cores. Wall times of parallel runs are not comparable with a quiet machine's;
the quality figures are (same seeds, same data). A variant copies the working tree when it starts, so
editing ``params.yaml`` while a queue runs changes the variants that have not started yet; the copies run
this checkout's ``src/`` through the venv's editable install, so editing ``src/`` reaches running ones too.

    .venv/bin/python bench/levers.py --jobs 2 --threads 1 default ce_baseline steps_3000 lr_3e-3
    .venv/bin/python bench/levers.py --jobs 2 --threads 1 --reuse-base coord_x2 soft_ce_0.5  # train-only levers
    .venv/bin/python bench/levers.py --table bench/levers.jsonl

``--reuse-base`` skips preprocess and build_base (about half the default's time) for variants whose params
for them match those of ``--base-from PROJECT`` (default: this checkout; an earlier variant's folder serves too), by
starting from its up-to-date outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coordexp.core.config import override_params_file
from coordexp.pipeline.workspace import copy_project

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "ce_baseline": {"train.coord_soft_ce_w1.enabled": False},
    "coord_weights_0.25": {
        "train.coord_soft_ce_w1.soft_ce_weight": 0.25,
        "train.coord_soft_ce_w1.w1_weight": 0.25,
        "train.coord_soft_ce_w1.gate_weight": 0.25,
    },
    "steps_750": {"train.max_steps": 750},
    "steps_3000": {"train.max_steps": 3000},
    "steps_6000": {"train.max_steps": 6000},
    "steps_3600": {"train.max_steps": 3600},
    "batch_4": {"train.per_device_train_batch_size": 4},
    "lr_3e-3": {"train.learning_rate": 3e-3},
    "lr_3e-4": {"train.learning_rate": 3e-4},
    "vision_128": {"build_base.tiny.vision_hidden_size": 128},
    "vision_depth_4": {"build_base.tiny.vision_depth": 4},
    "text_256": {"build_base.tiny.hidden_size": 256, "build_base.tiny.intermediate_size": 768},
    "patch_8": {"build_base.tiny.patch_size": 8},
    "image_64_patch_8": {"preprocess.max_side": 64, "build_base.tiny.patch_size": 8},
    "eval_all": {"evaluate.checkpoints": "all"},
    "warmup_1800": {"build_base.tiny.vision_warmup.steps": 1800},
    "warmup_2700": {"build_base.tiny.vision_warmup.steps": 2700},
    "steps_1200": {"train.max_steps": 1200},
    "steps_4000": {"train.max_steps": 4000},
    "coord_x2": {
        "train.coord_soft_ce_w1.soft_ce_weight": 0.2,
        "train.coord_soft_ce_w1.w1_weight": 2.0,
        "train.coord_soft_ce_w1.gate_weight": 0.2,
    },
    "soft_ce_0.5": {"train.coord_soft_ce_w1.soft_ce_weight": 0.5},
    "lr_2e-3": {"train.learning_rate": 2e-3},
    "grammar_off": {"build_base.tiny.grammar_tokens": False},
    "coord_ordinal": {"build_base.tiny.coord_init": "ordinal"},
    "vit_lr_1e-4": {"train.vit_lr": 1e-4},
    "vit_lr_0": {"train.vit_lr": 0.0},
    "lr_5e-4": {"train.learning_rate": 5e-4},
    "train_seed_1": {"train.seed": 1},
    "gate_1": {"train.coord_soft_ce_w1.gate_weight": 1.0},
    "gate_0.5": {"train.coord_soft_ce_w1.gate_weight": 0.5},
    "ddp_2": {"train.nproc_per_node": 2, "train.per_device_train_batch_size": 4},  # same global batch of 8
    "lora": {"train.tuner": "lora"},
    "freeze_vit": {"train.freeze.vit": True},
    "text_gate_0.5": {"train.coord_soft_ce_w1.text_gate_weight": 0.5},
    "coord_ce_0.2": {"train.coord_soft_ce_w1.coord_ce_weight": 0.2},
}
"""name -> dotted params.yaml keys to change. Names join with ``+`` (``coord_weights_0.25+steps_3000``)."""


def changes_of(name: str) -> dict[str, object]:
    """The merged changes of a ``+``-joined variant name (later parts win on a shared key)."""
    merged: dict[str, object] = {}
    for part in name.split("+"):
        merged.update(VARIANTS[part])
    return merged


EVAL_LINE = re.compile(r"\[evaluate\] checkpoint-(\d+): bbox_mAP=([\d.]+) mAP50=([\d.]+)")
SPEED_LINE = re.compile(r"\[evaluate\] .*\(([\d.]+) img/s\)")
"""The evaluation speed: printed (and logged to MLflow), not in eval.json, which DVC hashes."""
KEYS = ("bbox_mAP50", "bbox_mAP", "parse_rate", "f1_at_0.5", "f1_at_0.3")


UPSTREAM = ("preprocess", "build_base")
"""Stages whose outputs ``--reuse-base`` copies when a variant's params for the stage match the source's."""


def stage_outputs(project: Path, stage: str) -> list[str]:
    """Every output ``dvc.yaml`` declares for ``stage`` (``outs``, ``metrics``, ``plots``), so a new output is
    copied without being listed here too."""
    import yaml

    spec = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    return [
        o if isinstance(o, str) else next(iter(o)) for key in ("outs", "metrics", "plots") for o in spec.get(key, [])
    ]


def _stage_params(project: Path) -> dict[str, object]:
    import yaml

    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    return {k: raw.get(k) for k in ("seed", *UPSTREAM)}


def reuse_upstream(dest: Path, source: Path) -> list[str]:
    """Copy ``source``'s preprocess and base outputs into ``dest`` so ``dvc repro`` skips those stages.

    A stage is copied only while its ``params.yaml`` section (and ``seed``, which feeds all of them)
    is the same in both projects; ``main`` refuses a source whose ``dvc status`` is not clean up to
    build_base, so the copies are exactly what its ``dvc.lock`` records; ``dvc commit`` then puts them
    in the copy's own cache (DVC reruns a stage whose outputs are not cached).
    """
    mine, theirs = _stage_params(dest), _stage_params(source)
    if mine["seed"] != theirs["seed"]:
        return []
    copied = []
    for stage in UPSTREAM:
        if mine[stage] != theirs[stage]:
            break  # a later stage depends on this one's outputs
        for out in stage_outputs(source, stage):
            src, dst = source / out, dest / out
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        copied.append(stage)
    return copied


def run_variant(name: str, work: Path, threads: int | None, reuse_from: Path | None = None) -> dict[str, object]:
    dest = work / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copy_project(ROOT, dest, exclude=("tests", "bench", "reports"))
    override_params_file(dest / "params.yaml", changes_of(name))
    reused = reuse_upstream(dest, reuse_from) if reuse_from else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COORDEXP_", "DVC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log = (dest / "lever.log").open("w")
    t0 = time.time()
    commit = [["dvc", "commit", "-f", "-q", *reused]] if reused else []
    for cmd in (["dvc", "pull", "-q", "data.dvc"], *commit, ["dvc", "repro", "evaluate"]):
        res = subprocess.run(cmd, cwd=dest, env=env, stdout=log, stderr=subprocess.STDOUT)
        if res.returncode:
            return {
                "variant": name,
                "changes": changes_of(name),
                "error": f"{' '.join(cmd)} failed; see {dest}/lever.log",
            }
    wall = time.time() - t0
    ev = json.loads((dest / "reports/metrics/eval.json").read_text())
    tr = json.loads((dest / "reports/metrics/train.json").read_text())
    # with evaluate.checkpoints=all the stage prints one line per checkpoint: keep mAP50 against step
    by_step = {
        int(m[1]): {"bbox_mAP": float(m[2]), "bbox_mAP50": float(m[3])}
        for m in EVAL_LINE.finditer((dest / "lever.log").read_text())
    }
    speeds = SPEED_LINE.findall((dest / "lever.log").read_text())
    return {
        "variant": name,
        "changes": changes_of(name),
        "wall_s": round(wall, 1),
        "threads": threads,
        **({"reused": reused} if reused else {}),
        **{k: ev.get(k) for k in KEYS},
        "images_per_second": float(speeds[-1]) if speeds else None,
        "train": tr,
        **({"by_step": by_step} if len(by_step) > 1 else {}),
    }


def table(rows: list[dict[str, object]]) -> str:
    out = [
        "| variant | changes | steps | eval W1 | eval softCE | token_acc | parse_rate | bbox_mAP50 | bbox_mAP | "
        "f1_at_0.5 | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['changes']} | error: {r['error']} |||||||||")
            continue
        tr = r["train"]
        ch = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["changes"].items()) or "-"

        def f(v: object, nd: int = 3) -> str:
            return "-" if v is None else f"{float(v):.{nd}f}"

        out.append(
            f"| {r['variant']} | {ch} | {tr.get('steps', '-')} | {f(tr.get('final_eval_w1'))} | "
            f"{f(tr.get('final_eval_soft_ce'), 2)} | {f(tr.get('final_eval_token_acc'))} | {f(r['parse_rate'])} | "
            f"{f(r['bbox_mAP50'], 4)} | {f(r['bbox_mAP'], 4)} | {f(r['f1_at_0.5'])} | {float(r['wall_s']) / 60:.1f} min |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"names joined by + from {', '.join(VARIANTS)}")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/coordexp-levers"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "levers.jsonl")
    ap.add_argument(
        "--reuse-base",
        action="store_true",
        help="copy the preprocess and base outputs of --base-from into variants whose params for those "
        "stages match it (run `dvc repro build_base` there first); wall_s then excludes them",
    )
    ap.add_argument(
        "--base-from",
        type=Path,
        default=ROOT,
        metavar="PROJECT",
        help="the project --reuse-base copies from (default: this checkout; an earlier variant's folder serves too)",
    )
    ap.add_argument("--table", type=Path, default=None, help="only print the table of an existing results file")
    a = ap.parse_args()
    if a.table:
        print(table([json.loads(line) for line in a.table.read_text().splitlines() if line.strip()]))
        return
    unknown = [v for v in a.variants if any(p not in VARIANTS for p in v.split("+"))]
    if unknown or not a.variants:
        sys.exit(f"error: unknown or no variants {unknown}; choose from {', '.join(VARIANTS)}")
    if a.reuse_base:
        stale = subprocess.run([str(VENV_BIN / "dvc"), "status", "--with-deps", "-q", "build_base"], cwd=a.base_from)
        if stale.returncode:
            sys.exit(
                f"error: --reuse-base needs {a.base_from}'s preprocess and build_base outputs up to date; "
                "run `dvc repro build_base` there first (`dvc status build_base` lists what changed)"
            )
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for row in pool.map(
            lambda v: run_variant(v, a.work, a.threads, a.base_from if a.reuse_base else None), a.variants
        ):
            rows.append(row)
            with a.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(
                json.dumps({k: row.get(k) for k in ("variant", "bbox_mAP50", "parse_rate", "wall_s", "error")}),
                flush=True,
            )
    print(table(rows))


if __name__ == "__main__":
    main()
