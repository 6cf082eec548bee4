"""Reference ring attention over the context-parallel group, for megatron-core's local spec.

megatron-core 0.16.1's ``DotProductAttention`` asserts ``context_parallel_size == 1`` (CP is
TE-only there). This module takes its place in the local layer spec when CP > 1, so context
parallelism runs — and is tested — on the CPU with gloo. It is a reference, not a kernel: plain
fp32 matmuls, one K/V block at a time. Hand-written because no library offers a CPU ring
attention with document masks over a torch.distributed group (TE's is CUDA-only; torch's
``context_parallel`` needs DTensor/SDPA and has no document masks).

Each CP rank holds its own queries and one K/V block of the sequence at a time. Forward: for
``i = 0..CP−1`` the rank attends its queries to the block that started on rank ``r−i``, merges the
partial result with the running one by log-sum-exp (online softmax), and passes the block (with
its tokens' document ids and window indices) to rank ``r+1``. Backward does the same ring again,
recomputing each block's probabilities from the saved log-sum-exp, and the block's dK/dV
accumulators travel with it; after ``CP`` hops they are back on the block's owner. No rank ever
holds more than two K/V blocks (the one in use and the one arriving).

The mask is computed per block pair from each token's (document id, window index): query i sees
key j iff same document and ``index(j) <= index(i)`` — the DESIGN.md rule, independent of how
the CP layout ordered the tokens. GQA: queries ``[sq, b, np, hn]`` are viewed as
``[b, ng, np/ng, sq, hn]`` against keys ``[b, ng, 1, sk, hn]`` (megatron's head grouping, the
same as its ``repeat_interleave``); heads are already split by TP when they arrive here.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from megatron.core.transformer.module import MegatronModule

_TAG_KV, _TAG_META, _TAG_GRAD = 11, 12, 13


class _Ring:
    """Pass tensors to the next CP rank, receive from the previous one (gloo/NCCL p2p)."""

    def __init__(self, group, ranks: List[int]):
        self.group = group
        me = torch.distributed.get_rank()
        i = ranks.index(me)
        self.next, self.prev = ranks[(i + 1) % len(ranks)], ranks[(i - 1) % len(ranks)]

    def start(self, tensors, tag):
        """Post send of each tensor to next and a receive of the same shape from prev. Batched on
        NCCL (which needs it to pair sends and receives); separate tagged ops under gloo (see
        platform.batch_p2p_comm)."""
        from megatron_kd import platform

        p2p, recv = [], []
        for k, t in enumerate(tensors):
            t = t.contiguous()
            r = torch.empty_like(t)
            p2p.append(torch.distributed.P2POp(torch.distributed.isend, t, self.next, self.group, tag + 100 * k))
            p2p.append(torch.distributed.P2POp(torch.distributed.irecv, r, self.prev, self.group, tag + 100 * k))
            recv.append(r)
        if platform.batch_p2p_comm():
            return torch.distributed.batch_isend_irecv(p2p), recv
        return [op.op(op.tensor, op.peer, group=op.group, tag=op.tag) for op in p2p], recv

    @staticmethod
    def finish(pending):
        ops, recv = pending
        for op in ops:
            op.wait()
        return recv


def _allowed(q_meta: Tensor, k_meta: Tensor) -> Tensor:
    """[2, b, sq] x [2, b, sk] (document id, window index) -> bool [b, 1, 1, sq, sk]."""
    same_doc = q_meta[0][:, :, None] == k_meta[0][:, None, :]
    causal = k_meta[1][:, None, :] <= q_meta[1][:, :, None]
    return (same_doc & causal)[:, None, None]


def _block_forward(q, k, v, allowed, scale):
    """One block: (output normalised within the block, its log-sum-exp); rows with no allowed
    key get output 0 and lse −inf. q [b,g,r,sq,d], k/v [b,g,1,sk,d]."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, g, r, sq, sk]
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)  # masked -> 0
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / l.clamp(min=torch.finfo(l.dtype).tiny)
    return out, m + torch.log(l)  # log(0) = -inf for empty rows


