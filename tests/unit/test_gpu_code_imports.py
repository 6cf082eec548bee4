"""The GPU-only code (tests/gpu, the GPU benchmark, the TE attention) and the benchmark scripts
(most run for minutes, so CI does not run them all) have their imports of our own modules
checked, so a rename elsewhere does not break them unseen (benchmarks/kd_step_gpu.py and later
benchmarks/kd_step.py imported ``freeze`` from a module it had moved out of; their ``--help``
still passed, the imports being lazy)."""
import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_FILES = sorted((REPO / "tests" / "gpu").glob("*.py")) + [
    REPO / "benchmarks" / "kd_step_gpu.py", REPO / "megatron_kd" / "models" / "te_thd.py"]
# some (fault_stress.py, study_jobs.py) only launch our CLI: nothing to resolve there
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


def own_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megatron_kd":
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "megatron_kd":
                    yield alias.name, None


@pytest.mark.parametrize("path", sorted(set(GPU_FILES + BENCHMARKS)), ids=lambda p: str(p.relative_to(REPO)))
def test_own_imports_resolve(path):
    pairs = list(own_imports(path))
    assert pairs or path not in GPU_FILES, f"{path} imports nothing of ours? (the check would be vacuous)"
    missing = []
    for module, name in pairs:
        mod = importlib.import_module(module)
        if name is not None and not hasattr(mod, name):
            try:  # a submodule (from megatron_kd import platform)
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"from {module} import {name}")
    assert not missing, f"{path.name}: " + "; ".join(missing)
