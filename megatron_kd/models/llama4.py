"""Llama-4 text-model pieces on megatron-core: MoE/dense interleave, iRoPE, chunked attention.
(Filled in below; see docs/interop.md.)"""
from __future__ import annotations


def needs_custom_layers(model_cfg) -> bool:
    m = model_cfg
    return bool(m.num_moe_experts or m.qk_l2_norm or m.attention_chunk_size or m.attn_temperature_tuning)
