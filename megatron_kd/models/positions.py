"""RoPE from explicit per-token position ids.

megatron-core's GPTModel builds rotary embeddings for positions 0..S-1 (and its THD path restarts
them per document). Packed long-context windows need *global* positions (token i gets position i
of the window, across document boundaries) or, for the ablation, per-document positions; both are
just position-id tensors produced by the data pipeline, so the model takes them as given.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotary_emb_from_positions(inv_freq: Tensor, position_ids: Tensor, interleaved: bool = False,
                              dtype: torch.dtype = torch.float32) -> Tensor:
    """Angles for megatron's ``apply_rotary_pos_emb``.

    inv_freq: [d/2]; position_ids: [b, s] -> [s, b, 1, d] (megatron's default layout is
    [s, 1, 1, d]; a per-sample b axis broadcasts the same way over heads).
    Angles are computed in fp32 (``dtype``): at 128k positions bf16 would lose the low-frequency
    terms; float64 is the exact reference of the position-dependence audit (megatron_kd/analysis).
    """
    freqs = position_ids.to(dtype)[..., None] * inv_freq.to(dtype)  # [b, s, d/2]
    if interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
    return emb.transpose(0, 1)[:, :, None, :].contiguous()  # [s, b, 1, d]
