"""Freeze the query/key weight rows of chosen rotary frequencies (a phase-2 control).

The paper's §5 finds that the high-index (low-frequency) rotary dimensions of the query states
change most when the context is extended; freezing them (or the converse) during phase 2 tests
whether KD's effect lives there. ``train.freeze_rotary_frequencies: "a:b,..."`` names frequency
indices i of ``rotary_dim / 2`` (inv_freq_i = theta^(-2i / rotary_dim)); with megatron-core's
non-interleaved RoPE, frequency i rotates head dims i and i + rotary_dim / 2 of every query and
key head. megatron-core's fused ``linear_qkv`` holds, per local query group, the group's query
heads, then its key head, then its value head (``[ng/TP, (np/ng + 2) * hd]`` rows, attention.py
``get_query_key_value_tensors``); the rows of those dims in the query and key heads are frozen,
in every layer that has RoPE (NoPE layers and value rows are left alone).

Frozen = the gradient rows are zeroed before the optimizer step (so Adam's moments stay zero and
the grad norm/clipping ignore them) and the parameter rows are written back to their initial
values after it (decoupled weight decay would otherwise shrink them).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def frozen_head_dims(spans: Sequence[Tuple[int, int]], rotary_dim: int) -> List[int]:
    half = rotary_dim // 2
    dims = set()
    for a, b in spans:
        for i in range(a, b):
            dims.update((i, i + half))
    return sorted(dims)


def qkv_frozen_rows(num_heads: int, num_groups: int, head_dim: int, dims: Sequence[int], tp: int = 1) -> torch.Tensor:
    """Bool [rows of this TP rank's linear_qkv]: True for the frozen query/key rows."""
    groups = num_groups // tp
    per_group = num_heads // num_groups
    head = torch.zeros(head_dim, dtype=torch.bool)
    head[list(dims)] = True
    group = torch.cat([head.repeat(per_group), head, torch.zeros(head_dim, dtype=torch.bool)])  # q.., k, v
    return group.repeat(groups)


class RotaryFreeze:
    """The frozen rows of every student ``linear_qkv`` (weight and bias) of the given chunks."""

    def __init__(self, chunks, model_cfg, spans, tp: int = 1):
        from megatron_kd.models.llama4 import is_nope_layer

        m = model_cfg
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        rotary_dim = int(head_dim * m.rotary_percent)
        rows = qkv_frozen_rows(m.num_attention_heads, m.num_query_groups or m.num_attention_heads, head_dim,
                               frozen_head_dims(spans, rotary_dim), tp)
        self.entries = []  # (param, row mask, frozen values)
        for chunk in chunks:
            for module in chunk.modules():
                qkv = getattr(getattr(module, "self_attention", None), "linear_qkv", None)
                if qkv is None or not hasattr(module, "layer_number") or is_nope_layer(m, module.layer_number - 1):
                    continue
                for p in (qkv.weight, getattr(qkv, "bias", None)):
                    if p is None or not p.requires_grad or not isinstance(p, torch.Tensor):
                        continue  # the frozen teacher's layers are not the student's
                    if p.shape[0] != rows.numel():
                        raise RuntimeError(f"linear_qkv has {p.shape[0]} rows, expected {rows.numel()}")
                    mask = rows.to(p.device)
                    self.entries.append((p, mask, p.detach()[mask].clone()))
        if not self.entries:
            raise RuntimeError("train.freeze_rotary_frequencies: no RoPE layer's linear_qkv found")

    @torch.no_grad()
    def mask_grads(self):
        for p, mask, _ in self.entries:
            for g in (getattr(p, "main_grad", None), p.grad):
                if g is not None:
                    g[mask] = 0

    @torch.no_grad()
    def restore(self):
        for p, mask, values in self.entries:
            p[mask] = values
