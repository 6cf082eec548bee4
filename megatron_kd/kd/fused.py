"""Fused, chunked, vocab-parallel linear + KD (+ CE) loss: the logits are never materialised.

``fused_linear_kd_loss`` computes exactly what the unfused path computes, per loss-masked token::

    alpha * vocab_parallel_kd_loss(h_S @ W_S^T, h_T @ W_T^T, ...) + (1 - alpha) * CE(h_S @ W_S^T, label)

summed, with the count, like ``kd_objective_loss`` -- but it takes the final hidden states and the
(vocab-sharded) output-layer weights instead of logits, and walks the tokens in chunks. Per chunk
it forms this rank's ``[chunk, V_pad/TP]`` logit shards (one GEMM per model), runs the named steps
of the exact loss (``VocabParallelKD``: shard-wise fused log-softmax corrected across TP, partial
divergence) and the CE of the same student logits at T = 1 (the target's log-probability on its
owning shard), turns them straight into ``d loss / d logits`` and pushes that through the two
gradient GEMMs (hidden and weight), then drops the chunk. The gradients are thus computed *in
the forward* (the Liger-Kernel / Cut-Cross-Entropy trick); backward only scales them by the
incoming scalar. Nothing of size ``[tokens, V_pad/TP]`` lives past its chunk, so the peak extra
memory is ``O(chunk * V_pad/TP)`` (a few fp32 chunk-sized temporaries) plus the gradients
themselves, ``O(n * h + V_pad/TP * h)``. The default chunk keeps each temporary at 16 MiB: below
glibc's largest mmap threshold (32 MiB), so on the CPU the chunks reuse heap memory instead of
mapping and page-faulting fresh memory every time (benchmarks/kd_loss.py).

Semantics, as in the exact path (see ``losses.py`` for the divergences and top-k):

* KD: ``p = softmax(z / T)`` over the unpadded vocab (ids ``>= vocab_size`` excluded), forward /
  reverse KL or JSD(beta), optional teacher top-k, times ``T**2`` if ``scale_by_t_squared``.
* CE: what megatron-core's ``vocab_parallel_cross_entropy`` computes on the fp32 student logits:
  temperature 1 and, like megatron, over the whole padded shard (padded ids are in its softmax; megatron never
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

Collectives per chunk: one all-gather of ``[<=3 * 2, c]`` (each log-softmax's row max and log
sum-exp: KD student, KD teacher, CE student) and one all-reduce SUM of ``[<=4, c]`` (partial
divergence, its H sums for the generic divergences, CE target log-prob); with top-k, the exact
path's MAX / SUM pair and an all-gather of ``[c, k]`` for the teacher. One SUM of ``[n, h]`` per
hidden gradient at the end. Precision: logits are formed in the input dtype (as the unfused
output layer would), every loss statistic in fp32, the weight gradient accumulated over chunks in
``grad_accum_dtype`` (fp32 by default; it is returned in the weight's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_kd.kd.losses import VocabParallelKD, _check_args, _group_rank, _group_size

# Default chunk: about 2**22 logits per shard (16 MiB per fp32 [chunk, V/TP] temporary), at least
# MIN_CHUNK_TOKENS tokens so the chunk GEMMs stay compute-bound at large vocab shards.
DEFAULT_CHUNK_LOGITS = 1 << 22
MIN_CHUNK_TOKENS = 128


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


def _zero_masked_rows(grad: torch.Tensor, mask: torch.Tensor) -> None:
    """A masked token's gradient row is exactly 0 (its terms may be nan: 0 * nan is nan)."""
    if not bool(mask.all()):
        grad[~mask] = 0.0