def _merge(out, lse, out_b, lse_b):
    """Online-softmax merge of two partial results over disjoint key sets."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_a = torch.where(torch.isinf(lse), torch.zeros_like(lse), torch.exp(lse - safe))
    w_b = torch.where(torch.isinf(lse_b), torch.zeros_like(lse_b), torch.exp(lse_b - safe))
    return out * w_a + out_b * w_b, new


class RingAttentionFunction(torch.autograd.Function):
    """q [b,g,r,sq,d], k/v [b,g,1,sk,d] (fp32), metas [2,b,s] -> out [b,g,r,sq,d]."""

    @staticmethod
    def forward(ctx, q, k, v, q_meta, k_meta, scale, group, ranks):
        ring = _Ring(group, ranks)
        n = len(ranks)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
        kv, meta = torch.stack([k, v]), k_meta
        for step in range(n):
            pending = ring.start([kv, meta], _TAG_KV) if step < n - 1 else None
            allowed = _allowed(q_meta, meta)
            if bool(allowed.any()):  # skip block pairs the mask rules out entirely
                out_b, lse_b = _block_forward(q, kv[0], kv[1], allowed, scale)
                out, lse = _merge(out, lse, out_b, lse_b)
            if pending is not None:
                kv, meta = ring.finish(pending)
        ctx.save_for_backward(q, k, v, q_meta, k_meta, out, lse)
        ctx.scale, ctx.group, ctx.ranks = scale, group, ranks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, q_meta, k_meta, out, lse = ctx.saved_tensors
        scale, ring, n = ctx.scale, _Ring(ctx.group, ctx.ranks), len(ctx.ranks)
        dout = dout.contiguous()
        delta = (dout * out).sum(dim=-1, keepdim=True)  # [b, g, r, sq, 1]
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        dq = torch.zeros_like(q)
        kv, meta = torch.stack([k, v]), k_meta
        dkv = torch.zeros_like(kv)  # accumulators of the block in hand; travel with it
        for step in range(n):
            pending = ring.start([kv, meta], _TAG_KV) if step < n - 1 else None
            allowed = _allowed(q_meta, meta)
            if bool(allowed.any()):
                kb, vb = kv[0], kv[1]
                s = torch.matmul(q, kb.transpose(-1, -2)) * scale
                p = torch.exp(s - lse_safe).masked_fill(~allowed, 0.0)  # [b, g, r, sq, sk]
                dkv[1] += torch.matmul(p.transpose(-1, -2), dout).sum(dim=2, keepdim=True)
                ds = p * (torch.matmul(dout, vb.transpose(-1, -2)) - delta)
                dq += torch.matmul(ds, kb) * scale
                dkv[0] += torch.matmul(ds.transpose(-1, -2), q).sum(dim=2, keepdim=True) * scale
            # the gradient of the block in hand goes where the block goes; after n hops home
            grads = ring.finish(ring.start([dkv], _TAG_GRAD))[0]
            if pending is not None:
                kv, meta = ring.finish(pending)
            dkv = grads
        return dq, dkv[0], dkv[1], None, None, None, None, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, meta: Tensor, scale: float,
                   group, ranks: List[int]) -> Tensor:
    """megatron layouts: query [sq, b, np, hn], key/value [sk, b, ng, hn], meta [2, b, s]
    (document id, window index) -> context [sq, b, np·hn] in the query's dtype."""
    sq, b, np_, hn = query.shape
    ng = key.shape[2]
    q = query.float().reshape(sq, b, ng, np_ // ng, hn).permute(1, 2, 3, 0, 4)  # [b, g, r, sq, d]
    k = key.float().permute(1, 2, 0, 3).unsqueeze(2)  # [b, g, 1, sk, d]
    v = value.float().permute(1, 2, 0, 3).unsqueeze(2)
    out = RingAttentionFunction.apply(q, k, v, meta, meta, scale, group, ranks)
    return out.permute(3, 0, 1, 2, 4).reshape(sq, b, np_ * hn).to(query.dtype)


class RingAttention(MegatronModule):
    """Drop-in ``core_attention`` for the local spec when CP > 1 (megatron-core 0.16.1's
    ``DotProductAttention`` constructor and forward signature). ``attention_mask`` is not a
    dense mask here but the ``[2, b, s_local]`` (document id, window index) of this rank's
    tokens (:func:`megatron_kd.models.attention.attention_mask_for_batch` builds it)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core import parallel_state as ps

        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if cp_comm_type not in (None, "p2p"):
            raise ValueError(f"ring attention implements cp_comm_type 'p2p' only, got {cp_comm_type!r}")
        self.layer_number = max(1, layer_number)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.group = ps.get_context_parallel_group()
        self.ranks = list(ps.get_context_parallel_global_ranks())

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.training and self.dropout:
            raise ValueError("ring attention has no attention dropout (set attention_dropout: 0)")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("ring attention takes neither packed_seq_params nor attention_bias")
        if attention_mask is None or attention_mask.dtype != torch.long or attention_mask.dim() != 3:
            raise ValueError("ring attention needs the [2, b, s] (document id, window index) tensor "
                             "as attention_mask (models.attention.attention_mask_for_batch)")
        return ring_attention(query, key, value, attention_mask, self.softmax_scale, self.group,
                              self.ranks)
