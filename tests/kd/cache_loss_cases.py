"""Cases for test_teacher_cache.py's loss part: run in process (TP=1) or under torchrun
(cache_loss_worker.py, TP=2), every rank holding its vocab shard of the same full logits.

Per case, relative errors (max |x - ref| / max |ref|):
* ``entries``: kd/cache_topk.py's ids (must be identical: 0 or 1 mismatching), log-probs and
  tail mass vs a float64 top-k of the full logits;
* ``renorm``: the cached loss (renormalized) and its student gradient vs the *live* top-k loss
  (kd/losses.py) on the same batch, both from sharded logits (the issue's <= 1e-6);
* ``tail``: the k+1-bin loss and gradient vs a float64 autograd reference over the full vocab.
"""
from __future__ import annotations

import math

import torch

from megatron_kd.kd.cache_topk import teacher_top_k
from megatron_kd.kd.cached_loss import cached_kd_loss
from megatron_kd.kd.losses import vocab_parallel_kd_loss

V, V_PAD, B, S = 37, 40, 2, 5

CASES = [(div, t, k, top_p) for div in ("forward_kl", "reverse_kl", "jsd") for t in (1.0, 2.0)
         for k, top_p in ((3, None), (11, None), (37, None), (8, 0.6))]


def _rel(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, S, V_PAD, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, S, V_PAD, generator=g, dtype=torch.float64) * 3
    s[..., V:] = 1e4  # padding garbage must drop out
    t[..., V:] = 5e3
    return s, t


def _shard(x, rank, world):
    n = x.size(-1) // world
    return x[..., rank * n:(rank + 1) * n]


def _reference_entries(t, k, temperature, top_p):
    lp = torch.log_softmax(t[..., :V] / temperature, -1)
    vals, ids = torch.sort(lp, dim=-1, descending=True, stable=True)
    vals, ids = vals[..., :k], ids[..., :k]
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1.0)) if k < V else torch.full(vals.shape[:-1], -math.inf,
                                                                                      dtype=vals.dtype)
    if top_p is not None:
        before = torch.cat([torch.zeros_like(vals[..., :1]), vals.exp().cumsum(-1)[..., :-1]], -1)
        keep = before < top_p
        tail = torch.log1p(-torch.where(keep, vals.exp(), 0.0).sum(-1))
        vals, ids = torch.where(keep, vals, -math.inf), torch.where(keep, ids, -1)
    return ids, vals, tail


def _reference_tail_loss(student, ids, lq, lq_tail, temperature, divergence, beta=0.5):
    """float64 autograd: k + 1 bins from the full-vocab student distribution."""
    lp_all = torch.log_softmax(student[..., :V] / temperature, -1)
    slot = ids >= 0
    lp_k = torch.where(slot, lp_all.gather(-1, ids.clamp(min=0)), -math.inf)
    # add, not scatter: an unused slot (-1, clamped to id 0) must not overwrite a kept id 0
    in_k = torch.zeros_like(lp_all).scatter_add(-1, ids.clamp(min=0), slot.to(lp_all.dtype)) > 0
    lp_tail = torch.logsumexp(lp_all.masked_fill(in_k, -math.inf), -1)
    log_p = torch.cat([lp_k, lp_tail.unsqueeze(-1)], -1)
    log_q = torch.cat([torch.where(slot, lq, -math.inf), lq_tail.unsqueeze(-1)], -1)
    sup = torch.cat([slot, (lq_tail > -math.inf).unsqueeze(-1)], -1)  # k = V: no tail bin
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        terms = q * (log_q - log_p)
    elif divergence == "reverse_kl":
        terms = p * (log_p - log_q)
    else:
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1 - beta))
        terms = beta * q * (log_q - log_m) + (1 - beta) * p * (log_p - log_m)
    return torch.where(sup, terms, 0.0).sum(-1) * temperature ** 2


def run_case(case, tp_group, rank, world, seed) -> dict:
    divergence, temperature, k, top_p = case
    s_full, t_full = _logits(seed)
    out = {}
    ids, logp, tail = teacher_top_k(_shard(t_full, rank, world).float(), tp_group=tp_group, vocab_size=V,
                                    top_k=k, temperature=temperature, top_p=top_p)
    rids, rlogp, rtail = _reference_entries(t_full, k, temperature, top_p)
    out["entries_id_mismatch"] = float((ids != rids).sum())
    fin = rlogp > -math.inf
    out["entries_logp"] = _rel(torch.where(fin, logp.double(), 0.0), torch.where(fin, rlogp, 0.0))
    if k < V:
        out["entries_tail"] = _rel(tail, rtail)

    common = dict(tp_group=tp_group, vocab_size=V, temperature=temperature, divergence=divergence)
    # live top-k vs cached renormalized, same batch (top-p's padded slots have no live analogue)
    if top_p is None:
        cache_t = 1.0  # cached at T=1, trained at T: the renormalized loss rescales
        cids, clogp, ctail = teacher_top_k(_shard(t_full, rank, world).float(), tp_group=tp_group,
                                           vocab_size=V, top_k=k, temperature=cache_t)
        s1 = _shard(s_full, rank, world).float().requires_grad_()
        live = vocab_parallel_kd_loss(s1, _shard(t_full, rank, world).float(), top_k=k, **common)
        live.sum().backward()
        s2 = _shard(s_full, rank, world).float().requires_grad_()
        cached = cached_kd_loss(s2, cids, clogp, ctail, loss="renormalized", cache_temperature=cache_t, **common)
        cached.sum().backward()
        out["renorm_loss"] = _rel(cached, live)
        out["renorm_grad"] = _rel(s2.grad, s1.grad)
    # k + 1 bins vs the float64 reference
    s3 = _shard(s_full, rank, world).float().requires_grad_()
    loss = cached_kd_loss(s3, ids, logp, tail, loss="tail", cache_temperature=temperature, **common)
    loss.sum().backward()
    sref = s_full.clone().requires_grad_()
    ref = _reference_tail_loss(sref, rids, rlogp, rtail, temperature, divergence)
    ref.sum().backward()
    out["tail_loss"] = _rel(loss, ref)
    out["tail_grad"] = _rel(s3.grad, _shard(sref.grad, rank, world))
    out["padding_grad_abs"] = float(_shard(sref.grad, rank, world)[..., max(0, V - rank * (V_PAD // world)):].abs().sum()
                                    + s3.grad[..., max(0, V - rank * (V_PAD // world)):].abs().sum())
    return out


# under torchrun: T = 2 only (each case costs a few collectives; 12 cases ~3 s of 2 ranks)
TP2_CASES = [c for c in CASES if c[1] == 2.0]


def run_all(tp_group, rank, world, cases=CASES) -> dict:
    return {f"{d}/T{t}/k{k}/p{p}": run_case((d, t, k, p), tp_group, rank, world, seed=CASES.index((d, t, k, p)))
            for d, t, k, p in cases}