def _masked_rows_zero(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The chunk's hidden rows for the weight-gradient GEMM, masked tokens' rows 0: their logit
    gradient is 0, but 0 * inf is nan, and a masked position may hold anything."""
    return hidden if bool(mask.all()) else torch.where(mask.unsqueeze(-1), hidden, 0.0)


def _chunk_kd(z_s, z_t, n_valid, o: _Options, need_s: bool, need_t: bool):
    """One chunk's KD part -> (partial divergences [c] to all-reduce, [extra sums], finish).

    ``finish(div_stats, weight)`` -> (d loss / d z_s [c, nv] or None, d loss / d z_t [c, nv] or
    None) once the reduced statistics are known. Forward KL with a frozen teacher (the default)
    needs only ``p - q``; the other divergences go through the generic ``H - p * sum H`` steps.
    """
    kd_steps = VocabParallelKD
    group = o.tp_group
    log_p, log_q, support = kd_steps.student_teacher_log_probs(
        z_s, z_t, n_valid, o.vocab_size, o.temperature, o.top_k, group)  # [c, nv] each

    if kd_steps._resolve(o.divergence, o.beta) == "forward_kl" and not need_t:
        q = log_q.exp() if support is None else torch.where(support, log_q.exp(), 0.0)
        partial = kd_steps.forward_kl(q, log_q, log_p, support)
        del log_q

        def finish(div_stats, weight):
            if not need_s:
                return None, None
            return log_p.exp_().sub_(q).mul_(weight.unsqueeze(-1)), None  # (p - q) * weight
        return partial, [], finish

    if support is None:
        support = torch.ones((), dtype=torch.bool, device=log_p.device).expand(log_p.shape)
    partial = kd_steps.partial_divergence(log_p, log_q, support, o.divergence, o.beta)
    h_p, h_q = kd_steps.divergence_grad_terms(log_p, log_q, support, o.divergence, o.beta)

    def finish(div_stats, weight):
        g_s = FusedLinearKD.softmax_backward(h_p, log_p, div_stats[1], weight) if need_s else None
        g_t = FusedLinearKD.softmax_backward(h_q, log_q, div_stats[2], weight) if need_t else None
        return g_s, g_t
    return partial, [h_p.sum(dim=-1), h_q.sum(dim=-1)], finish


def _run_chunks(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                labels, loss_mask, needs, o: _Options):
    """The whole loss: -> (fp32 loss sum, [grads of the five tensor inputs or None])."""
    kd_steps, steps = VocabParallelKD, FusedLinearKD
    group = o.tp_group
    n, v_local = student_hidden.size(0), student_weight.size(0)
    rank, world = _group_rank(group), _group_size(group)
    device = student_hidden.device
    vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(v_local, rank, world)
    n_valid = kd_steps.valid_count(v_local, rank, o.vocab_size)
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
        z_s = steps.chunk_logits(h_s, student_weight)  # [c, v/tp] input dtype
        reduced = []  # per-token partial sums, all-reduced together: [divergence, (H sums), CE target]

        if use_kd:
            z_t = (steps.chunk_logits(teacher_hidden[start:end], teacher_weight) if teacher_from_hidden
                   else teacher_logits[start:end])  # [c, v/tp]
            partial, extra, finish_kd = _chunk_kd(z_s, z_t, n_valid, o, need_student_grad,
                                                  need_teacher_grad)
            del z_t
            reduced += [partial, *extra]
        if use_ce:
            # megatron's CE: fp32 logits at T = 1 over the whole padded shard; the target's
            # log-probability comes from its owning shard (0 elsewhere), summed over TP.
            (log_ce,) = kd_steps.log_softmax_shards([z_s.float()], group)  # [c, v/tp]
            target = labels[start:end]
            owned = (target >= vocab_start) & (target < vocab_end)
            local_target = torch.where(owned, target - vocab_start, 0)
            target_log_prob = torch.where(
                owned, log_ce.gather(-1, local_target.unsqueeze(-1)).squeeze(-1), 0.0)  # [c]
            reduced.append(target_log_prob)
        del z_s

        stats = kd_steps.all_reduce(torch.stack(reduced), dist.ReduceOp.SUM, group)  # [<=4, c]
        per_token = torch.zeros(end - start, dtype=torch.float32, device=device)
        grad_z_s = None  # [c, v/tp] fp32: d loss_sum / d z_s for this chunk
        if use_kd:
            per_token += o.alpha * o.kd_scale * stats[0]
            # d loss_sum / d(z / T) = alpha * scale * (...), and d(z / T) / dz = 1 / T
            kd_weight = torch.where(chunk_mask, o.alpha * o.kd_scale / o.temperature, 0.0)  # [c]
            g_s, g_t = finish_kd(stats, kd_weight)  # [c, nv] each or None
            if g_s is not None:
                grad_z_s = kd_steps.pad_to_shard(g_s, v_local, torch.float32)
                del g_s
            if g_t is not None:
                g_t = kd_steps.pad_to_shard(g_t, v_local, torch.float32)
                _zero_masked_rows(g_t, chunk_mask)
                if teacher_from_hidden:
                    steps.accumulate_grads(g_t, _masked_rows_zero(teacher_hidden[start:end], chunk_mask),
                                           teacher_weight,
                                           grad_th[start:end] if need_th else None, grad_tw)
                else:
                    grad_tl[start:end] = g_t
                del g_t
            del finish_kd
        if use_ce:
            per_token -= (1.0 - o.alpha) * stats[-1]
            if need_student_grad:
                ce_weight = torch.where(chunk_mask, 1.0 - o.alpha, 0.0)  # [c]
                # d CE / d z = softmax - onehot(target), on the owning shard
                g = log_ce.exp_().mul_(ce_weight.unsqueeze(-1))
                rows_owned = owned.nonzero().squeeze(-1)
                g[rows_owned, local_target[rows_owned]] -= ce_weight[rows_owned]
                grad_z_s = g if grad_z_s is None else grad_z_s.add_(g)
                del g
            del log_ce
        if grad_z_s is not None:
            _zero_masked_rows(grad_z_s, chunk_mask)

        # where, not multiply: a masked token's loss (inf/nan from garbage) must not leak
        loss_sum += torch.where(chunk_mask, per_token, 0.0).sum()
        if need_student_grad:
            steps.accumulate_grads(grad_z_s, _masked_rows_zero(h_s, chunk_mask), student_weight,
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
        chunk_size: tokens per chunk; default ``max(128, 2**22 / (V_pad/TP))``.
        grad_accum_dtype: dtype the weight gradient is accumulated in across chunks.

    Returns:
        ``(loss_sum, num_tokens)``: fp32 scalar (replicated over TP; differentiable) and int count,
        as ``kd_objective_loss``.
    """
    if chunk_size is None:
        chunk_size = max(MIN_CHUNK_TOKENS, DEFAULT_CHUNK_LOGITS // student_weight.size(0))
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
