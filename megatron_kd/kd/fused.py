"""Fused, chunked, vocab-parallel linear + KD (+ CE) loss: the logits are never materialised.

``fused_linear_kd_loss`` computes exactly what the unfused path computes, per loss-masked token::

    alpha * vocab_parallel_kd_loss(h_S @ W_S^T, h_T @ W_T^T, ...) + (1 - alpha) * CE(h_S @ W_S^T, label)

summed, with the count, like ``kd_objective_loss`` -- but it takes the final hidden states and the
(vocab-sharded) output-layer weights instead of logits, and walks the tokens in chunks. Per chunk
it forms this rank's ``[chunk, V_pad/TP]`` logit shards (one GEMM per model), runs the named steps
of the exact loss (``VocabParallelKD``: max, sum-exp, partial divergence, each reduced across TP)
and megatron-core's own vocab-parallel CE steps (``VocabParallelCrossEntropy``: target logit on the
owning shard + all-reduce), turns them straight into ``d loss / d logits`` and pushes that through
the two gradient GEMMs (hidden and weight), then drops the chunk. The gradients are thus computed
*in the forward* (the Liger-Kernel / Cut-Cross-Entropy trick); backward only scales them by the
incoming scalar. Nothing of size ``[tokens, V_pad/TP]`` lives past its chunk, so the peak extra
memory is ``O(chunk * V_pad/TP)`` (about ten fp32 chunk-sized temporaries) plus the gradients
themselves, ``O(n * h + V_pad/TP * h)``.

Semantics, as in the exact path (see ``losses.py`` for the divergences and top-k):

* KD: ``p = softmax(z / T)`` over the unpadded vocab (ids ``>= vocab_size`` excluded), forward /
  reverse KL or JSD(beta), optional teacher top-k, times ``T**2`` if ``scale_by_t_squared``.
* CE: megatron-core's ``vocab_parallel_cross_entropy`` on the fp32 student logits: temperature 1
  and, like megatron, over the whole padded shard (padded ids are in its softmax; megatron never
  sees the true vocab size). So a switch between the unfused and the fused path changes nothing.
* Reduction: ``(sum over loss-masked tokens, count)``; masked tokens contribute neither loss nor
  gradient whatever their logits or labels hold (labels there may be e.g. -100).
* ``alpha == 0``: the teacher is not needed (pass ``None``); ``alpha == 1``: labels not needed.

Tensor parallelism: ``student_hidden`` is the replicated input of the column-parallel output
layer, identical on every rank of ``tp_group``. Each rank's logit shard contributes a partial
``d loss / d hidden``; the full gradient is their sum, so the hidden-state gradients are
all-reduced (SUM) over ``tp_group`` here -- what megatron's ``copy_to_tensor_model_parallel_region``
does in its backward. Pass the hidden state *not* already routed through that region (or the sum
would be taken twice). The weight gradients are per shard and need no collective. The loss is
replicated on every rank. With sequence parallelism the caller gathers the hidden state first.

Collectives per chunk: one all-reduce MAX ``[<=3, c]``, one SUM ``[<=4, c]``, one SUM ``[<=3, c]``
(plus an all-gather of ``[c, k]`` for top-k); one SUM of ``[n, h]`` per hidden gradient at the
end. Precision: logits are formed in the input dtype (as the unfused output layer would), every
loss statistic in fp32, the weight gradient accumulated over chunks in ``grad_accum_dtype``
(fp32 by default; it is returned in the weight's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_kd.kd.losses import VocabParallelKD, _check_args, _group_rank, _group_size

# Default chunk: about 2**24 logits per shard (64 MiB per fp32 [chunk, V/TP] temporary).
DEFAULT_CHUNK_LOGITS = 1 << 24


@dataclass(frozen=True)
class _Options:
    tp_group: object
    vocab_size: int
    alpha: float
    temperature: float
    kd_scale: float  # T**2 or 1
    divergence: str
    beta: float
    top_k: Optional[int]
    chunk_size: int
    grad_accum_dtype: torch.dtype


class FusedLinearKD:
    """The named steps the fused path adds to ``VocabParallelKD`` and megatron's CE steps.

    Shapes: ``[c, h]`` a chunk of hidden states, ``[v/tp, h]`` this rank's weight shard,
    ``[c, v/tp]`` the chunk's logit shard, ``[c]`` one value per token.
    """

    @staticmethod
    def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[c, h] @ [v/tp, h]^T -> [c, v/tp] in the input dtype (what the output layer computes)."""
        return hidden @ weight.t()

    @staticmethod
    def softmax_backward(h: torch.Tensor, log_prob: torch.Tensor, h_sum: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
        """``(H - p * sum H) * scale``: the softmax Jacobian applied to ``H = p * dD/dp``.

        [c, v/tp], [c, v/tp], [c] (global sum, already all-reduced), [c] -> [c, v/tp] fp32.
        """
        return (h - log_prob.exp() * h_sum.unsqueeze(-1)) * scale.unsqueeze(-1)

    @staticmethod
    def accumulate_grads(grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                         grad_hidden: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor]):
        """Push ``[c, v/tp]`` d loss / d logits through the output layer's two gradient GEMMs.

        ``grad_hidden`` ([c, h], a slice of the [n, h] result) is written: this shard's partial
        sum, all-reduced over TP once all chunks are done. ``grad_weight`` ([v/tp, h]) accumulates.
        """
        g = grad_logits.to(hidden.dtype)  # GEMMs in the input dtype, as the unfused backward does
        if grad_hidden is not None:
            torch.mm(g, weight.to(hidden.dtype), out=grad_hidden)  # [c, v/tp] @ [v/tp, h]
        if grad_weight is None:
            return
        if grad_weight.dtype == g.dtype:
            grad_weight.addmm_(g.t(), hidden)  # [v/tp, c] @ [c, h], no temporary
        else:  # bf16 GEMM, rounded once per chunk, summed in fp32
            grad_weight += (g.t() @ hidden).to(grad_weight.dtype)


