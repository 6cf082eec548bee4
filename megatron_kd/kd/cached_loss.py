"""KD loss against cached teacher top-k entries, from TP-sharded student logits.

The teacher is no longer a logits tensor but, per token, k ids, their log-probs and the log-mass of
everything else (kd/cache_topk.py). Two targets over "bins":

* ``tail`` (default, ``kd.cache_loss``): k + 1 bins, the k ids and one bin for the rest of the
  vocabulary, for teacher and student alike. Both sides sum to 1, so the divergence is a proper
  KL (or JSD) between two distributions over k + 1 outcomes, and the student is also pushed to
  put the right total mass outside the teacher's top-k. Needs ``kd.temperature`` equal to the
  cache's (the tail mass of another temperature cannot be recovered from k values).
* ``renormalized``: the k bins only, the teacher renormalised over them and the student kept
  normalised over the full vocab: exactly the live loss with ``kd.top_k`` (kd/losses.py), so a
  cached run is a drop-in for a live top-k run (equal to <= 1e-6, tests/kd/test_teacher_cache.py).
  Works at any temperature: ``softmax(z / T)`` renormalised over K is ``softmax((T_c / T) log
  p_c)`` over K for log-probs ``log p_c`` cached at ``T_c``.

Student side, per token, the named steps of the live loss (no logits gathered): local max ->
all-reduce MAX -> local sum-exp over all ids and over ids outside K -> all-reduce SUM -> the
student's logits at the k ids (each rank contributes the ids of its shard) -> all-reduce SUM.
The divergence over the bins then is replicated on every rank. Backward needs no collective: with
``H_b = p_b dD/dp_b`` over the bins (kd/losses.py's ``divergence_grad_terms``),
``dD/ds_j = H_{bin(j)} [j in K] + H_tail p_j / p_tail [j not in K] - p_j sum_b H_b``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_kd.kd.losses import DIVERGENCES, VocabParallelKD, _group_rank, _group_size

CACHE_LOSSES = ("tail", "renormalized")


class _CachedKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, ids, logp, tail, tp_group, vocab_size, temperature, scale,
                divergence, beta, tail_bin, teacher_ratio):
        steps = VocabParallelKD
        shard = student_logits.size(-1)
        rank = _group_rank(tp_group)
        lo = rank * shard
        valid = steps.valid_vocab_mask(shard, rank, vocab_size, student_logits.device)
        s = steps.scaled_logits(student_logits, valid, temperature)  # [*, v/tp] fp32

        slot = ids >= 0  # [*, k] used slots (top-p pads with -1)
        in_shard = slot & (ids >= lo) & (ids < lo + shard)
        local = (ids - lo).clamp(0, shard - 1)  # [*, k]
        # [*, v/tp]; scatter_add: another shard's ids are clamped onto this shard's ends and add 0
        kept = torch.zeros_like(s, dtype=torch.int32).scatter_add_(-1, local, in_shard.to(torch.int32)) > 0

        logits_max = steps.local_max(s, valid.expand(s.shape))  # [*]
        steps.all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
        e = (s - logits_max.unsqueeze(-1)).exp()  # [*, v/tp], 0 on padding
        at_k = torch.where(in_shard, s.gather(-1, local), 0.0)  # [*, k] this shard's share
        stats = torch.cat([torch.stack([e.sum(-1), torch.where(kept, 0.0, e).sum(-1)], dim=-1), at_k],
                          dim=-1)  # [*, 2 + k]: sum-exp, tail sum-exp, s at K
        steps.all_reduce(stats, dist.ReduceOp.SUM, tp_group)
        log_z = stats[..., 0].log()  # [*] (relative to the max)
        tail_sum = stats[..., 1]
        log_tail_sum = torch.where(tail_sum > 0, tail_sum.log(), 0.0)
        lp_k = torch.where(slot, stats[..., 2:] - logits_max.unsqueeze(-1) - log_z.unsqueeze(-1),
                           -math.inf)  # [*, k] student log-probs at K

        lq_k = logp.float().masked_fill(~slot, -math.inf)
        if tail_bin:
            lp_tail = torch.where(tail_sum > 0, log_tail_sum - log_z, -math.inf)
            lq_tail = tail.float()
            log_p = torch.cat([lp_k, lp_tail.unsqueeze(-1)], dim=-1)  # [*, k + 1]
            log_q = torch.cat([lq_k, lq_tail.unsqueeze(-1)], dim=-1)
            support = torch.cat([slot, ((lq_tail > -math.inf) & (tail_sum > 0)).unsqueeze(-1)], dim=-1)
        else:
            scaled_q = lq_k * teacher_ratio
            log_q = scaled_q - torch.logsumexp(scaled_q, dim=-1, keepdim=True)
            log_p, support = lp_k, slot
        log_q = log_q.masked_fill(~support, -math.inf)
        loss = steps.partial_divergence(log_p, log_q, support, divergence, beta)  # [*] whole D

        ctx.save_for_backward(s, logits_max, log_z, log_tail_sum, kept, local, in_shard, log_p, log_q,
                              support)
        ctx.tail_bin, ctx.divergence, ctx.beta = tail_bin, divergence, beta
        ctx.grad_scale, ctx.dtype = scale / temperature, student_logits.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        s, logits_max, log_z, log_tail_sum, kept, local, in_shard, log_p, log_q, support = ctx.saved_tensors
        h_p, _ = VocabParallelKD.divergence_grad_terms(log_p, log_q, support, ctx.divergence, ctx.beta)
        shifted = s - logits_max.unsqueeze(-1)  # [*, v/tp]
        p = (shifted - log_z.unsqueeze(-1)).exp()  # student probabilities, 0 on padding
        grad = -p * h_p.sum(-1, keepdim=True)
        k = local.size(-1)
        grad = grad.scatter_add(-1, local, torch.where(in_shard, h_p[..., :k], 0.0))
        if ctx.tail_bin:  # H_tail * p_j / p_tail for ids outside K
            outside = (shifted - log_tail_sum.unsqueeze(-1)).exp()
            grad = grad + torch.where(kept, 0.0, outside) * h_p[..., k:]
        grad = grad * (grad_output.float() * ctx.grad_scale).unsqueeze(-1)
        return (grad.to(ctx.dtype),) + (None,) * 11


def cached_kd_loss(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor,
                   tail: torch.Tensor, *, tp_group, vocab_size: int, temperature: float = 1.0,
                   scale_by_t_squared: bool = True, divergence: str = "forward_kl", beta: float = 0.5,
                   top_k: Optional[int] = None, loss: str = "tail",
                   cache_temperature: float = 1.0) -> torch.Tensor:
    """Per-token KD loss ``[*]`` (fp32, replicated over ``tp_group``) from this rank's student
    logits shard ``[*, V_pad/TP]`` and the cached ``ids``/``logp`` ``[*, k]`` and ``tail`` ``[*]``.

    ``top_k``: use only the first ``top_k <= k`` cached entries (they are sorted), their mass moved
    to the tail. ``loss``: ``"tail"`` (k + 1 bins) or ``"renormalized"`` (= the live top-k loss).
    ``cache_temperature``: the T the log-probs were cached at.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if loss not in CACHE_LOSSES:
        raise ValueError(f"loss must be one of {CACHE_LOSSES}, got {loss!r}")
    if ids.shape != logp.shape or ids.shape[:-1] != student_logits.shape[:-1] or tail.shape != ids.shape[:-1]:
        raise ValueError(f"cached entries ids {tuple(ids.shape)}, logp {tuple(logp.shape)}, tail "
                         f"{tuple(tail.shape)} do not match student logits {tuple(student_logits.shape)}")
    padded = student_logits.size(-1) * _group_size(tp_group)
    if not 1 <= vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, V_pad={padded}]")
    if loss == "tail" and not math.isclose(temperature, cache_temperature):
        raise ValueError(f"the tail-bin loss needs the cache's temperature {cache_temperature}, got "
                         f"{temperature} (use loss='renormalized' for another temperature)")
    ids = ids.long()
    if top_k is not None and top_k < ids.size(-1):
        dropped = logp[..., top_k:].float()
        tail = torch.logsumexp(torch.cat([tail.float().unsqueeze(-1), dropped], dim=-1), dim=-1)
        ids, logp = ids[..., :top_k], logp[..., :top_k]
    scale = temperature ** 2 if scale_by_t_squared else 1.0
    return _CachedKDLoss.apply(student_logits, ids, logp, tail, tp_group, vocab_size, float(temperature),
                               float(scale), divergence, float(beta), loss == "tail",
                               float(cache_temperature) / float(temperature))
