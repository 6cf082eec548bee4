"""Vocab-parallel logit distillation loss: the exact (unfused) reference implementation.

Every TP rank holds a vocab shard of the student and teacher logits, ``[..., V_pad/TP]``; shard r
covers global ids ``[r * V_pad/TP, (r+1) * V_pad/TP)``. Ids ``>= vocab_size`` (the tokenizer's
true V) are megatron's padding: they are excluded (-inf) from both softmaxes, whatever garbage
the output layer wrote there. The full logits are never gathered: per token, only a max, a
sum-exp and a partial divergence cross ranks (and, for ``top_k``, k values per rank).

Definitions, per token, with ``p = softmax(z / T)`` over the unpadded vocab:

* ``p_S``: the student distribution.
* ``q``: the teacher target. Without ``top_k``, ``q = p_T``. With ``top_k = k``, the support ``K``
  is the teacher's global top-k: every unpadded id whose teacher logit is ``>=`` the k-th largest
  teacher logit (ties at the threshold are all kept, so ``|K| >= k``, and ``|K| == k`` unless
  logits tie exactly -- this makes the support independent of the TP layout, unlike
  ``torch.topk``'s arbitrary tie-breaking); ``q = softmax(z_T / T)`` renormalised over ``K``
  (0 outside). ``p_S`` stays normalised over the full unpadded vocab. The divergence below is
  summed over ``K`` only (without ``top_k``, ``K`` = the unpadded vocab); the teacher logits
  outside ``K`` get no gradient (the selection is piecewise constant).
* ``forward_kl``: ``KL(q || p_S) = sum_K q (log q - log p_S)``   (Hinton KD; the default).
* ``reverse_kl``: ``sum_K p_S (log p_S - log q)``                 (``= KL(p_S || p_T)`` without top-k).
* ``jsd`` (generalised Jensen-Shannon, weight ``beta``), TRL's ``generalized_jsd_loss`` and
  Liger-Kernel's JSD convention, so a recipe ported from them means the same loss::

      m      = beta * q + (1 - beta) * p_S
      JSD_b  = beta * sum_K q (log q - log m)  +  (1 - beta) * sum_K p_S (log p_S - log m)

  ``beta = 0.5`` is the usual JSD. The expression tends to 0 at both ends (m becomes p_S or q), so,
  as they do, ``beta = 0`` *is* ``forward_kl`` and ``beta = 1`` *is* ``reverse_kl`` (special-cased).
  (Sessions before 7 weighted the two terms the other way round, which is continuous at the ends
  but gives a different loss under the same name for 0 < beta < 1, beta != 0.5.)

The per-token loss is ``T**2 * D`` (``scale_by_t_squared``, Hinton's gradient-scale correction)
or ``D``, in fp32, replicated on every TP rank (like megatron's vocab-parallel CE).

Gradients come from an explicit backward (no autograd through collectives): treating ``p_S``
and ``q`` as free, let ``H^p_j = p_j * dD/dp_j`` and ``H^q_j = q_j * dD/dq_j`` (elementwise, in
log space so underflowing probabilities stay finite); the softmax Jacobian then gives::

    dD/d(z_S_j / T) = H^p_j - p_S_j * sum_i H^p_i        dD/d(z_T_j / T) = H^q_j - q_j * sum_i H^q_i

which needs one more all-reduce SUM of the two per-token sums. For forward KL this is the
familiar ``d loss / d z_S = scale / T * (p_S - q)``. The per-token loss is replicated, so the
incoming gradient is the full gradient on every rank and each rank returns the gradient of its
own shard (megatron's ``reduce_from_tensor_model_parallel_region`` convention).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


class VocabParallelKD:
    """The named steps of the vocab-parallel KD loss, shared by all divergences.

    Shapes: ``[*, v/tp]`` is one rank's vocab shard, ``[*]`` one value per token, and
    ``[2, *]`` a student/teacher pair of per-token values reduced in one collective.
    """

    @staticmethod
    def valid_vocab_mask(shard_size: int, rank: int, vocab_size: int, device) -> torch.Tensor:
        """[v/tp] bool: True for this shard's ids below the true vocab size (not padding)."""
        global_ids = torch.arange(rank * shard_size, (rank + 1) * shard_size, device=device)
        return global_ids < vocab_size

    @staticmethod
    def valid_count(shard_size: int, rank: int, vocab_size: int) -> int:
        """How many of this shard's ids are below the true vocab size (padding is a suffix)."""
        return max(0, min(shard_size, vocab_size - rank * shard_size))

    @staticmethod
    def scaled_valid(logits: torch.Tensor, n_valid: int, temperature: float) -> torch.Tensor:
        """[*, v/tp] any dtype -> fp32 ``z / T`` of the unpadded columns ``[*, nv]``.

        A view of the input (no copy) when it is already fp32 and T = 1: nothing here writes to it.
        """
        valid = logits[..., :n_valid]
        if valid.dtype == torch.float32 and temperature == 1.0:
            return valid
        return valid.float().div_(temperature) if valid.dtype != torch.float32 else valid / temperature

    @staticmethod
    def pad_to_shard(grad: torch.Tensor, shard_size: int, dtype: torch.dtype) -> torch.Tensor:
        """[*, nv] gradient of the unpadded columns -> [*, v/tp] in ``dtype``, 0 on the padding."""
        if grad.size(-1) == shard_size:
            return grad.to(dtype)
        out = grad.new_zeros(*grad.shape[:-1], shard_size, dtype=dtype)
        out[..., :grad.size(-1)] = grad
        return out

    @staticmethod
    def log_softmax_shards(scaled, group):
        """[[*, nv] fp32, ...] -> log-probabilities over the whole TP group's vocab, one per input.

        Each shard runs torch's fused ``log_softmax`` (one cache-resident kernel per row,
        ``(z - m_r) - log S_r``) and shares only its row max ``m_r`` and ``log S_r`` (read back
        from the log-probs as ``-max``): one all-gather for all inputs. The global correction
        ``c_r = (m_r - M) + log S_r - log S`` is added last, so the rounding stays that of
        ``(z - max) - log sumexp`` (it never forms ``max + log sumexp``: see ``log_softmax``).
        """
        outs = [torch.log_softmax(x, dim=-1) for x in scaled]
        if _group_size(group) == 1:
            return outs
        local = torch.stack([st for x, lp in zip(scaled, outs)
                             for st in VocabParallelKD.softmax_stats(x, lp)])  # [2 * inputs, *]
        for lp, c in zip(outs, VocabParallelKD.tp_corrections(local, group)):
            lp.add_(c.unsqueeze(-1))
        return outs

    @staticmethod
    def softmax_stats(scaled: torch.Tensor, log_prob: torch.Tensor):
        """[*, nv] -> ([*] row max m_r, [*] log S_r): what a shard shares of its log-softmax."""
        if scaled.size(-1) == 0:  # a shard of padding only: it holds no probability
            return scaled.new_full(scaled.shape[:-1], -math.inf), scaled.new_zeros(scaled.shape[:-1])
        return scaled.amax(dim=-1), log_prob.amax(dim=-1).neg_()

    @staticmethod
    def tp_corrections(local: torch.Tensor, group):
        """[2k, *] stacked (m_r, log S_r) pairs of k inputs -> k per-row corrections ``c_r`` [*]
        that turn shard-local log-probabilities into global ones: one all-gather for all."""
        gathered = [torch.empty_like(local) for _ in range(_group_size(group))]
        dist.all_gather(gathered, local.contiguous(), group=group)
        allstats = torch.stack(gathered)  # [tp, 2k, *]
        out = []
        for i in range(local.size(0) // 2):
            m, log_s = allstats[:, 2 * i], allstats[:, 2 * i + 1]  # [tp, *]
            top = m.amax(dim=0)  # [*]
            log_total = torch.logsumexp((m - top) + log_s, dim=0)  # log S relative to the top
            out.append(local[2 * i] - top + local[2 * i + 1] - log_total)
        return out

    @staticmethod
    def student_teacher_log_probs(student_logits, teacher_logits, n_valid: int, vocab_size: int,
                                  temperature: float, top_k: Optional[int], group):
        """[*, v/tp] logit shards -> (log p_S, log q, support or None), each [*, nv] (unpadded).

        Without top-k one all-gather serves both log-softmaxes. With top-k (the rare path) the
        teacher is handled on the whole padded shard, so every rank has the same widths in the
        top-k all-gather, and ``q`` is renormalised over the support.
        """
        steps = VocabParallelKD
        student = steps.scaled_valid(student_logits, n_valid, temperature)  # [*, nv] fp32
        if top_k is None:
            teacher = steps.scaled_valid(teacher_logits, n_valid, temperature)
            log_p, log_q = steps.log_softmax_shards([student, teacher], group)
            return log_p, log_q, None
        (log_p,) = steps.log_softmax_shards([student], group)
        valid = steps.valid_vocab_mask(teacher_logits.size(-1), _group_rank(group), vocab_size,
                                       teacher_logits.device)
        teacher = steps.scaled_logits(teacher_logits, valid, temperature)  # [*, v/tp], pad -inf
        support = steps.teacher_top_k_support(teacher, valid, top_k, group)
        log_q = steps.masked_log_softmax(teacher, support, group)[..., :n_valid]
        return log_p, log_q, support[..., :n_valid]

    @staticmethod
    def masked_log_softmax(scaled: torch.Tensor, support: torch.Tensor, group) -> torch.Tensor:
        """[*, nv] log-probabilities normalised over a support (e.g. the teacher's top-k) that
        may leave a shard's row empty: the max / sum-exp steps with -inf outside it."""
        logits_max = VocabParallelKD.local_max(scaled, support)
        VocabParallelKD.all_reduce(logits_max, dist.ReduceOp.MAX, group)
        sum_exp = VocabParallelKD.local_sum_exp(scaled, support, logits_max)
        VocabParallelKD.all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        return VocabParallelKD.log_softmax(scaled, support, logits_max, sum_exp)

    @staticmethod
    def forward_kl(q: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor,
                   support: Optional[torch.Tensor]) -> torch.Tensor:
        """[*, nv] -> [*]: this shard's ``sum_K q (log q - log p)``. Consumes ``log_q`` (the
        difference is formed in its storage) and sums by a batched dot: no temporary at all."""
        diff = log_q.sub_(log_p)
        if support is not None:  # outside K: q = 0 and log q = -inf (0 * -inf = nan)
            diff.masked_fill_(~support, 0.0)
        rows, nv = math.prod(q.shape[:-1]), q.size(-1)
        return torch.bmm(q.reshape(rows, 1, nv), diff.reshape(rows, nv, 1)).reshape(q.shape[:-1])

    @staticmethod
    def scaled_logits(logits: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
        """[*, v/tp] any dtype -> fp32 ``z / T`` with padding at -inf (so it drops out of every sum)."""
        return (logits.float() / temperature).masked_fill(~valid, -math.inf)

    @staticmethod
    def teacher_top_k_support(teacher: torch.Tensor, valid: torch.Tensor, top_k: Optional[int],
                              group) -> torch.Tensor:
        """[*, v/tp] bool: the teacher's global top-k (ties at the k-th value kept), or all valid ids.

        Each shard contributes its own top-min(k, v/tp) values; the global k-th largest is among
        those ``[*, k_local * tp]`` values, so only they are all-gathered, never the logits.
        """
        if top_k is None:
            return valid.expand(teacher.shape)
        k_local = min(top_k, teacher.size(-1))
        local_top = torch.topk(teacher, k_local, dim=-1).values  # [*, k_local], padding is -inf
        if _group_size(group) > 1:
            gathered = [torch.empty_like(local_top) for _ in range(_group_size(group))]
            dist.all_gather(gathered, local_top.contiguous(), group=group)
            local_top = torch.cat(gathered, dim=-1)  # [*, k_local * tp]
        # k <= vocab_size <= (unpadded ids available), so the threshold is finite.
        threshold = torch.topk(local_top, top_k, dim=-1).values[..., -1:]  # [*, 1]
        return valid & (teacher >= threshold)

    @staticmethod
    def local_max(scaled: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """[*, v/tp] -> [*]: max over this shard's support (-inf if the shard holds none)."""
        return scaled.masked_fill(~support, -math.inf).amax(dim=-1)

    @staticmethod
    def all_reduce(stats: torch.Tensor, op, group) -> torch.Tensor:
        """In-place all-reduce of per-token statistics over the TP group (no-op without one)."""
        if _group_size(group) > 1:
            dist.all_reduce(stats, op=op, group=group)
        return stats

    @staticmethod
    def local_sum_exp(scaled: torch.Tensor, support: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
        """[*, v/tp], [*] -> [*]: sum over this shard's support of exp(z/T - global max)."""
        shifted = (scaled - global_max.unsqueeze(-1)).masked_fill(~support, -math.inf)
        return shifted.exp().sum(dim=-1)

    @staticmethod
    def log_softmax(scaled: torch.Tensor, support: torch.Tensor, global_max: torch.Tensor,
                    global_sum_exp: torch.Tensor) -> torch.Tensor:
        """[*, v/tp] log-probabilities normalised over the global support; -inf outside it.

        ``(z - max) - log sumexp``, never ``z - (max + log sumexp)``: at large |z/T| the rounding
        of ``max + log sumexp`` shifts every log p of the row alike, the row then sums to
        ``e^delta``, and the ``H - p * sum(H)`` backward stops cancelling (gradients off by up to
        65% relative at logit std 1,000, T = 0.5; tests/kd/test_kd_losses.py)."""
        shifted = scaled - global_max.unsqueeze(-1)
        return (shifted - global_sum_exp.log().unsqueeze(-1)).masked_fill(~support, -math.inf)

    @staticmethod
    def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
        """The JSD mixture m = beta*q + (1-beta)*p in log space (p and q underflow at large |z/T|)."""
        return torch.logaddexp(log_q + _log_weight(beta), log_p + _log_weight(1.0 - beta))

    @staticmethod
    def _resolve(divergence: str, beta: float) -> str:
        """JSD at beta 0 / 1 is forward / reverse KL (TRL's and Liger's special cases)."""
        if divergence == "jsd" and beta in (0.0, 1.0):
            return "forward_kl" if beta == 0.0 else "reverse_kl"
        return divergence

    @staticmethod
    def partial_divergence(log_p: torch.Tensor, log_q: torch.Tensor, support: torch.Tensor,
                           divergence: str, beta: float) -> torch.Tensor:
        """[*, v/tp] -> [*]: this shard's share of D (the sum over K restricted to the shard)."""
        p, q = log_p.exp(), log_q.exp()
        divergence = VocabParallelKD._resolve(divergence, beta)
        if divergence == "forward_kl":
            terms = q * (log_q - log_p)
        elif divergence == "reverse_kl":
            terms = p * (log_p - log_q)
        else:  # jsd
            log_m = VocabParallelKD._log_mixture(log_p, log_q, beta)
            terms = beta * q * (log_q - log_m) + (1.0 - beta) * p * (log_p - log_m)
        # Outside K the terms are 0 * (-inf) = nan; they are not part of D.
        return torch.where(support, terms, 0.0).sum(dim=-1)

    @staticmethod
    def divergence_grad_terms(log_p: torch.Tensor, log_q: torch.Tensor, support: torch.Tensor,
                              divergence: str, beta: float):
        """[*, v/tp] -> (H^p, H^q) with H^p = p * dD/dp and H^q = q * dD/dq, 0 outside K."""
        p, q = log_p.exp(), log_q.exp()
        divergence = VocabParallelKD._resolve(divergence, beta)
        if divergence == "forward_kl":
            h_p = -q
            h_q = q * (log_q - log_p + 1.0)
        elif divergence == "reverse_kl":
            h_p = p * (log_p - log_q + 1.0)
            h_q = -p
        else:  # jsd: the mixture's own weights make the log m terms cancel in dD/dp and dD/dq
            log_m = VocabParallelKD._log_mixture(log_p, log_q, beta)
            h_p = (1.0 - beta) * p * (log_p - log_m)
            h_q = beta * q * (log_q - log_m)
        return torch.where(support, h_p, 0.0), torch.where(support, h_q, 0.0)


# Row chunks of the exact loss's elementwise work: 2**22 fp32 (16 MiB) temporaries stay below
# glibc's largest mmap threshold (32 MiB), so the CPU allocator reuses them instead of mapping and
# page-faulting fresh memory for every whole-tensor temporary (the exact loss went from 2.3x to
# 0.35x the naive loss's time in benchmarks/kd_loss.py with this and the fused log-softmax).
# Harmless on a GPU.
ROW_CHUNK_ELEMENTS = 1 << 22


def _forward_kl_rows(student_logits, teacher_logits, n_valid: int, temperature: float, group):
    """Forward KL without top-k, row chunk by row chunk -> (D [rows], log_p [rows, nv], q [rows, nv]).

    Only the two tensors backward needs (``log p`` and ``q``) are whole-size; every temporary is a
    row chunk. With TP the log-softmaxes are first formed shard-locally, then corrected by one
    all-gather of their per-row statistics (``VocabParallelKD.tp_corrections``).
    """
    steps = VocabParallelKD
    xs = student_logits.flatten(0, -2)[:, :n_valid]  # [rows, nv] views
    xt = teacher_logits.flatten(0, -2)[:, :n_valid]
    rows = xs.size(0)
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, n_valid))
    log_p = torch.empty(rows, n_valid, dtype=torch.float32, device=xs.device)
    log_q = torch.empty_like(log_p)  # becomes q in place below
    tp = _group_size(group) > 1
    local = torch.empty(4, rows, dtype=torch.float32, device=xs.device) if tp else None
    for r in range(0, rows, step):
        rs = slice(r, r + step)
        for i, (x, out) in enumerate(((xs, log_p), (xt, log_q))):
            scaled = steps.scaled_valid(x[rs], n_valid, temperature)
            torch.log_softmax(scaled, dim=-1, out=out[rs])
            if tp:
                local[2 * i, rs], local[2 * i + 1, rs] = steps.softmax_stats(scaled, out[rs])
    corrections = steps.tp_corrections(local, group) if tp else None
    divergence = torch.empty(rows, dtype=torch.float32, device=xs.device)
    for r in range(0, rows, step):
        rs = slice(r, r + step)
        lp, lq = log_p[rs], log_q[rs]
        if tp:
            lp.add_(corrections[0][rs].unsqueeze(-1))
            lq.add_(corrections[1][rs].unsqueeze(-1))
        diff = lq - lp
        divergence[rs] = torch.linalg.vecdot(lq.exp_(), diff)  # lq now holds q
    return divergence, log_p, log_q


class _VocabParallelKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, tp_group, vocab_size, temperature,
                scale, divergence, beta, top_k):
        steps = VocabParallelKD
        shard = student_logits.size(-1)
        n_valid = steps.valid_count(shard, _group_rank(tp_group), vocab_size)
        # Padding is a suffix of the shard: drop it by slicing, so no -inf mask is ever applied
        # to (and no pass made over) the whole [*, v/tp] tensor.
        fast = steps._resolve(divergence, beta) == "forward_kl" and not ctx.needs_input_grad[1]
        if fast and top_k is None:  # the default: Hinton's forward KL, frozen teacher
            divergence_, log_p, q = _forward_kl_rows(student_logits, teacher_logits, n_valid,
                                                     temperature, tp_group)
            divergence_ = divergence_.view(student_logits.shape[:-1])
            steps.all_reduce(divergence_, dist.ReduceOp.SUM, tp_group)
            ctx.save_for_backward(log_p.view(*student_logits.shape[:-1], n_valid),
                                  q.view(*student_logits.shape[:-1], n_valid))
            ctx.fast, ctx.shard, ctx.grad_scale = True, shard, scale / temperature
            ctx.dtypes = (student_logits.dtype, teacher_logits.dtype)
            return divergence_ * scale

        log_p, log_q, support = steps.student_teacher_log_probs(
            student_logits, teacher_logits, n_valid, vocab_size, temperature, top_k, tp_group)

        if fast:
            # Forward KL: D = sum_K q (log q - log p) and dD/d(z_S/T) = p - q exactly (sum_K q = 1);
            # keep q, not log q: the backward needs nothing else.
            q = log_q.exp() if support is None else torch.where(support, log_q.exp(), 0.0)
            divergence_ = steps.forward_kl(q, log_q, log_p, support)  # [*]
            steps.all_reduce(divergence_, dist.ReduceOp.SUM, tp_group)
            ctx.save_for_backward(log_p, q)
            ctx.fast = True
        else:
            if support is None:
                support = torch.ones((), dtype=torch.bool, device=log_p.device).expand(log_p.shape)
            divergence_ = steps.partial_divergence(log_p, log_q, support, divergence, beta)  # [*]
            steps.all_reduce(divergence_, dist.ReduceOp.SUM, tp_group)
            ctx.save_for_backward(log_p, log_q, support)
            ctx.fast = False
        ctx.tp_group, ctx.divergence, ctx.beta, ctx.shard = tp_group, divergence, beta, shard
        ctx.grad_scale = scale / temperature  # d(z/T)/dz = 1/T
        ctx.dtypes = (student_logits.dtype, teacher_logits.dtype)
        return divergence_ * scale

    @staticmethod
    def backward(ctx, grad_output):
        steps = VocabParallelKD
        scale = (grad_output.float() * ctx.grad_scale).unsqueeze(-1)  # [*, 1]
        grad_student = grad_teacher = None
        if ctx.fast:  # forward KL, teacher without grad: (p - q) * scale, in the saved storage
            log_p, q = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                grad = log_p.exp_().sub_(q).mul_(scale)  # [*, nv]
                grad_student = steps.pad_to_shard(grad, ctx.shard, ctx.dtypes[0])
            return grad_student, None, None, None, None, None, None, None, None

        log_p, log_q, support = ctx.saved_tensors
        h_p, h_q = steps.divergence_grad_terms(log_p, log_q, support, ctx.divergence, ctx.beta)
        # The softmax Jacobians need the global sums of H^p and H^q: one all-reduce for both.
        h_sums = torch.stack([h_p.sum(dim=-1), h_q.sum(dim=-1)])  # [2, *]
        steps.all_reduce(h_sums, dist.ReduceOp.SUM, ctx.tp_group)
        if ctx.needs_input_grad[0]:
            grad = (h_p - log_p.exp() * h_sums[0].unsqueeze(-1)) * scale
            grad_student = steps.pad_to_shard(grad, ctx.shard, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad = (h_q - log_q.exp() * h_sums[1].unsqueeze(-1)) * scale
            grad_teacher = steps.pad_to_shard(grad, ctx.shard, ctx.dtypes[1])
        return grad_student, grad_teacher, None, None, None, None, None, None, None


def _check_args(student_logits, teacher_logits, tp_group, vocab_size, temperature, divergence,
                beta, top_k):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logit shards differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)} (they must share the tokenizer and the TP layout; pad "
            f"both to the same V_pad first)")
    padded_vocab = student_logits.size(-1) * _group_size(tp_group)
    if not 1 <= vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, V_pad] with V_pad = shard size "
                         f"{student_logits.size(-1)} x TP {_group_size(tp_group)} = {padded_vocab}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}] or None, got {top_k}")


