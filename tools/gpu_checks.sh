#!/usr/bin/env bash
# The H100 path's checks in one command (CUDA + transformer-engine needed; see docs/h100.md).
#   bash tools/gpu_checks.sh [out_dir]          (default: runs/gpu_checks)
# On a fresh machine it first runs `bash tools/install.sh gpu` (.venv with transformer-engine
# built from source; needs nvcc and a CUDA build of torch). PYTHON=... uses that interpreter
# as it is instead (install nothing).
# 1. tests/gpu: our CP layout == TE's partitioning; DESIGN.md's per-document reference test on
#    the TE THD path (global positions); with 2+ GPUs, TE's CP attention == the ring attention.
# 2. the CPU CP tests again on this machine (ring attention, CP=2 / CP=2 x TP=2 / KD parity).
# 3. benchmarks/kd_step_gpu.py: KD step at the paper's shape, bf16 and FP8, vs a CE-only step.
# Everything is written to <out_dir> (pytest logs, benchmark table and JSON, nvidia-smi).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_checks}"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  PY=.venv/bin/python
  if ! { [ -x "$PY" ] && "$PY" -c "import megatron_kd, transformer_engine.pytorch" 2>/dev/null; }; then
    bash tools/install.sh gpu
  fi
fi
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
from megatron_kd import platform
import sys
if not (platform.cuda_available() and platform.transformer_engine_available()):
    sys.exit("gpu_checks.sh: needs CUDA and transformer-engine (bash tools/install.sh gpu)")
print("device:", platform.device_name())
PYEOF
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
status=0
"$PY" -m pytest -v -rs tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" || status=1
MEGATRON_KD_FORCE_CPU=1 "$PY" -m pytest -q tests/multirank/test_context_parallel.py tests/unit/test_cp_layout.py \
    2>&1 | tee "$OUT/tests_cp_cpu.log" || status=1
"$PY" benchmarks/kd_step_gpu.py --smoke 2>&1 | tee "$OUT/kd_step_gpu_smoke.txt" || status=1
"$PY" benchmarks/kd_step_gpu.py --json-out "$OUT/kd_step_gpu.json" 2>&1 | tee "$OUT/kd_step_gpu.txt" || status=1
echo "gpu_checks: results in $OUT (exit $status)"
exit $status
