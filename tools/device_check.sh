#!/usr/bin/env bash
# The GPU checks that fit a lent machine (no network, one GPU, minutes): one command, each step
# printing its result lines as it finishes, so a run cut off by the time limit still reports.
#
#   bash tools/device_check.sh [--dry-run] [OUT_DIR]   # OUT_DIR default: $OUT, else runs/device_check
#   bash tools/device_check.sh --fill-wheels           # on a networked machine: fill .whl/ first
#
# What the lent machine has: torch + Triton (Python 3.12), a GPU, no network. Everything else
# travels in .whl/ (git-ignored), carried with the working tree (the device tool's carry=[".whl"];
# 64 MiB per call): --fill-wheels downloads, for CPython 3.12 on manylinux x86_64, megatron-core
# 0.16.1, liger-kernel (the peer in step 1) and the small runtime dependencies (pyyaml, psutil,
# numpy, tqdm, safetensors, einops, packaging; ~23 MB together). They are installed --no-index --no-deps;
# this package itself runs from the checkout (PYTHONPATH), not installed. transformer-engine's
# wheel (~276 MB) does not fit one carry: step 3 runs only where TE is already importable.
#
# Steps, in priority order (each under its own time limit; about 8 minutes in all):
#   1. benchmarks/kd_loss.py: the KD loss fwd+bwd at hidden 1,280, vocab 202,048, bf16 --
#      naive, GEMM floor, fused torch (default chunk), Triton, Liger's two JSD losses -- at 8,192
#      tokens, then the ones that fit at 131,072 (naive is skipped there by its memory estimate).
#   2. benchmarks/kd_step_gpu.py --allow-local-spec: a KD step of the paper-shape student with a
#      dense stand-in teacher on megatron-core's local spec (no TE), bf16, 8,192-token windows of
#      packed documents: tokens/s, MFU, ratio to the CE step.
#   3. only with TE: tests/gpu (THD with global positions, FP8) and benchmarks/kd_step_gpu.py (TE,
#      131,072-token windows).
# --dry-run: the same steps through the same code paths at toy size on the CPU (CI runs it:
# tests/e2e/test_device_check_dry_run.py); its numbers measure nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --fill-wheels)
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d .whl megatron-core==0.16.1 liger-kernel==0.8.5 numpy pyyaml psutil tqdm safetensors einops packaging \
      || exit 1
    du -sh .whl
    exit 0 ;;
  -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
  -*) echo "device_check.sh: unknown option $1 (expected --dry-run, --fill-wheels or an output folder)" >&2
      exit 2 ;;
esac
OUT="${1:-${OUT:-runs/device_check}}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then
  export MEGATRON_KD_FORCE_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

say() { echo "== device_check: $*"; }
step() {  # step NAME SECONDS CMD...: run under a time limit, tee its output, report its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  say "$name: start (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  local verdict=ok; [ "$rc" = 0 ] || verdict="FAILED (exit $rc$([ "$rc" = 124 ] && echo ', time limit'))"
  say "$name: $verdict after $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || status=1
}

# -- set-up: wheels from .whl/, then one line saying what this machine is ----------------------
if ls .whl/*.whl >/dev/null 2>&1 && [ $DRY = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl 2>&1 | tail -2
fi
if ! "$PY" -c "import megatron.core, yaml, psutil" 2>/dev/null; then
  echo "device_check.sh: $PY cannot import megatron.core / yaml / psutil; on a networked machine run" \
       "'bash tools/device_check.sh --fill-wheels' and carry .whl/ along" >&2
  exit 2
fi
"$PY" - <<'PYEOF' | tee "$OUT/machine.txt"
import importlib.util, os, torch
from megatron_kd import platform
print("== device_check: machine:", platform.device_name() if platform.cuda_available() else "CPU",
      "| torch", torch.__version__, "| triton", "yes" if importlib.util.find_spec("triton") else "no",
      "| transformer-engine", "yes" if platform.transformer_engine_available() else "no",
      "| liger", "yes" if importlib.util.find_spec("liger_kernel") else "no",
      "| spec", platform.layer_spec_kind())
if not platform.cuda_available() and os.environ.get("MEGATRON_KD_FORCE_CPU") != "1":
    raise SystemExit("device_check.sh: no CUDA device here; --dry-run runs the steps at toy size on the CPU")
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
status=0

# -- 1. the KD loss vs its peers -------------------------------------------------------------
if [ $DRY = 1 ]; then
  LOSS=(--device cpu --dtype float32 --vocab 2000 --hidden 64 --repeats 1)
  SHORT=96; LONG=384
else
  LOSS=(--device cuda --dtype bfloat16 --vocab 202048 --hidden 1280 --repeats 3)
  SHORT=8192; LONG=131072
fi
step kd_loss_short 180 "$PY" benchmarks/kd_loss.py "${LOSS[@]}" --tokens $SHORT \
  --variants naive,gemm,fused/auto,triton,liger/fused_linear_jsd,liger/chunked_jsd
step kd_loss_long 180 "$PY" benchmarks/kd_loss.py "${LOSS[@]}" --tokens $LONG \
  --variants naive,fused/auto,triton,liger/chunked_jsd

# -- 2. a KD step of the paper-shape student, no TE --------------------------------------------
if [ $DRY = 1 ]; then
  STEP=(--smoke --allow-local-spec)
else
  STEP=(--allow-local-spec --seq 8192 --doc-min 1024 --doc-max 3072 --steps 3 --warmup 1)
fi
step kd_step_local 200 "$PY" benchmarks/kd_step_gpu.py "${STEP[@]}" --modes kd_bf16,ce_bf16 \
  --json-out "$OUT/kd_step_local.json"

# -- 3. the TE path, where TE is importable ------------------------------------------------------
if "$PY" -c "from megatron_kd import platform; import sys; sys.exit(platform.layer_spec_kind() != 'te')"; then
  step tests_gpu 150 "$PY" -m pytest -q -x tests/gpu
  step kd_step_te 240 "$PY" benchmarks/kd_step_gpu.py --modes kd_bf16,ce_bf16,kd_fp8_delayed \
    --json-out "$OUT/kd_step_te.json"
else
  say "tests_gpu, kd_step_te: skipped (no transformer-engine on this machine: its wheel does not fit a carry)"
fi
say "done (exit $status); results in $OUT"
exit $status
