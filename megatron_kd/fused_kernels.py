"""Which fused kernels a run uses (transformer-engine, NVIDIA apex, or none), decided by what the
installed packages *provide*, never by an import name.

megatron-core 0.16.1 decides "apex is installed" with a bare ``import apex``
(``models/gpt/gpt_layer_specs.py``, ``models/backends.py``, ``transformer/transformer_block.py``)
and then builds its local spec's norms from apex's ``FusedLayerNorm``. The package named ``apex``
on PyPI is an unrelated Pyramid web toolkit, and an NVIDIA apex built without ``--cuda_ext`` has
the Python classes but not their kernels; with either on the path megatron's local spec asserts
on the first RMSNorm model ("(RMSNorm) is not supported in FusedLayerNorm") and its optimizer
module may bind a FusedAdam that cannot run. So NVIDIA apex counts as present only when the class
*and* its CUDA extension import: ``apex.optimizers.FusedAdam`` + ``amp_C`` (fused Adam, and
megatron's ``multi_tensor_applier`` for grad clipping / scaling), and
``apex.normalization.FusedLayerNorm`` + ``fused_layer_norm_cuda`` (fused LayerNorm).

What megatron-core uses from apex, and when we let it (CUDA only; the kernels are CUDA-only):
- fused Adam: megatron's optimizer imports TE's FusedAdam, else apex's, else torch AdamW; we keep
  its choice when it is runnable and rebind torch AdamW otherwise (:func:`check_megatron_adam`).
- fused LayerNorm: megatron's local spec norm (LayerNorm models only: megatron's ``FusedLayerNorm``
  refuses RMSNorm), when TE is absent; otherwise our ``models/norms.LocalNorm``.
Building NVIDIA apex: docs/h100.md ("NVIDIA apex").
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Optional

from megatron_kd import platform

BUILD_HINT = ("build NVIDIA apex from source: git clone https://github.com/NVIDIA/apex && cd apex && "
              "pip install -v --no-build-isolation --config-settings '--build-option=--cpp_ext' "
              "--config-settings '--build-option=--cuda_ext' ./ (docs/h100.md)")


@dataclass(frozen=True)
class ApexProbe:
    fused_adam: bool
    fused_layer_norm: bool
    reason: str  # why not (or where it was found)


def _importable(module: str, attr: Optional[str] = None) -> Optional[str]:
    """None when ``module`` (and ``module.attr``) import, else what went wrong. Any exception
    counts: a foreign package may fail at import in its own way."""
    try:
        mod = importlib.import_module(module)
        if attr is not None and not hasattr(mod, attr):
            return f"{module} has no {attr}"
        return None
    except Exception as e:  # noqa: BLE001
        return f"{module}{'.' + attr if attr else ''} does not import ({type(e).__name__}: {e})"


def probe_apex() -> ApexProbe:
    spec = importlib.util.find_spec("apex")
    if spec is None:
        return ApexProbe(False, False, "NVIDIA apex is not installed")
    where = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
    adam_cls, norm_cls = _importable("apex.optimizers", "FusedAdam"), _importable("apex.normalization", "FusedLayerNorm")
    if adam_cls and norm_cls:
        return ApexProbe(False, False, f"the 'apex' at {where} is not NVIDIA's apex (no apex.optimizers.FusedAdam "
                                       "or apex.normalization.FusedLayerNorm; PyPI's 'apex' is an unrelated web "
                                       "toolkit)")
    adam = adam_cls or _importable("amp_C")  # the class, then its CUDA extension
    norm = norm_cls or _importable("fused_layer_norm_cuda")
    missing = "; ".join(m for m in (adam, norm) if m)
    return ApexProbe(adam is None, norm is None,
                     f"NVIDIA apex at {where}" + (f" without {missing} (built without --cuda_ext?)" if missing else ""))


def require_apex(what: str) -> None:
    """Lazy check with a clear message for code that needs apex's kernels."""
    p = probe_apex()
    if not (p.fused_adam and p.fused_layer_norm):
        raise RuntimeError(f"{what} needs NVIDIA apex's CUDA kernels: {p.reason}; {BUILD_HINT}")


def use_apex_layer_norm(normalization: str) -> bool:
    """megatron's apex FusedLayerNorm for the local spec: CUDA, no TE, LayerNorm, kernels present."""
    return (platform.cuda_available() and not platform.transformer_engine_available()
            and normalization == "LayerNorm" and probe_apex().fused_layer_norm)


def check_megatron_adam() -> str:
    """Make megatron's optimizer use an Adam that runs here; return its name.

    megatron binds ``megatron.core.optimizer.Adam`` at import from TE, else ``apex.optimizers``
    (by import success alone), else torch. A FusedAdam on the CPU, or apex's without ``amp_C``,
    fails at the first step; torch AdamW is the same update (megatron's own fallback)."""
    import torch
    from megatron.core import optimizer as mopt

    module = getattr(mopt.Adam, "__module__", "")
    fused_ok = platform.cuda_available() and (
        module.startswith("transformer_engine") or (module.startswith("apex") and probe_apex().fused_adam))
    if module.startswith("torch"):
        return f"torch.optim.{mopt.Adam.__name__}"
    if fused_ok:
        return f"{module}.{mopt.Adam.__name__}"
    mopt.Adam = torch.optim.AdamW
    mopt.USING_PYTORCH_OPTIMIZER = True
    from megatron.core.optimizer import distrib_optimizer

    distrib_optimizer.Adam = torch.optim.Adam  # its own fallback binding (an isinstance check)
    return "torch.optim.AdamW"


def startup_line(normalization: str) -> str:
    """One line for the run's log: the fused kernels in use, or none and why."""
    apex = probe_apex()
    if not platform.cuda_available():
        return (f"fused kernels: none (CPU: transformer-engine's and apex's kernels are CUDA-only; torch AdamW, "
                f"torch {normalization}); apex: {apex.reason}")
    if platform.transformer_engine_available():
        return ("fused kernels: transformer-engine (TE layer spec: fused norms, linears, attention; TE FusedAdam); "
                f"apex not needed ({apex.reason})")
    kernels = []
    if apex.fused_adam:
        kernels.append("apex FusedAdam + multi_tensor_applier")
    if use_apex_layer_norm(normalization):
        kernels.append("apex FusedLayerNorm")
    elif apex.fused_layer_norm:
        kernels.append(f"none for {normalization} (megatron's apex FusedLayerNorm is LayerNorm only)")
    if not kernels:
        return f"fused kernels: none (no transformer-engine; apex: {apex.reason}; {BUILD_HINT})"
    return f"fused kernels: {', '.join(kernels)} (no transformer-engine; {apex.reason})"
