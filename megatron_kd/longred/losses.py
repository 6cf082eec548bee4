"""LongReD's per-micro-batch losses and the trick that lets a pipeline stage add its own.

* ``cosine_distance``: 1 - cos(h_S, h_T) per token, averaged over the micro-batch's tokens
  (L_short on each selected layer and the last one; L_s2l on the last one). Hidden states are
  ``[s, b, h]`` and replicated over TP (no sequence parallelism), so the cosine is local.
* ``attention_kl_by_document``: KL(p_T || p_S) between the two models' attention distributions,
  per layer, for the layer selection and the drift diagnostics. Computed one document at a time
  from the rotated q and k (a query only attends its own document), so a 128k window of 1k-token
  samples costs 128 blocks of [heads, 1k, 1k], never [b, heads, s, s]; under context parallelism
  the keys are gathered over the CP group first (no grad: selection only).
* Token weights (``token_weights``): the distillation losses are means over a micro-batch's real
  tokens. Under CP each rank holds part of the window (plus padding slots), so each rank sums
  its own tokens divided by the CP group's count; the CP ranks' gradients add up (megatron's DDP
  reduces over DP×CP) to the gradient of the whole window's mean.
* ``AttachLoss``: a pipeline stage before the last owns some selected layers; their loss is
  attached to the stage's output tensor so megatron-core's backward (which only sees the output
  and the gradient coming back from the next stage) also back-propagates it. megatron-core does
  the same for MoE auxiliary losses (``MoEAuxLossAutoScaler``) but keeps the scale in class
  state set by the schedule; ours takes no global state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_distance(student: Tensor, teacher: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """``[s, b, h]`` x 2 -> scalar mean over tokens of 1 - cos (fp32). The teacher is detached.
    ``weights`` ``[s, b]`` (``token_weights``): the weighted sum instead of the plain mean.

    Computed as |u - v|^2 / 2 of the unit vectors (the same value): ``1 - cos`` in fp32 rounds
    every drift below ~6e-8 to exactly 0, this form keeps it.
    """
    u = F.normalize(student.float(), dim=-1, eps=1e-12)
    v = F.normalize(teacher.detach().float(), dim=-1, eps=1e-12)
    d = 0.5 * (u - v).pow(2).sum(-1)  # [s, b]
    return d.mean() if weights is None else (d * weights).sum()


def token_weights(document_ids: Tensor, cp_group=None) -> Tensor:
    """``[b, s]`` document ids -> ``[s, b]`` fp32 weights: 1 / (real tokens of the whole window,
    over the CP group) for real tokens, 0 for CP padding slots (document id -1)."""
    from megatron_kd.data.cp_layout import PAD_DOCUMENT

    real = (document_ids != PAD_DOCUMENT).t().float()  # [s, b], hidden states' token order
    count = real.sum()
    if cp_group is not None:
        torch.distributed.all_reduce(count, group=cp_group)
    return real / count.clamp(min=1)


class AttachLoss(torch.autograd.Function):
    """Identity on ``x`` in forward; in backward also sends gradient 1 into ``loss``.

    So ``backward(out, grad)`` on a non-last pipeline stage computes grad·dout/dθ + dloss/dθ,
    exactly what the loss would get if it were added to the last stage's loss.
    """

    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor) -> Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


def attention_probs(query: Tensor, key: Tensor, attention_mask, softmax_scale: float) -> Tensor:
    """megatron-core core-attention inputs -> probabilities ``[b, heads, sq, sk]`` (fp32).

    query ``[sq, b, np, d]``, key ``[sk, b, ng, d]`` (already rotated), mask ``[b, 1, sq, sk]``
    bool with True = masked (None = causal). Recomputed from q and k so it works whatever the
    core-attention kernel (local or TE); a test checks it against the local spec's softmax.
    """
    q = query.float().permute(1, 2, 0, 3)  # [b, np, sq, d]
    k = key.float().permute(1, 2, 0, 3)  # [b, ng, sk, d]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale  # [b, np, sq, sk]
    if attention_mask is None:
        sq, sk = scores.shape[-2:]
        attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(1)
    scores = scores.masked_fill(attention_mask.bool(), float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention_kl(p_teacher: Tensor, p_student: Tensor) -> Tensor:
    """Mean over (batch, head, query) of KL(p_T || p_S); masked keys have p = 0 in both."""
    return _kl_rows(p_teacher, p_student).mean()


def _kl_rows(p_teacher: Tensor, p_student: Tensor) -> Tensor:
    eps = 1e-12
    return (p_teacher * (torch.log(p_teacher + eps) - torch.log(p_student + eps))).sum(-1)


def attention_kl_by_document(student_qk, teacher_qk, q_meta: Tensor, k_meta: Tensor,
                             softmax_scale: float):
    """(sum over batch, head and real query of KL(p_T || p_S), number of those rows).

    ``*_qk``: rotated (query ``[sq, b, np, d]``, key ``[sk, b, ng, d]``) of each model;
    ``q_meta`` ``[2, b, sq]`` / ``k_meta`` ``[2, b, sk]``: (document id, index in the window) of
    the queries and keys (the keys may be the CP group's, gathered). Query i attends key j iff
    same document and ``index_j <= index_i`` (DESIGN.md's rule); padding (document -1) is skipped.
    """
    from megatron_kd.data.cp_layout import PAD_DOCUMENT

    (qs, ks), (qt, kt) = student_qk, teacher_qk
    total = torch.zeros((), dtype=torch.float64, device=qs.device)
    rows = 0
    for b in range(qs.shape[1]):
        q_doc, q_idx = q_meta[0, b], q_meta[1, b]
        k_doc, k_idx = k_meta[0, b], k_meta[1, b]
        for doc in torch.unique(q_doc).tolist():
            if doc == PAD_DOCUMENT:
                continue
            qi = (q_doc == doc).nonzero(as_tuple=True)[0]
            kj = (k_doc == doc).nonzero(as_tuple=True)[0]
            masked = (k_idx[kj].unsqueeze(0) > q_idx[qi].unsqueeze(1))[None, None]  # [1, 1, nq, nk]
            p_s = attention_probs(qs[qi, b:b + 1], ks[kj, b:b + 1], masked, softmax_scale)
            p_t = attention_probs(qt[qi, b:b + 1], kt[kj, b:b + 1], masked, softmax_scale)
            total += _kl_rows(p_t, p_s).sum().double()
            rows += p_s.shape[1] * p_s.shape[2]  # [1, np, nq, nk]
    return total, rows
