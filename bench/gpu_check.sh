#!/usr/bin/env bash
# The GPU check: the GPU path of the pipeline end to end on one CUDA GPU, within about 8 minutes.
#
#   bench/gpu_check.sh [--out DIR] [--wheelhouse DIR] [--python PY] [--budget SECONDS]
#
# Every step has its own timeout, cut to what is left of --budget (default 480 s: the 8 minutes); a step past the
# budget is skipped and recorded so.
#
# 1. installs what the GPU path needs and CI does not: deepspeed, liger-kernel, flash-attn (from --wheelhouse
#    when given, the machine may be offline; flash-attn only where a wheel exists). A package that does not
#    install is recorded, and the run falls back: no flash-attn -> packing off and sdpa attention; no
#    deepspeed -> no DeepSpeed; no liger-kernel -> its timing row is skipped;
# 2. times the fused Stage-1 loss against Liger's fused linear cross-entropy and torch's cross-entropy on
#    materialised logits at N = 8192, V = 151936, D = 2048, fwd + bwd, bf16 (bench/gpu_loss_timing.py);
# 3. builds the rehearsal checkpoint at full depth (Qwen3-VL-2B's widths, random weights, the real vocabulary):
#    `coordexp rehearsal-checkpoint --arch qwen3_vl --out DIR --layers 28 --vision-depth 24`;
# 4. runs preprocess -> build_base (expand, on that checkpoint) -> train (20 steps, bfloat16, deepspeed zero2,
#    packing, fused loss, one process) -> evaluate (32 val images, batch 32) on a copy of this repository
#    (this working tree and its MLflow store are left alone).
#
# It writes one results file, DIR/gpu_check.json (DIR: --out, else $OUT, else bench/gpu_check_out), with every
# step's status, seconds and log file, the fallbacks taken, the train/eval figures and the loss timing, and prints
# a summary. Exit status: 0 when every step passed, 1 when one failed (the file says which), 2 on bad usage.
# Record its figures in bench/RESULTS.md (## gpu_check).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$HERE/bench/gpu_check_out}"
WHEELHOUSE=""
PY="${PYTHON:-}"
BUDGET_S=480
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --budget) BUDGET_S="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] || { echo "error: --budget $BUDGET_S: a whole number of seconds" >&2; exit 2; }
if [[ -z "$PY" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PY="$HERE/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
BIN="$(dirname "$PY")"
export PATH="$BIN:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

FALLBACKS=()
FAILED=0
T_START=$(date +%s)

say() { echo "[gpu_check $(($(date +%s) - T_START))s] $*"; }

# step NAME TIMEOUT_S CMD...: runs CMD under a timeout, its output in OUT_DIR/NAME.log, one line in steps.jsonl
step() {
  local name="$1" limit="$2"; shift 2
  local log="$OUT_DIR/$name.log" t0 rc status left
  left=$((BUDGET_S - ($(date +%s) - T_START)))
  if ((left < 10)); then
    say "$name: skipped, the ${BUDGET_S}s budget is spent"
    printf '{"step": "%s", "status": "skipped", "rc": -1, "seconds": 0, "log": null}\n' "$name" >> "$STEPS"
    return 1
  fi
  if ((limit > left)); then limit=$left; fi
  say "$name (at most ${limit}s): $*"
  t0=$(date +%s)
  set +e
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  set -e
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "log": "%s"}\n' \
    "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$log" >> "$STEPS"
  if [[ "$status" != ok ]]; then
    say "$name: $status (exit $rc); the last lines of $log:"
    tail -n 15 "$log" | sed 's/^/    /'
    return 1
  fi
}

have() { "$PY" -c "import $1" > /dev/null 2>&1; }

# --- 0. the machine ----------------------------------------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: $PY cannot import torch or torch sees no CUDA GPU; this check needs one (--python PY picks the interpreter; the CPU path is what the tests cover)" >&2
  exit 2
fi
if ! "$PY" -m coordexp.cli rehearsal-checkpoint --help > /dev/null 2>&1; then
  echo "error: \`coordexp rehearsal-checkpoint\` is missing from this checkout (issue 22 item 1); update it first" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/coordexp-gpu-check.XXXXXX")"
STEPS="$OUT_DIR/steps.jsonl"
: > "$STEPS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT_DIR/gpu.txt" 2>&1 || true
say "GPU: $(cat "$OUT_DIR/gpu.txt")"

# --- 1. what the GPU path needs --------------------------------------------------------------------------------
PIP=("$PY" -m pip install --disable-pip-version-check --quiet)
if [[ -n "$WHEELHOUSE" ]]; then PIP+=(--no-index --find-links "$WHEELHOUSE"); fi
for pkg in deepspeed liger-kernel; do
  mod="${pkg//-/_}"
  if have "$mod"; then continue; fi
  step "install_$mod" 150 "${PIP[@]}" "$pkg" || FALLBACKS+=("$pkg: not installed (see install_$mod.log)")
done
if ! have flash_attn; then  # a wheel or nothing: no source build (it takes an hour)
  step install_flash_attn 90 "${PIP[@]}" --only-binary=:all: flash-attn \
    || FALLBACKS+=("flash-attn: no wheel for this machine; packing off, sdpa attention")
fi
PACKING=true DEEPSPEED=zero2
if ! have flash_attn; then PACKING=false; fi
if ! have deepspeed; then DEEPSPEED=null; FALLBACKS+=("deepspeed: missing; trained without DeepSpeed"); fi

# --- 2. the loss timing (first: the cheapest figures) ---------------------------------------------------------
step loss_timing 180 "$PY" "$HERE/bench/gpu_loss_timing.py" --device cuda --dtype bfloat16 \
  --n 8192 --vocab 151936 --dim 2048 --out "$OUT_DIR/loss_timing.json" || FAILED=1

# --- 3. the rehearsal checkpoint at full depth -----------------------------------------------------------------
CKPT="$WORK/qwen3_vl_rehearsal"
step rehearsal_checkpoint 240 "$PY" -m coordexp.cli rehearsal-checkpoint --arch qwen3_vl --out "$CKPT" \
  --layers 28 --vision-depth 24 || FAILED=1

# --- 4. the pipeline on a copy of the repository ---------------------------------------------------------------
REPO="$WORK/repo"
if [[ "$FAILED" == 0 ]]; then
  "$PY" - "$HERE" "$REPO" "$CKPT" "$PACKING" "$DEEPSPEED" <<'EOF'
import sys
from pathlib import Path

from coordexp.core.config import override_params_file, load_params
from coordexp.pipeline.workspace import copy_project

here, repo, ckpt, packing, deepspeed = sys.argv[1:]
copy_project(Path(here), Path(repo))
override_params_file(
    Path(repo) / "params.yaml",
    {
        "build_base.mode": "expand",
        "build_base.expand.source": ckpt,
        "train.max_steps": 20,
        "train.dtype": "bfloat16",
        "train.deepspeed": None if deepspeed == "null" else deepspeed,
        "train.packing": packing == "true",
        "train.fused_loss": True,
        "train.nproc_per_node": 1,
        "train.per_device_train_batch_size": 4,
        "train.learning_rate": 2.0e-5,
        "train.logging_steps": 5,
        "train.eval_steps": 20,
        "train.save_steps": 20,
        "train.eval_samples": 32,
        "evaluate.limit": 32,
        "evaluate.batch_size": 32,
        "evaluate.max_new_tokens": 256,
    },
)
load_params(Path(repo) / "params.yaml")  # the overrides validate before any stage runs
EOF
  (cd "$REPO" && dvc pull --quiet data.dvc) > "$OUT_DIR/data.log" 2>&1 || {
    say "dvc pull data.dvc failed (see data.log)"; FAILED=1; }
fi
for stage_and_limit in preprocess:90 build_base:180 train:360 evaluate:240; do
  [[ "$FAILED" == 0 ]] || break
  name="${stage_and_limit%%:*}"
  step "$name" "${stage_and_limit##*:}" bash -c "cd '$REPO' && '$PY' stages/$name.py" || FAILED=1
done

# --- the results file -------------------------------------------------------------------------------------------
"$PY" - "$OUT_DIR" "$REPO" "$FAILED" "$(($(date +%s) - T_START))" "${FALLBACKS[@]+"${FALLBACKS[@]}"}" <<'EOF'
import json
import sys
from pathlib import Path

out, repo, failed, seconds, *fallbacks = sys.argv[1:]
out, repo = Path(out), Path(repo)


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


swift_log = repo / "artifacts" / "train" / "swift" / "logging.jsonl"
train_rows = [json.loads(line) for line in swift_log.read_text().splitlines()] if swift_log.is_file() else []
train_rows = [r for r in train_rows if "loss" in r]
result = {
    "ok": failed == "0",
    "total_seconds": int(seconds),
    "gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else None,
    "fallbacks": fallbacks,
    "params": load(repo / "artifacts" / "train" / "resolved_params.json"),
    "steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()],
    "train": load(repo / "reports" / "metrics" / "train.json"),
    "train_last_log": train_rows[-1] if train_rows else None,  # memory(GiB), train_speed(s/it) of ms-swift
    "evaluate": load(repo / "reports" / "metrics" / "eval.json"),
    "loss_timing": load(out / "loss_timing.json"),
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"\n[gpu_check] {'PASSED' if result['ok'] else 'FAILED'} in {seconds}s; results: {out / 'gpu_check.json'}")
for s in result["steps"]:
    print(f"  {s['step']:22s} {s['status']:8s} {s['seconds']:5d}s")
for f in fallbacks:
    print(f"  fallback: {f}")
last = result["train_last_log"] or {}
print(f"  train: peak memory {last.get('memory(GiB)')} GiB, {last.get('train_speed(s/it)')} s/it, loss {last.get('loss')}")
ev = result["evaluate"] or {}
print(f"  evaluate: bbox_mAP {ev.get('bbox_mAP')}")
for name, r in ((result["loss_timing"] or {}).get("paths") or {}).items():
    figures = f"{r['ms_median']} ms, peak {r['peak_mem_gib']} GiB" if r["status"] == "ok" else r.get("reason")
    print(f"  loss {name:15s} {r['status']:8s} {figures}")
EOF
say "work folder (checkpoint, repository copy): $WORK"
exit "$FAILED"
