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
        # in params_dtype like every other parameter: megatron's torch norm is made in fp32 and
        # cast by Megatron-LM's Float16Module, which this builder does not use; an fp32 norm in a
        # bf16 model broke the (non-distributed) bf16 optimizer's checkpoint save ("Param id ...
        # does not match any model sharded param": it maps only the bf16 groups)
        kwargs = {"eps": eps, "dtype": config.params_dtype}
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, **kwargs)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, **kwargs)
        else:
            raise ValueError(f"normalization={config.normalization!r}: expected LayerNorm or RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def use_local_norms(spec, keep_apex: bool = False):
    """Replace megatron's WrappedTorchNorm in a local layer spec (hidden-state and q/k norms), and
    its apex FusedLayerNorm unless ``keep_apex`` (fused_kernels.use_apex_layer_norm): megatron
    picks that class on a bare ``import apex``, which an unrelated or CUDA-less apex satisfies."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    replace = (WrappedTorchNorm,)
    if not keep_apex:
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        replace += (FusedLayerNorm,)
    sub = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(sub, name, None) in replace:
            setattr(sub, name, LocalNorm)
    attn = getattr(getattr(sub, "self_attention", None), "submodules", None)
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attn, name, None) in replace:
            setattr(attn, name, LocalNorm)
    return spec
