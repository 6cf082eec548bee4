"""Llama-4 text-model pieces on megatron-core 0.16.1: MoE/dense interleave, iRoPE, chunked attention.

Each piece is a ModelConfig option (docs/interop.md), usable by teachers and students alike:

- ``num_moe_experts`` / ``moe_layer_freq`` / ``moe_shared_expert_intermediate_size``: every N-th
  layer is a megatron-core MoELayer (router + SequentialMLP experts + SharedExpertMLP), the others
  dense -- Llama-4's interleave. Top-1 sigmoid routing with the score applied to the expert
  *input* (``moe_apply_probs_on_input``) is megatron-core's own implementation of Llama-4 routing.
- ``no_rope_freq``: every N-th layer has no RoPE (megatron-core skips the rotation).
- ``attn_temperature_tuning`` (NoPE layers): q *= log(floor((pos + 1) / floor_scale) + 1) * scale + 1
  with ``pos`` the token's *explicit* position id -- so a packed window's global positions (or
  per-document ones) decide the temperature, exactly as they decide RoPE elsewhere.
- ``attention_chunk_size`` (RoPE layers): token i sees j only if pos(i) // C == pos(j) // C, on top
  of the causal document mask (both are boolean masks; they are OR-ed).
- ``qk_l2_norm`` (RoPE layers): megatron-core's parameter-free L2Norm on q and k. megatron-core
  applies it before RoPE, HF Llama-4 after; RoPE is a rotation, so the norms agree.

The position-dependent pieces are one core-attention subclass (of whatever class the layer spec
chose: the local DotProductAttention on CPU, the ring attention under context parallelism, TE's
on GPU) that adjusts q and the mask, then runs the unchanged attention. Position ids reach it
from :class:`Llama4GPTModel` (every pipeline stage receives them, see gpt_model.py; under CP they
are this rank's shard, travelling with its tokens).

Under CP the mask is the ring attention's per-token (document id, window index); "same chunk" is
folded into the document id (``document · 2^32 + pos // C``), since a chunk boundary cuts
attention exactly like a document boundary, so the ring itself is unchanged. On the TE spec the
same idea cuts the THD sequences (``te_thd.chunked_cu_seqlens``) at CP = 1; TE with CP > 1 is
refused (TE's CP layout pads per document, not per chunk). Not yet run on a GPU.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_kd.config import moe_layer_pattern
from megatron_kd.models.gpt_model import PositionIdGPTModel
from megatron_kd.models.te_thd import chunked_cu_seqlens, is_thd_metadata


def needs_custom_layers(model_cfg) -> bool:
    m = model_cfg
    return bool(m.num_moe_experts or m.qk_l2_norm or m.attention_chunk_size or m.attn_temperature_tuning)


def is_nope_layer(model_cfg, i: int) -> bool:
    """0-based layer index -> True for the layers without RoPE (megatron-core's pattern)."""
    n = model_cfg.no_rope_freq
    return bool(n) and (i + 1) % n == 0


def is_moe_layer(model_cfg, i: int) -> bool:
    return bool(moe_layer_pattern(model_cfg)[i])


CHUNK_ID_STRIDE = 1 << 32  # document ids are window-local (< seq_length), chunks < 2^32


def _is_ring_meta(mask) -> bool:
    """The ring attention's [2, b, s] int64 (document id, window index), not a boolean mask."""
    return mask is not None and mask.dtype == torch.long and mask.dim() == 3


@functools.lru_cache(maxsize=None)
def _position_aware(base):
    """Subclass of a core-attention class that applies temperature tuning and chunked masking."""

    class PositionAwareCoreAttention(base):
        def __init__(self, *args, chunk_size: Optional[int] = None,
                     temperature: Optional[tuple] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.chunk_size = chunk_size
            self.temperature = temperature  # (floor_scale, attn_scale) or None
            self.position_ids = None  # [b, s], set by Llama4GPTModel before each forward

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            pos = self.position_ids
            if pos is None and (self.chunk_size or self.temperature):
                raise RuntimeError("Llama-4 attention needs position ids (build with models.build_model)")
            if self.temperature is not None:
                floor_scale, scale = self.temperature
                t = torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * scale + 1.0  # [b, s]
                query = (query * t.t()[:, :, None, None]).to(query.dtype)  # query [s, b, np, hn]
            if self.chunk_size:
                chunk = torch.div(pos, self.chunk_size, rounding_mode="floor")  # [b, s]
                if is_thd_metadata(attention_mask):  # TE: chunks become THD sequences of their own
                    attention_mask = chunked_cu_seqlens(attention_mask, pos, self.chunk_size)
                elif _is_ring_meta(attention_mask):  # CP: (document, chunk) as one document id
                    doc = attention_mask[0]
                    joint = torch.where(doc >= 0, doc * CHUNK_ID_STRIDE + chunk, doc)
                    attention_mask = torch.stack([joint, attention_mask[1]])
                else:
                    other = chunk[:, None, :, None] != chunk[:, None, None, :]  # [b, 1, s, s], True = masked
                    attention_mask = other if attention_mask is None else attention_mask | other
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    PositionAwareCoreAttention.__name__ = f"PositionAware{base.__name__}"
    return PositionAwareCoreAttention


def _layer_spec(model_cfg, i: int, context_parallel_size: int = 1):
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_kd.models.attention import layer_spec

    m = model_cfg
    nope = is_nope_layer(m, i)
    experts = m.num_moe_experts if is_moe_layer(m, i) else None
    spec = layer_spec(m, context_parallel_size, num_experts=experts, moe_grouped_gemm=False,
                      qk_l2_norm=m.qk_l2_norm and not nope)
    attn = spec.submodules.self_attention.submodules
    temperature = ((m.attn_temperature_floor_scale, m.attn_temperature_scale)
                   if m.attn_temperature_tuning and nope else None)
    chunk = m.attention_chunk_size if not nope else None
    if temperature or chunk:
        base = attn.core_attention.module if isinstance(attn.core_attention, ModuleSpec) else attn.core_attention
        attn.core_attention = ModuleSpec(module=_position_aware(base),
                                         params={"chunk_size": chunk, "temperature": temperature})
    return spec


def decoder_block_spec(model_cfg, config, vp_stage: Optional[int] = None, context_parallel_size: int = 1):
    """Per-layer specs for this rank's pipeline stage (as megatron-core's get_gpt_decoder_block_spec
    slices them), wrapped in a TransformerBlockSubmodules."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_kd.models.attention import block_spec

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return block_spec([_layer_spec(model_cfg, i, context_parallel_size) for i in range(offset, offset + n)])


class Llama4GPTModel(PositionIdGPTModel):
    """PositionIdGPTModel that hands the forward's position ids to its position-aware attention."""

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        for module in self.modules():
            if hasattr(module, "chunk_size") and hasattr(module, "temperature"):
                module.position_ids = position_ids
        return super()._preprocess(input_ids, position_ids, *args, **kwargs)