def vocab_parallel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tp_group,
                           vocab_size: int, temperature: float = 1.0, scale_by_t_squared: bool = True,
                           divergence: str = "forward_kl", beta: float = 0.5,
                           top_k: Optional[int] = None) -> torch.Tensor:
    """Per-token distillation loss from this TP rank's vocab shards of student and teacher logits.

    Args:
        student_logits: ``[*, V_pad/TP]`` (e.g. ``[s, b, v/tp]``), any float dtype; usually
            requires grad.
        teacher_logits: same shape; may require grad (then it gets one too).
        tp_group: the tensor-parallel group the vocab is sharded over, passed explicitly (no
            ``parallel_state`` getter is consulted); ``None`` for a single, unsharded process.
        vocab_size: the true vocab size V; ids ``>= V`` are padding, excluded from both softmaxes.
        temperature: T in ``softmax(z / T)``.
        scale_by_t_squared: multiply by ``T**2`` (Hinton).
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (see the module docstring).
        beta: JSD weight; 0 gives forward KL, 1 reverse KL.
        top_k: restrict the teacher to its global top-k support (see the module docstring).

    Returns:
        ``[*]`` fp32 per-token losses, identical on every rank of ``tp_group``.
    """
    _check_args(student_logits, teacher_logits, tp_group, vocab_size, temperature, divergence, beta,
                top_k)
    scale = temperature ** 2 if scale_by_t_squared else 1.0
    return _VocabParallelKDLoss.apply(student_logits, teacher_logits, tp_group, vocab_size,
                                      float(temperature), float(scale), divergence, float(beta), top_k)


