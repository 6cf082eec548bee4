"""TE fused attention on packed windows (THD, ``cu_seqlens``) with GLOBAL position ids, and TE's
context parallelism (``cp_comm_type: p2p``). GPU only; NOT RUN in the session that wrote it
(no GPU was available): ``bash tools/gpu_checks.sh`` runs its tests and the benchmark.

Why not megatron-core 0.16's own THD path (``packed_seq_params`` given to ``GPTModel``): it
switches RoPE to ``_apply_rotary_pos_emb_thd``, which restarts positions at 0 in every sequence
of ``cu_seqlens`` — the ``reset_position_ids`` ablation, not our default. So the model runs in
its ordinary ``sbhd`` layout (``PositionIdGPTModel`` rotates every token by its own global
position id) and only the *core attention* sees THD: :class:`THDCoreAttention` (a subclass of
megatron-core's ``TEDotProductAttention``) turns ``[s, b, h, d]`` into ``[b·s, h, d]`` and calls
TE with ``PackedSeqParams`` built from the per-micro-batch ``cu_seqlens`` that travel in the
``attention_mask`` argument (a tensor, so megatron's full-recompute checkpointing can save it;
built per micro-batch by ``data.cp_layout.thd_cu_seqlens``).

Layout (data/cp_layout.py): every document of every window of the micro-batch is one THD
sequence; with CP each is padded to a multiple of 2·CP (``cu_seqlens_padded``), and the tokens
are already partitioned as TE's ``thd_get_partitioned_indices`` expects (chunks r and 2·CP−1−r
on rank r), so TE's p2p ring computes exactly what the CPU ring attention computes.
"""
from __future__ import annotations

import torch

from megatron_kd.data.cp_layout import layout_indices, plan_segments, segment_lengths, thd_cu_seqlens


def packed_seq_params_from(cu: torch.Tensor):
    from megatron.core.packed_seq_params import PackedSeqParams

    real, padded = cu[0].contiguous(), cu[1].contiguous()
    max_len = int((padded[1:] - padded[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def is_thd_metadata(mask) -> bool:
    """The int32 ``[2, n+1]`` (cu_seqlens, cu_seqlens_padded) of ``cp_layout.thd_cu_seqlens``."""
    return mask is not None and mask.dtype == torch.int32 and mask.dim() == 2 and mask.shape[0] == 2


def chunked_cu_seqlens(cu: torch.Tensor, position_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Llama-4 chunked attention as THD sequences: the documents of ``cu`` (``[2, n+1]``,
    window-major) cut again wherever a position id starts a chunk (``pos % C == 0``), so token i
    sees j iff same document, same ``pos // C`` and j <= i -- the local spec's mask. Needs
    unpadded sequences (CP = 1; with CP the per-document padding would have to follow chunks)."""
    real, padded = cu[0], cu[1]
    if not torch.equal(real, padded):
        raise ValueError("chunked attention on TE's THD path needs unpadded sequences (CP = 1)")
    pos = position_ids.reshape(-1)  # [b * s], window-major like cu_seqlens
    starts = torch.nonzero(pos % chunk_size == 0).reshape(-1).to(real.dtype)
    bounds = torch.unique(torch.cat([real, starts]))  # sorted, 0 and the total included
    return torch.stack([bounds, bounds])


def thd_core_attention_class():
    """Built lazily: importing megatron's TE extension needs transformer-engine."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class THDCoreAttention(TEDotProductAttention):
        """TEDotProductAttention fed sbhd by megatron, called THD; ``attention_mask`` carries the
        int32 ``[2, n+1]`` (cu_seqlens, cu_seqlens_padded) of ``cp_layout.thd_cu_seqlens``. Any
        other mask (a dense boolean one, or none at a KV-cache decode step) runs TE's sbhd
        attention with an ``arbitrary`` / causal / no mask instead."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if not is_thd_metadata(attention_mask):
                # not a packed training window: generation (KV cache), perplexity, analysis probes
                # pass a dense boolean mask (True = masked) or none; TE runs it in sbhd
                if attention_mask is not None:
                    return super().forward(query, key, value, attention_mask,
                                           attn_mask_type=AttnMaskType.arbitrary,
                                           attention_bias=attention_bias, **kwargs)
                mask_type = AttnMaskType.no_mask if attn_mask_type == AttnMaskType.no_mask else AttnMaskType.causal
                return super().forward(query, key, value, None, attn_mask_type=mask_type,
                                       attention_bias=attention_bias, **kwargs)
            s, b = query.shape[:2]
            params = packed_seq_params_from(attention_mask)

            def thd(t):  # [s, b, h, d] -> [b*s, h, d], window-major like cu_seqlens
                return t.transpose(0, 1).reshape(b * s, *t.shape[2:]).contiguous()

            out = super().forward(thd(query), thd(key), thd(value), None,
                                  attn_mask_type=AttnMaskType.padding_causal,
                                  attention_bias=attention_bias, packed_seq_params=params, **kwargs)
            return out.reshape(b, s, -1).transpose(0, 1).contiguous()  # [s, b, np*hn]

    return THDCoreAttention


def check_layout_indices_match_te(document_ids: torch.Tensor, cp_size: int, cap: int) -> bool:
    """GPU check: our per-rank token order equals TE's ``thd_get_partitioned_indices``."""
    import transformer_engine_torch as tex

    from megatron_kd import platform

    cu = thd_cu_seqlens(document_ids[None], cp_size, cap)[1].to(platform.device())
    ours = layout_indices(document_ids, cp_size, cap)[0]
    for r in range(cp_size):
        te_idx = tex.thd_get_partitioned_indices(cu, cap, cp_size, r).cpu()  # padded slots
        # map padded-layout slots to window indices (-1 for padding) the same way ours does
        segs, sizes = plan_segments(segment_lengths(document_ids), cp_size, cap)
        slot_to_index, start = [], 0
        for n, size in zip(segs, sizes):
            slot_to_index += [start + j if j < n else -1 for j in range(size)]
            start += n
        if [slot_to_index[i] for i in te_idx.tolist()] != ours[r].tolist():
            return False
    return True
