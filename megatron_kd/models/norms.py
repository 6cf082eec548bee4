"""The local spec's norms, with sequence parallelism.

megatron-core 0.16's ``WrappedTorchNorm`` (the local spec's norm when neither TE nor Apex is
installed) refuses ``sequence_parallel``. The reason is bookkeeping, not math: under sequence
parallelism a norm sees only its rank's slice of the sequence, so its weight gradients are
partial sums that ``finalize_model_grads`` must all-reduce over TP, and it finds them by the
``sequence_parallel`` attribute that TE's and Apex's norms set on their parameters. ``LocalNorm``
is torch's LayerNorm / RMSNorm with that attribute, so TP + SP runs on the CPU too and the KD
path under SP (the fused loss gathers the sequence first) is tested against one rank.
"""
from __future__ import annotations

import torch


class LocalNorm:
    """Same constructor as megatron's norm classes; returns a plain torch norm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}: expected LayerNorm or RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def use_local_norms(spec):
    """Replace megatron's WrappedTorchNorm in a local layer spec (hidden-state and q/k norms)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    sub = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(sub, name, None) is WrappedTorchNorm:
            setattr(sub, name, LocalNorm)
    attn = getattr(getattr(sub, "self_attention", None), "submodules", None)
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attn, name, None) is WrappedTorchNorm:
            setattr(attn, name, LocalNorm)
    return spec