def _run_chunks(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                labels, loss_mask, needs, o: _Options):
    """The whole loss: -> (fp32 loss sum, [grads of the five tensor inputs or None])."""
    kd_steps, ce_steps, steps = VocabParallelKD, VocabParallelCrossEntropy, FusedLinearKD
    group = o.tp_group
    n, v_local = student_hidden.size(0), student_weight.size(0)
    rank, world = _group_rank(group), _group_size(group)
    device = student_hidden.device
    vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(v_local, rank, world)
    valid = kd_steps.valid_vocab_mask(v_local, rank, o.vocab_size, device)  # [v/tp]
    use_kd, use_ce = o.alpha > 0, o.alpha < 1
    teacher_from_hidden = use_kd and teacher_logits is None
    needs = [bool(x) for x in needs]
    if not use_kd:
        needs[2] = needs[3] = needs[4] = False
    need_sh, need_sw, need_th, need_tw, need_tl = needs

    def weight_acc(weight, need):  # [v/tp, h] accumulated over chunks
        return torch.zeros(weight.shape, dtype=o.grad_accum_dtype, device=device) if need else None

    def rows(like, need):  # contiguous [n, *], each chunk writes its own rows
        return torch.empty(like.shape, dtype=like.dtype, device=device) if need else None

    grad_sh = rows(student_hidden, need_sh)  # [n, h_S]
    grad_sw = weight_acc(student_weight, need_sw)
    grad_th = rows(teacher_hidden, need_th)  # [n, h_T]
    grad_tw = weight_acc(teacher_weight, need_tw)
    grad_tl = rows(teacher_logits, need_tl)  # [n, v/tp]: as large as that input itself
    need_student_grad, need_teacher_grad = need_sh or need_sw, need_th or need_tw or need_tl

    mask = loss_mask.bool()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, n, o.chunk_size):
        end = min(start + o.chunk_size, n)
        h_s = student_hidden[start:end]  # [c, h_S]
        chunk_mask = mask[start:end]  # [c]
        c = end - start
        z_s = steps.chunk_logits(h_s, student_weight)  # [c, v/tp] input dtype
        per_token = torch.zeros(c, dtype=torch.float32, device=device)  # [c]
        maxes, sums = [], []  # per-token rows reduced together: [<=3, c] MAX, [<=4, c] SUM

        # -- KD: scaled logits and supports (fresh fp32 tensors; z_s is reused by CE below)
        if use_kd:
            if teacher_from_hidden:
                z_t = steps.chunk_logits(teacher_hidden[start:end], teacher_weight)  # [c, v/tp]
            else:
                z_t = teacher_logits[start:end]
            student = kd_steps.scaled_logits(z_s, valid, o.temperature)  # [c, v/tp] fp32, pad -inf
            teacher = kd_steps.scaled_logits(z_t, valid, o.temperature)  # [c, v/tp] fp32, pad -inf
            del z_t
            student_support = valid.expand(student.shape)
            teacher_support = kd_steps.teacher_top_k_support(teacher, valid, o.top_k, group)
            maxes += [kd_steps.local_max(student, student_support),
                      kd_steps.local_max(teacher, teacher_support)]
        # -- CE: megatron's steps on the raw fp32 logits, whole padded shard
        if use_ce:
            ce_logits, ce_max = ce_steps.calculate_logits_max(z_s)  # [c, v/tp] fp32 (may alias z_s)
            maxes.append(ce_max)
        del z_s

        # all-reduce MAX: [student/T, teacher/T (over K), CE student] maxima
        logits_max = kd_steps.all_reduce(torch.stack(maxes), dist.ReduceOp.MAX, group)  # [<=3, c]
        if use_kd:
            sums += [kd_steps.local_sum_exp(student, student_support, logits_max[0]),
                     kd_steps.local_sum_exp(teacher, teacher_support, logits_max[1])]
        if use_ce:
            target = labels[start:end]
            # In place on ce_logits: shift by the max, exp. The target logit is 0 off its shard.
            target_mask, masked_target_1d, predicted, ce_sum_exp, exp_logits = \
                ce_steps.calculate_predicted_logits(ce_logits, target, logits_max[-1],
                                                    vocab_start, vocab_end)
            sums += [ce_sum_exp, predicted]
        # all-reduce SUM: [student sum-exp, teacher sum-exp, CE sum-exp, CE target logit]
        sum_stats = kd_steps.all_reduce(torch.stack(sums), dist.ReduceOp.SUM, group)  # [<=4, c]

        grad_z_s = None  # [c, v/tp] fp32: d loss_sum / d z_s for this chunk
        if use_ce:
            softmax, ce = ce_steps.calculate_cross_entropy_loss(exp_logits, sum_stats[-1], sum_stats[-2])
            per_token += (1.0 - o.alpha) * ce
            if need_student_grad:
                grad_2d, arange_1d, softmax_update, grad_z_s = \
                    ce_steps.prepare_gradient_calculation_operands(softmax, target_mask)
                ce_weight = torch.where(chunk_mask, 1.0 - o.alpha, 0.0)  # [c] d loss_sum / d ce
                ce_steps.calculate_gradients(grad_2d, arange_1d, masked_target_1d, softmax_update,
                                             grad_z_s, ce_weight)  # in place: softmax storage
                grad_z_s.masked_fill_(~chunk_mask.unsqueeze(-1), 0.0)  # 0 * nan is nan
            del softmax, exp_logits, ce_logits

        if use_kd:
            log_p = kd_steps.log_softmax(student, student_support, logits_max[0], sum_stats[0])
            log_q = kd_steps.log_softmax(teacher, teacher_support, logits_max[1], sum_stats[1])
            del student, teacher
            reduced = [kd_steps.partial_divergence(log_p, log_q, teacher_support, o.divergence, o.beta)]
            if need_student_grad or need_teacher_grad:
                h_p, h_q = kd_steps.divergence_grad_terms(log_p, log_q, teacher_support,
                                                          o.divergence, o.beta)
                reduced += [h_p.sum(dim=-1), h_q.sum(dim=-1)]
            # all-reduce SUM: [partial divergence, sum H^p, sum H^q] -- the exact path's
            # forward and backward reductions, in one collective
            div_stats = kd_steps.all_reduce(torch.stack(reduced), dist.ReduceOp.SUM, group)  # [<=3, c]
            per_token += o.alpha * (div_stats[0] * o.kd_scale)
            # d loss_sum / d(z / T) = alpha * scale * (...), and d(z / T) / dz = 1 / T
            kd_weight = torch.where(chunk_mask, o.alpha * o.kd_scale / o.temperature, 0.0)  # [c]
            if need_student_grad:
                g = steps.softmax_backward(h_p, log_p, div_stats[1], kd_weight)
                g.masked_fill_(~chunk_mask.unsqueeze(-1), 0.0)  # a masked token's terms may be nan
                grad_z_s = g if grad_z_s is None else grad_z_s.add_(g)
                del g
            if need_teacher_grad:
                grad_z_t = steps.softmax_backward(h_q, log_q, div_stats[2], kd_weight)
                grad_z_t.masked_fill_(~chunk_mask.unsqueeze(-1), 0.0)
                if teacher_from_hidden:
                    steps.accumulate_grads(grad_z_t, teacher_hidden[start:end], teacher_weight,
                                           grad_th[start:end] if need_th else None, grad_tw)
                else:
                    grad_tl[start:end] = grad_z_t
                del grad_z_t
            del log_p, log_q
            if need_student_grad or need_teacher_grad:
                del h_p, h_q

        # where, not multiply: a masked token's loss (inf/nan from garbage) must not leak
        loss_sum += torch.where(chunk_mask, per_token, 0.0).sum()
        if need_student_grad:
            steps.accumulate_grads(grad_z_s, h_s, student_weight,
                                   grad_sh[start:end] if need_sh else None, grad_sw)
        del grad_z_s

    # The hidden state is replicated across TP (input of a column-parallel layer): its gradient
    # is the sum of every shard's partial (megatron's copy_to_tensor_model_parallel_region).
    for grad_hidden in (grad_sh, grad_th):
        if grad_hidden is not None:
            kd_steps.all_reduce(grad_hidden, dist.ReduceOp.SUM, group)
    grad_sw = None if grad_sw is None else grad_sw.to(student_weight.dtype)
    grad_tw = None if grad_tw is None else grad_tw.to(teacher_weight.dtype)
    return loss_sum, [grad_sh, grad_sw, grad_th, grad_tw, grad_tl]


