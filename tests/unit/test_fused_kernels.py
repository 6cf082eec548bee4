"""NVIDIA apex is detected by what it provides, never by the import name: a fake ``apex`` first
on the path (PyPI's unrelated web toolkit; an NVIDIA apex built without its CUDA extensions)
must not change what runs on the CPU, while megatron-core's own bare ``import apex`` is fooled."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parents[1]

HALF = {  # NVIDIA apex's Python classes, no amp_C / fused_layer_norm_cuda (no --cuda_ext)
    "apex/__init__.py": "",
    "apex/optimizers/__init__.py": ("class FusedAdam:\n    def __init__(self, *a, **k):\n        import amp_C  # noqa\n\n\n"
                                    "class FusedSGD(FusedAdam):\n    pass\n"),
    "apex/normalization/__init__.py": "class FusedLayerNorm:\n    pass\n",
    "apex/normalization/fused_layer_norm.py": "class FusedLayerNormAffineFunction:\n    pass\n",
}
FAKES = {
    "pypi": {"apex/__init__.py": '"""Pyramid toolkit: Velruse, Flash Messages, CSRF (PyPI apex 0.9.10dev)."""\n'
                                 '__version__ = "0.9.10dev"\n'},
    "half": HALF,
}
FULL = {**HALF, "amp_C.py": "", "fused_layer_norm_cuda.py": ""}  # the kernels "present" (still the CPU)


def _write(root: Path, files: dict) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def env_with(path: Path) -> dict:
    env = dict(os.environ, MEGATRON_KD_FORCE_CPU="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for kind, files in FAKES.items():
        root = _write(tmp_path_factory.mktemp(kind), files)
        p = subprocess.run([sys.executable, str(HERE / "fused_kernels_worker.py")], capture_output=True, text=True,
                           env=env_with(root), cwd=REPO, timeout=300)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        assert p.returncode == 0 and lines, (kind, p.stderr[-3000:])
        out[kind] = json.loads(lines[-1][7:])
    return out


@pytest.mark.parametrize("kind", list(FAKES))
def test_a_fake_apex_fools_megatron_but_not_us(results, kind):
    r = results[kind]
    assert r["megatron_have_apex"] is True  # megatron-core's bare `import apex` says yes
    # ... yet both norms build as torch norms and compute, and a runnable Adam is used
    assert r["RMSNorm"] == ["RMSNorm"] and r["LayerNorm"] == ["LayerNorm"], r
    assert r["RMSNorm_finite"] and r["LayerNorm_finite"]
    assert r["adam_after_check"] == "torch.optim.AdamW"
    assert r["line"].startswith("fused kernels: none (CPU: transformer-engine's and apex's kernels are CUDA-only")


def test_pypi_apex_is_named_as_not_nvidia(results):
    r = results["pypi"]
    assert not r["fused_adam"] and not r["fused_layer_norm"]
    assert "is not NVIDIA's apex" in r["reason"] and "PyPI's 'apex' is an unrelated web toolkit" in r["reason"]
    assert "is not NVIDIA's apex" in r["line"]
    assert r["require"].startswith("the test needs NVIDIA apex's CUDA kernels") and "--cuda_ext" in r["require"]


def test_apex_without_cuda_extensions_is_not_used(results):
    r = results["half"]
    assert r["megatron_adam"] == "apex.optimizers"  # megatron bound the class that cannot run...
    assert not r["fused_adam"] and not r["fused_layer_norm"]
    assert "amp_C does not import" in r["reason"] and "fused_layer_norm_cuda does not import" in r["reason"]
    assert "built without --cuda_ext" in r["reason"]


def test_complete_apex_is_detected_but_not_used_on_the_cpu(tmp_path, monkeypatch):
    from megatron_kd import fused_kernels

    monkeypatch.syspath_prepend(str(_write(tmp_path, FULL)))
    for name in list(sys.modules):  # probe imports these; leave no fake behind for other tests
        if name.split(".")[0] in ("apex", "amp_C", "fused_layer_norm_cuda"):
            monkeypatch.delitem(sys.modules, name)
    try:
        p = fused_kernels.probe_apex()
        assert p.fused_adam and p.fused_layer_norm and p.reason == f"NVIDIA apex at {tmp_path / 'apex' / '__init__.py'}"
        fused_kernels.require_apex("x")  # no error
        monkeypatch.setenv("MEGATRON_KD_FORCE_CPU", "1")
        assert not fused_kernels.use_apex_layer_norm("LayerNorm")
        assert fused_kernels.startup_line("LayerNorm").startswith("fused kernels: none (CPU")
    finally:
        for name in list(sys.modules):
            if name.split(".")[0] in ("apex", "amp_C", "fused_layer_norm_cuda"):
                del sys.modules[name]


def test_no_apex_at_all():
    from megatron_kd import fused_kernels

    assert fused_kernels.probe_apex().reason == "NVIDIA apex is not installed"
    with pytest.raises(RuntimeError, match="needs NVIDIA apex's CUDA kernels: NVIDIA apex is not installed; build"):
        fused_kernels.require_apex("x")
