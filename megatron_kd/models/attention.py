"""Attention backend choice: which layer spec, and how document boundaries reach attention.

Packed windows must not attend across documents. On the CPU / local spec the mask is dense:
``[b, 1, s, s]`` booleans (True = masked, megatron's convention) built once per micro-batch from
document ids and shared by every layer; with context parallelism the ring attention
(models/ring_attention.py) masks from each token's (document id, window index) instead. The TE
spec runs TE's fused attention on THD (``cu_seqlens`` per document) with global positions
(models/te_thd.py).
"""
from __future__ import annotations

import copy

from megatron_kd import platform


def layer_spec(model_cfg, context_parallel_size: int = 1, **kwargs):
    """This backend's GPT layer spec: megatron-core's TE or local spec (``kwargs``: options both
    accept, e.g. the Llama-4 layers' ``num_experts`` / ``qk_l2_norm``) with the backend's core
    attention (:func:`use_backend_core_attention`)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if platform.layer_spec_kind() == "te":
        spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=model_cfg.qk_layernorm, **kwargs))
    else:
        from megatron_kd.fused_kernels import use_apex_layer_norm
        from megatron_kd.models.norms import use_local_norms

        spec = use_local_norms(copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(
            normalization=model_cfg.normalization, qk_layernorm=model_cfg.qk_layernorm, **kwargs)),
            keep_apex=use_apex_layer_norm(model_cfg.normalization))
    return use_backend_core_attention(spec, context_parallel_size)


def block_spec(layer_specs: list):
    """This stage's layers as a ``TransformerBlockSubmodules`` with the backend's final norm (TE's,
    or the local spec's sequence-parallel-aware one, models/norms.py; megatron-core would pick
    ``WrappedTorchNorm``, which refuses sequence parallelism)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if platform.layer_spec_kind() == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        from megatron_kd.models.norms import LocalNorm as final_norm
    return TransformerBlockSubmodules(layer_specs=list(layer_specs), layer_norm=final_norm)


def use_backend_core_attention(spec, context_parallel_size: int = 1):
    """Put this backend's core attention into a megatron-core layer spec (every spec the project
    builds goes through here, the Llama-4 per-layer specs included):

    * TE: ``THDCoreAttention`` on THD with global positions (CP via TE's p2p ring), mask type
      ``padding_causal`` (models/te_thd.py; GPU path, not yet run on a GPU);
    * local spec at CP > 1: the reference ring attention (megatron-core's DotProductAttention
      refuses CP; same constructor/forward signature);
    * local spec at CP = 1: megatron-core's own, unchanged.
    """
    attn = spec.submodules.self_attention
    if platform.layer_spec_kind() == "te":
        from megatron.core.transformer.enums import AttnMaskType

        from megatron_kd.models.te_thd import thd_core_attention_class

        attn.params["attn_mask_type"] = AttnMaskType.padding_causal
        attn.submodules.core_attention = thd_core_attention_class()
    elif context_parallel_size > 1:
        from megatron_kd.models.ring_attention import RingAttention

        attn.submodules.core_attention = RingAttention
    return spec


def attention_mask(document_ids):
    """Mask for one micro-batch ([b, s] document ids -> [b, 1, s, s], True = masked)."""
    from megatron_kd.data.packing import document_attention_mask

    return document_attention_mask(document_ids)


def attention_mask_for_batch(batch):
    """What the model's ``attention_mask`` argument carries for this micro-batch: the dense
    document mask for whole windows, or, for a context-parallel shard (it has ``token_index``,
    data/cp_layout.py), the ``[2, b, s_local]`` (document id, window index) of its tokens that
    the ring attention masks with."""
    import torch

    if "thd_cu_seqlens" in batch:  # TE spec (models/te_thd.py)
        return batch["thd_cu_seqlens"]
    if "token_index" in batch:
        return torch.stack([batch["document_ids"], batch["token_index"]])
    return attention_mask(batch["document_ids"])