def kd_objective_loss(per_token_kd: Optional[torch.Tensor], per_token_ce: Optional[torch.Tensor],
                      loss_mask: torch.Tensor, alpha: float):
    """``alpha * KD + (1 - alpha) * CE`` summed over loss-masked tokens -> ``(loss_sum, num_tokens)``.

    A sum and a count, not a mean, so that the trainer divides once by the global token count
    across micro-batches and DP/CP ranks. ``per_token_kd`` may be ``None`` when ``alpha == 0`` (the
    CE baseline runs no teacher) and ``per_token_ce`` may be ``None`` when ``alpha == 1``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    parts = []
    if alpha > 0:
        if per_token_kd is None:
            raise ValueError(f"alpha={alpha} > 0 needs per-token KD losses")
        parts.append(alpha * per_token_kd.float())
    if alpha < 1:
        if per_token_ce is None:
            raise ValueError(f"alpha={alpha} < 1 needs per-token CE losses")
        parts.append((1.0 - alpha) * per_token_ce.float())
    per_token = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    if per_token.shape != loss_mask.shape:
        raise ValueError(f"per-token losses {tuple(per_token.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} differ in shape")
    mask = loss_mask.bool()
    # where, not multiply: a masked-out token's loss (e.g. a padded tail) must not leak inf/nan.
    loss_sum = torch.where(mask, per_token, 0.0).sum()
    return loss_sum, mask.sum().to(torch.int)
