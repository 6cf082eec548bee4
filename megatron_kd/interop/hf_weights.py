"""Tensor-by-tensor mapping between HF Llama-family state dicts and megatron-core's (TP=1, PP=1).

Each :class:`Rule` names one megatron-core tensor, the HF tensors it is made of, their expected
shapes (checked against the shards before anything is computed) and the two transforms. The
unsharded megatron layout is all a converter needs: dist_checkpointing stores global tensors and
reshards them for any TP/PP on load.

Layout facts (megatron-core 0.16.1 local/TE specs):
- ``linear_qkv`` rows are grouped per KV group: ``[q heads of group g | k_g | v_g]`` for each g
  (so a TP shard holds whole groups); HF keeps separate q/k/v projections.
- SwiGLU ``linear_fc1`` is ``[gate; up]`` along rows; HF keeps gate_proj / up_proj.
- The word embedding (and an untied output layer) has ``V_pad`` rows; rows past HF's vocab are 0.
- Llama-4 checkpoints rotate interleaved pairs (complex RoPE); megatron rotates halves. The q/k
  rows of every head are permuted ``[0,2,4,..,1,3,5,..]`` on import (and back on export), which
  leaves q.k, the L2 norm and attention unchanged while turning one rotation into the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

from megatron_kd.models.llama4 import is_moe_layer


@dataclass
class Rule:
    mcore: str
    hf: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    to_mcore: Callable[[List[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], List[torch.Tensor]]
    kind: str


def _same(ts):
    return ts[0]


def _one(t):
    return [t]


def _half_split_perm(hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])


def _permute_heads(t: torch.Tensor, hd: int, inverse: bool = False) -> torch.Tensor:
    """Rows of each head reordered interleaved -> half-split (or back)."""
    perm = _half_split_perm(hd)
    if inverse:
        perm = torch.argsort(perm)
    shape = t.shape
    return t.reshape(-1, hd, *shape[1:])[:, perm].reshape(shape)


class Layout:
    """The shape facts of one model (from ModelConfig) the rules need."""

    def __init__(self, m, vocab: int, padded_vocab: int, family: str):
        self.m, self.vocab, self.padded_vocab, self.family = m, vocab, padded_vocab, family
        self.h = m.hidden_size
        self.heads = m.num_attention_heads
        self.groups = m.num_query_groups or self.heads
        self.hd = m.kv_channels or self.h // self.heads
        self.ffn = m.ffn_hidden_size or 4 * self.h
        self.interleaved_rope = family == "llama4"

    # -- q/k/v ---------------------------------------------------------------------------
    def fuse_qkv(self, ts):
        q, k, v = ts
        if self.interleaved_rope:
            q, k = _permute_heads(q, self.hd), _permute_heads(k, self.hd)
        g, rest = self.groups, q.shape[1:]
        q = q.reshape(g, (self.heads // g) * self.hd, *rest)
        k = k.reshape(g, self.hd, *rest)
        v = v.reshape(g, self.hd, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def split_qkv(self, t):
        g, per = self.groups, self.heads // self.groups
        rest = t.shape[1:]
        t = t.reshape(g, (per + 2) * self.hd, *rest)
        q, k, v = torch.split(t, [per * self.hd, self.hd, self.hd], dim=1)
        q, k, v = (x.reshape(-1, *rest).contiguous() for x in (q, k, v))
        if self.interleaved_rope:
            q, k = _permute_heads(q, self.hd, inverse=True), _permute_heads(k, self.hd, inverse=True)
        return [q, k, v]

    # -- embedding rows ------------------------------------------------------------------
    def pad_rows(self, ts):
        t = ts[0]
        out = t.new_zeros(self.padded_vocab, t.shape[1])
        n = min(self.vocab, t.shape[0])
        out[:n] = t[:n]
        return out

    def unpad_rows(self, hf_rows: int):
        def f(t):
            out = t.new_zeros(hf_rows, t.shape[1])
            n = min(self.vocab, hf_rows)
            out[:n] = t[:n]
            return [out]
        return f


def _fc1(ts):
    return torch.cat(ts, dim=0)


def _split_fc1(t):
    return [x.contiguous() for x in torch.chunk(t, 2, dim=0)]


def rules(layout: Layout, hf_vocab_rows: int) -> List[Rule]:
    """Every megatron-core tensor of the model (TP=1, PP=1 names), in file-friendly order."""
    L, m = layout, layout.m
    h, hd, heads, g = L.h, L.hd, L.heads, L.groups
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                ((hf_vocab_rows, h),), L.pad_rows, L.unpad_rows(hf_vocab_rows), "embedding")]
    for i in range(m.num_layers):
        p, q = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = tuple(p + f"self_attn.{x}_proj." for x in "qkv")
        out.append(Rule(q + "input_layernorm.weight", (p + "input_layernorm.weight",), ((h,),),
                        _same, _one, "norm"))
        out.append(Rule(q + "self_attention.linear_qkv.weight", tuple(x + "weight" for x in qkv),
                        ((heads * hd, h), (g * hd, h), (g * hd, h)), L.fuse_qkv, L.split_qkv, "attention"))
        if m.add_qkv_bias:
            out.append(Rule(q + "self_attention.linear_qkv.bias", tuple(x + "bias" for x in qkv),
                            ((heads * hd,), (g * hd,), (g * hd,)), L.fuse_qkv, L.split_qkv, "attention"))
        if m.qk_layernorm:
            for a, b in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
                out.append(Rule(q + f"self_attention.{a}.weight", (p + f"self_attn.{b}.weight",),
                                ((hd,),), _same, _one, "norm"))
        out.append(Rule(q + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",),
                        ((h, heads * hd),), _same, _one, "attention"))
        out.append(Rule(q + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",),
                        ((h,),), _same, _one, "norm"))
        out += _mlp_rules(layout, i, p, q)
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),), _same, _one, "norm"))
    if m.untie_embeddings_and_output_weights:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), ((hf_vocab_rows, h),),
                        L.pad_rows, L.unpad_rows(hf_vocab_rows), "embedding"))
    return out


def _mlp_rules(layout: Layout, i: int, p: str, q: str) -> List[Rule]:
    m, h, ffn = layout.m, layout.h, layout.ffn
    mlp = "feed_forward." if layout.family == "llama4" else "mlp."
    if not is_moe_layer(m, i):
        return [
            Rule(q + "mlp.linear_fc1.weight", (p + mlp + "gate_proj.weight", p + mlp + "up_proj.weight"),
                 ((ffn, h), (ffn, h)), _fc1, _split_fc1, "mlp"),
            Rule(q + "mlp.linear_fc2.weight", (p + mlp + "down_proj.weight",), ((h, ffn),), _same, _one, "mlp"),
        ]
    return _llama4_moe_rules(layout, p + mlp, q + "mlp.")


def _llama4_moe_rules(layout: Layout, p: str, q: str) -> List[Rule]:
    """HF Llama-4 keeps all experts in two 3-D tensors ``gate_up_proj [E, h, 2f]`` and
    ``down_proj [E, f, h]`` (x @ W, not W x); megatron-core's SequentialMLP has one
    ``linear_fc1 [2f, h]`` / ``linear_fc2 [h, f]`` per expert. One expert is sliced per rule
    (safetensors reads the slice without loading the others)."""
    m, h = layout.m, layout.h
    E, f = m.num_moe_experts, m.moe_ffn_hidden_size or layout.ffn
    fs = m.moe_shared_expert_intermediate_size
    out = [Rule(q + "router.weight", (p + "router.weight",), ((E, h),), _same, _one, "router")]
    for e in range(E):
        out.append(Rule(q + f"experts.local_experts.{e}.linear_fc1.weight",
                        (f"{p}experts.gate_up_proj[{e}]",), ((h, 2 * f),),
                        lambda ts: ts[0].t().contiguous(), lambda t: [t.t().contiguous()], "experts"))
        out.append(Rule(q + f"experts.local_experts.{e}.linear_fc2.weight",
                        (f"{p}experts.down_proj[{e}]",), ((f, h),),
                        lambda ts: ts[0].t().contiguous(), lambda t: [t.t().contiguous()], "experts"))
    if fs:
        s = p + "shared_expert."
        out.append(Rule(q + "shared_experts.linear_fc1.weight", (s + "gate_proj.weight", s + "up_proj.weight"),
                        ((fs, h), (fs, h)), _fc1, _split_fc1, "shared_expert"))
        out.append(Rule(q + "shared_experts.linear_fc2.weight", (s + "down_proj.weight",), ((h, fs),),
                        _same, _one, "shared_expert"))
    return out


def split_expert_name(name: str) -> Tuple[str, int]:
    """``...gate_up_proj[3]`` -> (``...gate_up_proj``, 3); plain names -> (name, -1)."""
    if name.endswith("]") and "[" in name:
        base, idx = name[:-1].split("[")
        return base, int(idx)
    return name, -1