class _FusedLinearKDLoss(torch.autograd.Function):
    """Forward computes loss and gradients; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                labels, loss_mask, options):
        loss_sum, grads = _run_chunks(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                      teacher_logits, labels, loss_mask, ctx.needs_input_grad[:5],
                                      options)
        ctx.present = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])  # O(n*h + V/TP*h), no logits
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_output if present else None for present in ctx.present]
        return (*grads, None, None, None)


def _check_fused_args(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                      labels, loss_mask, o: _Options):
    if student_hidden.dim() != 2 or student_weight.dim() != 2:
        raise ValueError(f"student_hidden [n, h] and student_weight [V_pad/TP, h] must be 2-D, got "
                         f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}")
    n, v_local = student_hidden.size(0), student_weight.size(0)
    if student_weight.size(1) != student_hidden.size(1):
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and student_weight "
                         f"{tuple(student_weight.shape)} disagree on the hidden size")
    if tuple(loss_mask.shape) != (n,):
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must be [n] = ({n},)")
    if o.alpha < 1 and (labels is None or tuple(labels.shape) != (n,)):
        raise ValueError(f"alpha={o.alpha} < 1 needs labels of shape [n] = ({n},), got "
                         f"{None if labels is None else tuple(labels.shape)}")
    if o.alpha > 0:
        if (teacher_logits is None) == (teacher_hidden is None or teacher_weight is None):
            raise ValueError(f"alpha={o.alpha} > 0 needs either teacher_hidden and teacher_weight, "
                             f"or teacher_logits (not both)")
        if teacher_logits is None:
            if teacher_hidden.dim() != 2 or tuple(teacher_weight.shape) != (v_local, teacher_hidden.size(1)) \
                    or teacher_hidden.size(0) != n:
                raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} / teacher_weight "
                                 f"{tuple(teacher_weight.shape)} must be [n, h_T] / [V_pad/TP, h_T] with "
                                 f"n={n}, V_pad/TP={v_local} (same tokens and vocab shard as the student)")
        elif tuple(teacher_logits.shape) != (n, v_local):
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be [n, V_pad/TP] = "
                             f"({n}, {v_local})")
    if o.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {o.chunk_size}")
    # The exact loss's checks on vocab_size / T / divergence / beta / top_k, shapes only.
    shard = torch.empty((0, v_local), device="meta")
    _check_args(shard, shard, o.tp_group, o.vocab_size, o.temperature, o.divergence, o.beta, o.top_k)


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_hidden: Optional[torch.Tensor] = None,
                         teacher_weight: Optional[torch.Tensor] = None, *,
                         teacher_logits: Optional[torch.Tensor] = None,
                         labels: Optional[torch.Tensor] = None, loss_mask: torch.Tensor,
                         alpha: float, tp_group, vocab_size: int, temperature: float = 1.0,
                         scale_by_t_squared: bool = True, divergence: str = "forward_kl",
                         beta: float = 0.5, top_k: Optional[int] = None,
                         chunk_size: Optional[int] = None,
                         grad_accum_dtype: torch.dtype = torch.float32):
    """``alpha * KD + (1 - alpha) * CE`` over loss-masked tokens from hidden states, chunked.

    Args:
        student_hidden: ``[n, h_S]`` final hidden states (replicated over ``tp_group``; e.g. ``[s*b,
            h]`` flattened), any float dtype; usually requires grad.
        student_weight: ``[V_pad/TP, h_S]`` this rank's shard of the output layer; may require grad.
        teacher_hidden, teacher_weight: ``[n, h_T]`` and ``[V_pad/TP, h_T]``; get gradients if they
            require grad (the frozen teacher normally does not). ``None`` when ``alpha == 0`` or
            ``teacher_logits`` is given.
        teacher_logits: ``[n, V_pad/TP]`` precomputed teacher logit shard instead of the teacher's
            hidden state and weight (gets a gradient if it requires grad).
        labels: ``[n]`` global target ids for the CE part (unused when ``alpha == 1``).
        loss_mask: ``[n]``; tokens where it is 0/False count for nothing.
        alpha: weight of KD; ``1 - alpha`` weights CE.
        tp_group: the TP group the vocab is sharded over, explicit (``None``: one process).
        vocab_size, temperature, scale_by_t_squared, divergence, beta, top_k: as in
            ``vocab_parallel_kd_loss``.
        chunk_size: tokens per chunk; default about ``2**24 / (V_pad/TP)``.
        grad_accum_dtype: dtype the weight gradient is accumulated in across chunks.

    Returns:
        ``(loss_sum, num_tokens)``: fp32 scalar (replicated over TP; differentiable) and int count,
        as ``kd_objective_loss``.
    """
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_LOGITS // student_weight.size(0))
    o = _Options(tp_group=tp_group, vocab_size=int(vocab_size), alpha=float(alpha),
                 temperature=float(temperature),
                 kd_scale=float(temperature) ** 2 if scale_by_t_squared else 1.0,
                 divergence=divergence, beta=float(beta), top_k=top_k, chunk_size=int(chunk_size),
                 grad_accum_dtype=grad_accum_dtype)
    if not 0.0 <= o.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if o.alpha == 0:  # the CE baseline: the teacher is not run at all
        teacher_hidden = teacher_weight = teacher_logits = None
    _check_fused_args(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                      labels, loss_mask, o)
    num_tokens = loss_mask.bool().sum().to(torch.int)
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        loss_sum, _ = _run_chunks(*inputs, labels, loss_mask, [False] * 5, o)  # no gradient work
        return loss_sum, num_tokens
    return _FusedLinearKDLoss.apply(*inputs, labels, loss_mask, o), num_tokens
