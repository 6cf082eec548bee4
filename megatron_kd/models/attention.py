"""Attention backend choice: which layer spec, and how document boundaries reach attention.

Packed windows must not attend across documents. On the CPU / local spec the mask is dense:
``[b, 1, s, s]`` booleans (True = masked, megatron's convention) built once per micro-batch from
document ids and shared by every layer; with context parallelism the ring attention
(models/ring_attention.py) masks from each token's (document id, window index) instead. The TE
spec runs TE's fused attention on THD (``cu_seqlens`` per document) with global positions
(models/te_thd.py).
"""
from __future__ import annotations

from megatron_kd import platform


def layer_spec(model_cfg, context_parallel_size: int = 1):
    from megatron.core.models.gpt import gpt_layer_specs

    if platform.layer_spec_kind() == "te":
        # TE fused attention on THD (cu_seqlens per document, global positions; CP via TE's
        # p2p ring): models/te_thd.py. GPU path, not run in the session that wrote it.
        from megatron_kd.models.te_thd import te_layer_spec_thd

        return te_layer_spec_thd(qk_layernorm=model_cfg.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=model_cfg.normalization,
                                                    qk_layernorm=model_cfg.qk_layernorm)
    if context_parallel_size > 1:
        # megatron-core's DotProductAttention refuses CP; the reference ring attention takes
        # its place (same constructor/forward signature).
        from megatron_kd.models.ring_attention import RingAttention

        spec.submodules.self_attention.submodules.core_attention = RingAttention
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
