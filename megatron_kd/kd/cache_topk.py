"""The teacher's top-k entries from its TP vocab shards: what the offline cache stores per token.

Chosen shard-wise as the live top-k loss does (kd/losses.py ``teacher_top_k_support``): each rank
offers its own top-min(k, v/tp) values, only those ``[*, k_local * tp]`` values and their ids are
all-gathered, never the logits. The normaliser and the tail mass need one MAX (the top value is
already known from the gather) and one SUM all-reduce of two per-token sums.

Order of the k entries: descending log-prob, exact ties by ascending id (a stable sort over the
candidates in id order), so the same logits give the same files at every TP size. A tie between
more ids than one shard offers is resolved by that shard's ``torch.topk``; the live loss keeps all
ids tied at the k-th value (|K| >= k), the cache exactly k: they agree whenever the k-th value is
not tied (fp32 logits of a trained model; bf16 teacher logits tie more often, see docs/design.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_kd.kd.losses import VocabParallelKD, _group_rank, _group_size


def _gather_last(t: torch.Tensor, group) -> torch.Tensor:
    """[*, n] on every rank -> [*, n * tp] in rank order."""
    if _group_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_group_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def teacher_top_k(teacher_logits: torch.Tensor, *, tp_group, vocab_size: int, top_k: int,
                  temperature: float = 1.0, top_p: Optional[float] = None):
    """``[*, V_pad/TP]`` teacher logits shard -> ``(ids [*, k] int64, logp [*, k] fp32, tail [*] fp32)``.

    ``logp``: ``log softmax(z / T)`` over the true vocab at the kept ids; ``tail``: the log of the
    mass of every other (unpadded) id. With ``top_p``: the smallest prefix of the top-k whose mass
    reaches ``top_p`` (at most k), the other slots id -1 / log-prob -inf, their mass moved into the
    tail. Replicated on every rank of ``tp_group``.
    """
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    steps = VocabParallelKD
    shard = teacher_logits.size(-1)
    rank = _group_rank(tp_group)
    valid = steps.valid_vocab_mask(shard, rank, vocab_size, teacher_logits.device)  # [v/tp]
    scaled = steps.scaled_logits(teacher_logits, valid, temperature)  # [*, v/tp] fp32, padding -inf

    k_local = min(top_k, shard)
    vals, local_ids = torch.topk(scaled, k_local, dim=-1)  # [*, k_local]
    cand_vals = _gather_last(vals, tp_group)  # [*, k_local * tp]
    cand_ids = _gather_last(local_ids + rank * shard, tp_group)
    by_id = torch.argsort(cand_ids, dim=-1)  # id order first, so the stable sort breaks ties by id
    cand_vals, cand_ids = cand_vals.gather(-1, by_id), cand_ids.gather(-1, by_id)
    order = torch.sort(cand_vals, dim=-1, descending=True, stable=True).indices[..., :top_k]
    top_vals, ids = cand_vals.gather(-1, order), cand_ids.gather(-1, order)  # [*, k]
    global_max = top_vals[..., 0]  # [*]: the largest value is among every rank's candidates

    # Which of this shard's ids are kept: [*, v/tp] bool (scatter of the in-shard ids).
    lo = rank * shard
    in_shard = (ids >= lo) & (ids < lo + shard)
    kept = torch.zeros_like(scaled, dtype=torch.int32).scatter_add_(  # add: clamped foreign ids add 0
        -1, (ids - lo).clamp(0, shard - 1), in_shard.to(torch.int32)) > 0
    shifted = (scaled - global_max.unsqueeze(-1)).exp()  # [*, v/tp], 0 on padding
    sums = torch.stack([shifted.sum(-1), torch.where(kept, 0.0, shifted).sum(-1)])  # [2, *] all, tail
    steps.all_reduce(sums, dist.ReduceOp.SUM, tp_group)
    log_z = sums[0].log()
    logp = top_vals - global_max.unsqueeze(-1) - log_z.unsqueeze(-1)  # [*, k]
    tail = sums[1].log() - log_z  # [*], -inf when k covers the whole vocab

    if top_p is not None:
        mass = logp.exp().cumsum(-1)  # [*, k]
        # keep slot j iff the mass before it is < p: the smallest prefix reaching p
        before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)
        keep = before < top_p
        dropped = torch.where(keep, -math.inf, logp)
        tail = torch.logsumexp(torch.cat([tail.unsqueeze(-1), dropped], dim=-1), dim=-1)
        logp = torch.where(keep, logp, -math.inf)
        ids = torch.where(keep, ids, -1)
    return ids, logp, tail
