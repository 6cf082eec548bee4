"""LongReD's per-micro-batch losses and the trick that lets a pipeline stage add its own.

* ``cosine_distance``: 1 - cos(h_S, h_T) per token, averaged over the micro-batch's tokens
  (L_short on each selected layer and the last one; L_s2l on the last one). Hidden states are
  ``[s, b, h]`` and replicated over TP (no sequence parallelism), so the cosine is local.
* ``attention_kl``: KL(p_T || p_S) between the two models' attention distributions, per layer,
  for the layer selection and the drift diagnostics (small inputs: it forms [b, heads, s, s]).
* ``AttachLoss``: a pipeline stage before the last owns some selected layers; their loss is
  attached to the stage's output tensor so megatron-core's backward (which only sees the output
  and the gradient coming back from the next stage) also back-propagates it. megatron-core does
  the same for MoE auxiliary losses (``MoEAuxLossAutoScaler``) but keeps the scale in class
  state set by the schedule; ours takes no global state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``[s, b, h]`` x 2 -> scalar mean over tokens of 1 - cos (fp32). The teacher is detached.

    Computed as |u - v|^2 / 2 of the unit vectors (the same value): ``1 - cos`` in fp32 rounds
    every drift below ~6e-8 to exactly 0, this form keeps it.
    """
    u = F.normalize(student.float(), dim=-1, eps=1e-12)
    v = F.normalize(teacher.detach().float(), dim=-1, eps=1e-12)
    return 0.5 * (u - v).pow(2).sum(-1).mean()  # [s, b] -> scalar


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
    eps = 1e-12
    kl = (p_teacher * (torch.log(p_teacher + eps) - torch.log(p_student + eps))).sum(-1)  # [b, np, sq]
    return kl.mean()
